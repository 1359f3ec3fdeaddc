"""Capacity: a compiled image must fit its maps, two generations at once, with messages that name the map."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agent.config import Config, ConfigError, limits_of, parse_config
from agent.kernel import abi
from agent.policy.capacity import POLICY_MAPS, check_capacity, needed_entries
from agent.policy.compile import MapImage, compile_image
from agent.policy.identities import IdentityNumbering

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
DEFAULT = abi.Limits()


def _image(data: dict) -> MapImage:
    """Compile without the loader's own capacity check, so an oversized config reaches check_capacity."""
    return compile_image(Config.model_validate(data), IdentityNumbering(), 0, NOW)


def _models(n: int, prefix: str = "m") -> list[dict]:
    return [{"name": f"{prefix}{i}", "kind": "model"} for i in range(n)]


def _fails(image: MapImage, limits: abi.Limits = DEFAULT, live=None) -> str:
    with pytest.raises(ConfigError) as e:
        check_capacity(image, limits, live)
    return str(e.value)


def test_needed_entries_counts_one_generation():
    img = compile_image(parse_config("""
identities:
  - {name: a, kind: model, endpoints: ["10.0.0.0/24:80", "[fd00::/64]"]}
  - {name: b, kind: service}
policies:
  - {from: b, to: a, ports: [80, 81]}          # 2 ports x tcp+udp = 4
  - {from: b, to: a, ports: [80], protocol: tcp}  # the same key as one above: one entry
redirects:
  - {from: [b], to: a, backends: [{address: "127.0.0.1:1"}, {address: "127.0.0.1:2"}]}
""", now=NOW), IdentityNumbering(), 0, NOW)
    assert needed_entries(img) == {"identity_info": 4, "endpoint_identity": 2, "policy_verdict": 4,
                                   "redirect_service": 1, "redirect_backend": 2}
    assert set(needed_entries(img)) == set(POLICY_MAPS)
    check_capacity(img, DEFAULT)
    check_capacity(img, DEFAULT, {name: 1000 for name in POLICY_MAPS})


def test_twenty_thousand_identities():
    img = _image({"identities": _models(20_000)})
    assert _fails(img) == ("identities: the config defines 20002 identities (with the 2 reserved); identity_info "
                           "(capacity 16384, limits.max_identities) holds two generations during a reload, "
                           "so at most 8192")
    assert _fails(img, live={}) == ("map identity_info: the config needs 20002 entries, the live policy holds 0, "
                                    "capacity 16384 (limits.max_identities)")


def test_hundred_eighty_thousand_policy_entries():
    names = [f"m{i}" for i in range(300)]
    img = _image({"identities": _models(300),
                  "policies": [{"from": names, "to": names, "ports": [80, 81], "protocol": "tcp"}]})
    assert needed_entries(img)["policy_verdict"] == 180_000
    assert _fails(img) == ("map policy_verdict: the config needs 180000 entries; a reload holds two generations at "
                           "once, so 2 x 180000 = 360000 must fit in capacity 262144 (limits.max_policies)")
    assert _fails(img, live={"policy_verdict": 100_000}) == (
        "map policy_verdict: the config needs 180000 entries, the live policy holds 100000, capacity 262144 "
        "(limits.max_policies)")
    check_capacity(img, DEFAULT, {"policy_verdict": 262_144 - 180_000})   # exactly full fits


def test_seventy_thousand_endpoints():
    eps = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:80" for i in range(70_000)]
    img = _image({"identities": [{"name": "ext", "kind": "external", "endpoints": eps}]})
    assert _fails(img) == ("map endpoint_identity: the config needs 70000 entries; a reload holds two generations at "
                           "once, so 2 x 70000 = 140000 must fit in capacity 65536 (limits.max_endpoints)")
    assert "the live policy holds 0, capacity 65536" in _fails(img, live={})


def test_five_thousand_redirects():
    sources = [f"s{i}" for i in range(100)]
    idents = [{"name": s, "kind": "service"} for s in sources] + _models(50, "t")
    redirects = [{"from": sources, "to": f"t{j}", "backends": [{"address": f"127.0.0.1:{1000 + j}"}]}
                 for j in range(50)]
    img = _image({"identities": idents, "redirects": redirects})
    assert needed_entries(img)["redirect_service"] == 5000
    assert _fails(img) == ("map redirect_service: the config needs 5000 entries; a reload holds two generations at "
                           "once, so 2 x 5000 = 10000 must fit in capacity 4096 (limits.max_redirects)")


def test_small_limits_section_is_checked_by_the_loader():
    base = ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1:80', '10.0.0.2:80']}, {name: b, kind: model}]\n"
            "redirects: [{to: a, backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]}]\n")
    cfg = parse_config(base + "limits: {max_endpoints: 4, max_backends: 4, max_redirects: 2, max_identities: 8}")
    assert limits_of(cfg).max_endpoints == 4
    for limits, needle in [
        ("{max_endpoints: 3}", "map endpoint_identity: the config needs 2 entries; a reload holds two generations at "
                               "once, so 2 x 2 = 4 must fit in capacity 3 (limits.max_endpoints)"),
        ("{max_backends: 1}", "redirects: map redirect_backend: the config needs 2 entries, capacity 1"),
        ("{max_backends: 3}", "map redirect_backend: the config needs 2 entries; a reload holds two generations"),
        ("{max_redirects: 1}", "map redirect_service: the config needs 1 entries"),
        ("{max_identities: 7}", "identities: the config defines 4 identities"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(base + f"limits: {limits}", "small.yaml")
        assert str(e.value).startswith("small.yaml: ") and needle in str(e.value), str(e.value)


def test_backends_two_generations():
    cfg = parse_config("identities: [{name: a, kind: model}]\n"
                       "redirects: [{to: a, backends: [{address: '127.0.0.1:1'}, {address: '127.0.0.1:2'}]}]")
    img = compile_image(cfg, IdentityNumbering(), 0, NOW)
    lim = abi.Limits(max_backends=3)
    assert _fails(img, lim) == ("map redirect_backend: the config needs 2 entries; a reload holds two generations at "
                                "once, so 2 x 2 = 4 must fit in capacity 3 (limits.max_backends)")
    check_capacity(img, lim, {"redirect_backend": 1})
    assert "the live policy holds 2, capacity 3" in _fails(img, lim, {"redirect_backend": 2})


def test_per_redirect_backend_count():
    img = MapImage(gen=0)
    img.backends = [(abi.BackendKey(i, 0), abi.Backend()) for i in range(abi.BACKENDS_PER_SERVICE + 1)]
    img.redirects = [(abi.RedirectKey(0, 20, 0), abi.RedirectValue(first_backend=0, target_id=20, total_weight=17,
                                                                     count=abi.BACKENDS_PER_SERVICE + 1))]
    assert _fails(img) == "map redirect_service: a redirect to identity 20 has 17 backends, 1 to 16 allowed"
    img.redirects = [(abi.RedirectKey(0, 20, 0), abi.RedirectValue(first_backend=10, target_id=20, total_weight=8,
                                                                     count=8))]
    assert _fails(img) == "map redirect_service: a redirect to identity 20 points past the 17 backends"
