"""Does a compiled map image fit its maps? Pure: counts entries, compares with the capacities, raises ConfigError.

The five policy maps (Datapath._image_items) hold two generations at once during a reload: the new one is written
before the old one is deleted. So a new image fits when needed + live <= capacity, where live is what the running
generation holds (Datapath.map_usage()). Without a running generation (`aimesh check`, start-up) the rule is
2 x needed <= capacity, so that the same config can always be reloaded.
"""
from __future__ import annotations

from typing import Mapping, Optional

from agent.config import ConfigError
from agent.kernel import abi
from agent.policy.compile import MapImage

# policy map -> the abi.Limits field (and `limits:` key) that sizes it
POLICY_MAPS: dict[str, str] = {
    "identity_info": "max_identities",
    "endpoint_identity": "max_endpoints",
    "policy_verdict": "max_policies",
    "redirect_service": "max_redirects",
    "redirect_backend": "max_backends",
}


def needed_entries(image: MapImage) -> dict[str, int]:
    """Entries one generation of each policy map takes: distinct keys (a repeated key overwrites, it takes one)."""
    return {
        "identity_info": len({bytes(k) for k, _ in image.identity_info}),
        "endpoint_identity": len({bytes(k) for k, _ in image.endpoints}),
        "policy_verdict": len({bytes(k) for k, _ in image.policies}),
        "redirect_service": len({bytes(k) for k, _ in image.redirects}),
        "redirect_backend": len({bytes(k) for k, _ in image.backends}),
    }


def check_capacity(image: MapImage, limits: abi.Limits, live: Optional[Mapping[str, int]] = None) -> None:
    """ConfigError naming the map, the entries needed, the entries live and the capacity when image does not fit.

    live: entries the running generation holds per map (from Datapath.map_usage()); None: no running generation is
    known, require room for two generations of this image."""
    needed = needed_entries(image)
    ident_cap = limits.max_identities
    n_ident = len(image.identities)
    if live is None and 2 * n_ident > ident_cap:
        raise ConfigError(f"identities: the config defines {n_ident} identities (with the 2 reserved); identity_info "
                          f"(capacity {ident_cap}, limits.max_identities) holds two generations during a reload, "
                          f"so at most {ident_cap // 2}")
    for name, field in POLICY_MAPS.items():
        cap, n = getattr(limits, field), needed[name]
        if live is None:
            if 2 * n > cap:
                raise ConfigError(f"map {name}: the config needs {n} entries; a reload holds two generations at once, "
                                  f"so 2 x {n} = {2 * n} must fit in capacity {cap} (limits.{field})")
        else:
            held = int(live.get(name, 0))
            if n + held > cap:
                raise ConfigError(f"map {name}: the config needs {n} entries, the live policy holds {held}, "
                                  f"capacity {cap} (limits.{field})")
    for _, v in image.redirects:
        if not 1 <= v.count <= abi.BACKENDS_PER_SERVICE:
            raise ConfigError(f"map redirect_service: a redirect to identity {v.target_id} has {v.count} backends, "
                              f"1 to {abi.BACKENDS_PER_SERVICE} allowed")
        if v.first_backend + v.count > needed["redirect_backend"]:
            raise ConfigError(f"map redirect_service: a redirect to identity {v.target_id} points past the "
                              f"{needed['redirect_backend']} backends")
