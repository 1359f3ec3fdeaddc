"""Kernel decision events (bytes) -> frozen records -> JSON-ready dicts. Pure: no kernel needed."""
from __future__ import annotations

import ctypes as ct
import ipaddress
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Optional

from agent.kernel import abi
from agent.policy.identities import IdentityMeta

PROTOCOL_NAMES = {6: "tcp", 17: "udp"}


class DecodeError(ValueError):
    pass


@dataclass(frozen=True)
class Decision:
    ts_ns: int
    cgroup_id: int
    cookie: int
    dialed_addr: str
    dialed_port: int
    actual_addr: str
    actual_port: int
    peer_addr: Optional[str]
    peer_port: int
    pid: int
    src_id: int
    dst_id: int
    actual_dst_id: int
    rule_id: int
    family: str
    protocol: str
    hook: abi.Hook
    verdict: abi.Verdict
    reason: abi.Reason
    flags: abi.EventFlag
    comm: str


@lru_cache(maxsize=65536)
def format_addr(raw: bytes) -> str:
    """16-byte form -> text; v4-mapped addresses as plain IPv4. Cached: a node sees few distinct addresses."""
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


def decode_decision(data: bytes) -> Decision:
    size = ct.sizeof(abi.DecisionEvent)
    if len(data) < size:
        raise DecodeError(f"decision event is {len(data)} bytes, expected {size}")
    ev = abi.DecisionEvent.from_buffer_copy(data[:size])
    try:
        hook, verdict, reason = abi.Hook(ev.hook), abi.Verdict(ev.verdict), abi.Reason(ev.reason)
    except ValueError as e:
        raise DecodeError(f"decision event with unknown code: {e}") from None
    peer = bytes(ev.peer_addr)
    return Decision(
        ts_ns=ev.ts_ns, cgroup_id=ev.cgroup_id, cookie=ev.cookie,
        dialed_addr=format_addr(bytes(ev.dialed_addr)), dialed_port=ev.dialed_port,
        actual_addr=format_addr(bytes(ev.actual_addr)), actual_port=ev.actual_port,
        peer_addr=None if peer == b"\0" * 16 else format_addr(peer), peer_port=ev.peer_port,
        pid=ev.pid, src_id=ev.src_id, dst_id=ev.dst_id, actual_dst_id=ev.actual_dst_id, rule_id=ev.rule_id,
        family="ipv6" if ev.is_v6 else "ipv4", protocol=PROTOCOL_NAMES.get(ev.proto, str(ev.proto)),
        hook=hook, verdict=verdict, reason=reason, flags=abi.EventFlag(ev.flags),
        comm=ev.comm.decode(errors="replace"),
    )


def decode_agent_event(data: bytes) -> abi.AgentEvent:
    size = ct.sizeof(abi.AgentEvent)
    if len(data) < size:
        raise DecodeError(f"agent event is {len(data)} bytes, expected {size}")
    return abi.AgentEvent.from_buffer_copy(data[:size])


def _identity(meta: Mapping[int, IdentityMeta], iid: int) -> dict:
    m = meta.get(iid)
    if m is None:
        return {"name": f"id:{iid}", "kind": "unknown", "version": None}
    return {"name": m.name, "kind": m.kind, "version": m.version}


def wall_time(ts_ns: int, mono_to_wall_ns: int) -> str:
    t = datetime.fromtimestamp((ts_ns + mono_to_wall_ns) / 1e9, tz=timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(d: Decision, meta: Mapping[int, IdentityMeta], mono_to_wall_ns: int) -> dict:
    """The flow-log line for one decision. Ingress: the source is the remote peer, the destination the local server."""
    src = _identity(meta, d.src_id)
    if d.hook == abi.Hook.INGRESS:
        src.update(pid=None, comm=None, cgroup_id=None, address=d.peer_addr, port=d.peer_port)
    elif d.hook == abi.Hook.EGRESS:   # a raw socket's packet: the socket's cgroup, no process; the source it claims
        src.update(pid=None, comm=None, cgroup_id=d.cgroup_id, address=d.peer_addr, port=d.peer_port or None)
    else:
        src.update(pid=d.pid, comm=d.comm, cgroup_id=d.cgroup_id, address=d.peer_addr,
                   port=d.peer_port or None)
    dst = _identity(meta, d.dst_id)
    dst.update(address=d.dialed_addr, port=d.dialed_port)
    actual = _identity(meta, d.actual_dst_id)
    actual.update(address=d.actual_addr, port=d.actual_port)
    out = {
        "time": wall_time(d.ts_ns, mono_to_wall_ns),
        "verdict": d.verdict.name.lower(),
        "hook": d.hook.name.lower(),
        "reason": d.reason.name.lower(),
        "protocol": d.protocol,
        "family": d.family,
        "source": src,
        "destination": dst,
        "actual": actual,
        "deprecated": bool(d.flags & abi.EventFlag.DEPRECATED),
        "redirected": bool(d.flags & abi.EventFlag.REDIRECTED),
        "lifecycle_redirect": bool(d.flags & abi.EventFlag.LIFECYCLE),
        "rule": d.rule_id if d.reason == abi.Reason.POLICY else None,
        "cookie": d.cookie,
    }
    if d.hook == abi.Hook.INGRESS:
        out["source"]["cgroup_id"] = None
        out["destination"]["cgroup_id"] = d.cgroup_id
    return out
