"""Config -> map image: the pure heart of the agent. No kernel, no I/O; `now` is an argument.

The image is what one generation of the policy maps holds (see bpf/include/maps.h): identity flags, configured
endpoints (LPM), the allow-list, redirects and their backends, plus the runtime flags.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Sequence, Union

from agent.config import GATEWAY, UNRESOLVED, Config, Identity, parse_backend, parse_endpoint
from agent.kernel import abi
from agent.policy.identities import UNMANAGED, WORLD, IdentityMeta, IdentityNumbering

PROTOCOLS = {"tcp": (6,), "udp": (17,), "any": (6, 17)}


@dataclass(frozen=True, slots=True)
class ResolvedEndpoint:
    """A remote end found in the cluster (a Service's ClusterIP, a ready endpoint, a pod IP): an input of the
    compile, made by agent/identity/k8s/resolve.py from the config's service/pods endpoints and a ClusterState."""
    identity: str
    network: Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
    port: int                      # 0 = any port


@dataclass
class MapImage:
    """One generation of the policy maps, as ctypes key/value pairs ready to write."""
    gen: int
    identity_info: list[tuple[abi.IdentityKey, abi.IdentityInfo]] = field(default_factory=list)
    endpoints: list[tuple[abi.EndpointKey, int]] = field(default_factory=list)
    policies: list[tuple[abi.PolicyKey, abi.PolicyValue]] = field(default_factory=list)
    redirects: list[tuple[abi.RedirectKey, abi.RedirectValue]] = field(default_factory=list)
    backends: list[tuple[abi.BackendKey, abi.Backend]] = field(default_factory=list)
    config_flags: int = 0
    identities: dict[int, IdentityMeta] = field(default_factory=dict)
    next_transition: Optional[datetime] = None     # the next sunset after `now`: compile again then
    warnings: list[str] = field(default_factory=list)
    gw_addr: bytes = bytes(16)     # runtime_config.gw_addr: where connects that need the L7 gateway go (16-byte form)
    gw_port: int = 0               # runtime_config.gw_port; 0: no gateway (such connects are denied)


def addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """16-byte form used in every key: IPv4 v4-mapped."""
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def prefix16(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return net.prefixlen + (96 if net.version == 4 else 0)


def endpoint_key(gen: int, net, port: int) -> abi.EndpointKey:
    k = abi.EndpointKey()
    k.prefixlen = 32 + prefix16(net)
    k.gen = gen
    k.port = port
    k.addr[:] = addr16(net.network_address)
    return k


def identity_flags(ident: Identity, cfg: Config, now: datetime) -> int:
    flags = 0
    if ident.is_governed:
        flags |= abi.IdentityFlag.GOVERNED
    if (ident.mode or cfg.mode) == "enforce":
        flags |= abi.IdentityFlag.ENFORCE
    if ident.deprecated:
        flags |= abi.IdentityFlag.DEPRECATED
        if now >= ident.deprecated.sunset:
            flags |= abi.IdentityFlag.SUNSET
    if ident.llm_capture.enabled:
        flags |= abi.IdentityFlag.LLM_CAPTURE
    if ident.gateway_enforced and ident.llm.tls == "originate":
        flags |= abi.IdentityFlag.GW_ORIGINATE
    return int(flags)


def gateway_flags(cfg: Config) -> int:
    """The reserved `gateway` identity: governed (it may reach the gateway destinations only), enforced unless the
    gateway's or the agent's mode is audit, and never handed to the gateway again (ID_F_GATEWAY)."""
    flags = abi.IdentityFlag.GOVERNED | abi.IdentityFlag.GATEWAY
    if (cfg.gateway.mode or cfg.mode) == "enforce":
        flags |= abi.IdentityFlag.ENFORCE
    return int(flags)


def policy_flags(cfg: Config, p, dst: str, proto: int) -> int:
    """POLICY_F_* of one compiled (policy, destination, protocol) entry: the gateway takes TCP pairs that need L7; a
    TCP pair whose policy says `fast_path: true` joins the same-node fast path."""
    if proto != 6:
        return 0
    flags = abi.PolicyFlag(0)
    if p.fast_path:
        flags |= abi.PolicyFlag.FAST_PATH
    if cfg.pair_needs_l7(p, dst):
        flags |= abi.PolicyFlag.GATEWAY
        if cfg.identity(dst).llm.tls == "intercept":
            flags |= abi.PolicyFlag.TLS
    return int(flags)


def _concrete_backends(cfg: Config, name: str) -> list[tuple[str, int]]:
    """Where a successor really is: its any-source redirect backends, else its single-host endpoints with a port."""
    for r in cfg.redirects:
        if r.to == name and not r.from_:
            return [(b.address, b.weight) for b in r.backends if b.weight > 0]
    ident = cfg.identity(name)
    out = []
    for e in ident.cidr_endpoints if ident else []:
        net, port = parse_endpoint(e)
        if net.num_addresses == 1 and port:
            host = str(net.network_address)
            out.append((f"[{host}]:{port}" if net.version == 6 else f"{host}:{port}", 1))
    return out[: abi.BACKENDS_PER_SERVICE]


class _Backends:
    def __init__(self, image: MapImage) -> None:
        self.image = image

    def add_service(self, key: abi.RedirectKey, backends: list[tuple[str, int]], target_id: int, flags: int) -> None:
        first = len(self.image.backends)
        cum = 0
        for address, weight in backends:
            addr, port = parse_backend(address)
            cum += weight
            b = abi.Backend()
            b.addr[:] = addr16(addr)
            b.cum_weight = cum
            b.port = port
            b.is_v4 = 1 if addr.version == 4 else 0
            self.image.backends.append((abi.BackendKey(len(self.image.backends), self.image.gen), b))
        v = abi.RedirectValue(first_backend=first, target_id=target_id, total_weight=cum,
                              count=len(backends), flags=flags)
        self.image.redirects.append((key, v))


def unresolved_flags(cfg: Config) -> int:
    """kubernetes.unresolved as identity flags: deny = governed (no policy: every connect refused unless a policy
    names `unresolved`), enforced unless the agent's mode is audit; audit = governed, recorded, allowed; allow = not
    governed (the other end's policies still apply)."""
    how = cfg.k8s.unresolved
    if how == "allow":
        return 0
    flags = abi.IdentityFlag.GOVERNED
    if how == "deny" and cfg.mode == "enforce":
        flags |= abi.IdentityFlag.ENFORCE
    return int(flags)


def _resolved_endpoints(image: MapImage, cfg: Config, ids: IdentityNumbering,
                        resolved: Sequence[ResolvedEndpoint]) -> None:
    """Configured CIDRs first, then the resolved ends in the order given (the config's identity order): an entry
    already taken keeps its first owner (counted in one warning)."""
    taken = {(k.prefixlen, k.port, bytes(k.addr)) for k, _ in image.endpoints}
    known = {i.name for i in cfg.identities}
    dropped = 0
    for r in resolved:
        if r.identity not in known:
            continue
        k = endpoint_key(image.gen, r.network, r.port)
        slot = (k.prefixlen, k.port, bytes(k.addr))
        if slot in taken:
            dropped += 1
            continue
        taken.add(slot)
        image.endpoints.append((k, ids.id_of(r.identity)))
    if dropped:
        image.warnings.append(f"{dropped} Kubernetes endpoints were already an endpoint of a configured CIDR or of "
                              "an earlier identity: the first one keeps them")


def _gateway(image: MapImage, cfg: Config, ids: IdentityNumbering) -> None:
    """The reserved `gateway` identity (the gateway process's cgroup, agent/identity/assigner.py) may open TCP to
    every destination with llm.gateway: enforce, on any port; runtime_config gets the redirect address."""
    gid = ids.id_of(GATEWAY)
    image.identities[gid] = IdentityMeta(gid, GATEWAY, "reserved")
    image.identity_info.append((abi.IdentityKey(gid, image.gen), abi.IdentityInfo(gateway_flags(cfg), 0)))
    for ident in cfg.identities:
        if ident.gateway_enforced:
            image.policies.append((abi.PolicyKey(gid, ids.id_of(ident.name), 0, 6, image.gen),
                                   abi.PolicyValue(abi.RULE_ID_GATEWAY, 0)))
    addr, port = cfg.gateway.redirect
    image.gw_addr, image.gw_port = addr16(addr), port


def compile_image(cfg: Config, ids: IdentityNumbering, gen: int, now: datetime,
                  resolved: Sequence[ResolvedEndpoint] = ()) -> MapImage:
    """One generation from the config and the remote ends resolved from the cluster (empty without Kubernetes)."""
    image = MapImage(gen=gen)
    image.identities[UNMANAGED.id] = UNMANAGED
    image.identities[WORLD.id] = WORLD
    if cfg.dns == "allow":
        image.config_flags |= abi.ConfigFlag.DNS_ALLOW
    if cfg.fast_path:
        image.config_flags |= abi.ConfigFlag.FAST_PATH
    if any(i.select.processes for i in cfg.identities):
        image.config_flags |= abi.ConfigFlag.WATCH_EXEC
    for ident in cfg.identities:
        for n, sel in enumerate(ident.select.processes):
            if sel.any_user():
                image.warnings.append(f"identities {ident.name!r} select.processes[{n}]: any local user can run a process "
                                      "it matches and carry this identity (no uids:)")
    if any(i.llm_capture.enabled for i in cfg.identities):
        image.config_flags |= abi.ConfigFlag.LLM_CAPTURE

    for ident in cfg.identities:
        iid = ids.id_of(ident.name)
        image.identities[iid] = IdentityMeta(iid, ident.name, ident.kind, ident.version)
        image.identity_info.append((abi.IdentityKey(iid, gen), abi.IdentityInfo(identity_flags(ident, cfg, now), 0)))
        for e in ident.cidr_endpoints:
            net, port = parse_endpoint(e)
            image.endpoints.append((endpoint_key(gen, net, port), iid))
        if ident.deprecated and ident.deprecated.sunset > now:
            t = ident.deprecated.sunset
            image.next_transition = t if image.next_transition is None else min(image.next_transition, t)
    # The reserved identities are never governed; their entries exist so every lookup finds one.
    for meta in (UNMANAGED, WORLD):
        mode_flag = abi.IdentityFlag.ENFORCE if cfg.mode == "enforce" else 0
        image.identity_info.append((abi.IdentityKey(meta.id, gen), abi.IdentityInfo(int(mode_flag), 0)))
    if cfg.uses_kubernetes:
        uid = ids.id_of(UNRESOLVED)
        image.identities[uid] = IdentityMeta(uid, UNRESOLVED, "reserved")
        image.identity_info.append((abi.IdentityKey(uid, gen), abi.IdentityInfo(unresolved_flags(cfg), 0)))
    _resolved_endpoints(image, cfg, ids, resolved)

    for rule_id, p in enumerate(cfg.policies):
        for src in p.from_:
            for dst in p.to:
                s, d = ids.id_of(src), ids.id_of(dst)
                for proto in PROTOCOLS[p.protocol]:
                    value = abi.PolicyValue(rule_id, policy_flags(cfg, p, dst, proto))
                    for port in p.ports or [0]:
                        image.policies.append((abi.PolicyKey(s, d, port, proto, gen), value))
    if cfg.uses_gateway:
        _gateway(image, cfg, ids)

    backends = _Backends(image)
    sunset = {i.name for i in cfg.identities if i.deprecated and now >= i.deprecated.sunset}
    for r in cfg.redirects:
        if r.to in sunset:
            image.warnings.append(f"redirect to {r.to!r} is superseded: {r.to!r} is past its sunset")
            continue
        dst = ids.id_of(r.to)
        chosen = [(b.address, b.weight) for b in r.backends if b.weight > 0]
        for src in r.from_ or [None]:
            sid = abi.ID_NONE if src is None else ids.id_of(src)
            backends.add_service(abi.RedirectKey(sid, dst, gen), chosen, dst, 0)
    for ident in cfg.identities:
        if ident.name in sunset and ident.deprecated.successor:
            succ = ident.deprecated.successor
            chosen = _concrete_backends(cfg, succ)
            if chosen:
                backends.add_service(abi.RedirectKey(abi.ID_NONE, ids.id_of(ident.name), gen), chosen,
                                     ids.id_of(succ), int(abi.EventFlag.LIFECYCLE))
            else:
                image.warnings.append(f"{ident.name!r} is past its sunset and its successor {succ!r} has no concrete "
                                      "backends or single-host endpoints: connections to it are denied")
    return image
