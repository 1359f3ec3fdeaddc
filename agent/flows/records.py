"""Kernel flow events -> flow records (FlowRecordData), and UDP counters -> per-window aggregates. Pure."""
from __future__ import annotations

import ctypes as ct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from agent.flows.decode import DecodeError, format_addr
from agent.flows.model import FlowRecordData, IdentityData, RecordKind, WorkloadData
from agent.kernel import abi
from agent.policy.identities import IdentityMeta


@lru_cache(maxsize=65536)
def _from_meta(m: IdentityMeta) -> IdentityData:
    return IdentityData(name=m.name, kind=m.kind, version=m.version or "")


@lru_cache(maxsize=1024)
def _unknown(iid: int) -> IdentityData:
    return IdentityData(name="unknown" if iid == abi.ID_NONE else f"id:{iid}", kind="unknown")


def identity_data(meta: Mapping[int, IdentityMeta], iid: int) -> IdentityData:
    m = meta.get(iid)
    return _from_meta(m) if m is not None else _unknown(iid)


Workloads = Callable[[int], WorkloadData | None]   # cgroup id -> its Kubernetes workload, where known


@lru_cache(maxsize=65536)
def with_workload(ident: IdentityData, w: WorkloadData) -> IdentityData:
    """ident of one workload (bounded: one entry per identity and workload seen)."""
    return replace(ident, namespace=w.namespace, pod=w.pod, container=w.container, service_account=w.service_account)


def _local(workloads: Workloads | None, cgroup_id: int) -> WorkloadData | None:
    return workloads(cgroup_id) if workloads is not None and cgroup_id else None


def decode_flow_event(data: bytes) -> abi.FlowEvent:
    size = ct.sizeof(abi.FlowEvent)
    if len(data) < size:
        raise DecodeError(f"flow event is {len(data)} bytes, expected {size}")
    ev = abi.FlowEvent.from_buffer_copy(data[:size])
    if ev.kind not in (abi.FlowKind.CONNECTION, abi.FlowKind.INTERIM) or ev.side not in (abi.Side.CLIENT,
                                                                                          abi.Side.SERVER):
        raise DecodeError(f"flow event with unknown kind {ev.kind} or side {ev.side}")
    return ev


_DEPRECATED, _LIFECYCLE, _REDIRECTED = (int(abi.EventFlag.DEPRECATED), int(abi.EventFlag.LIFECYCLE),
                                        int(abi.EventFlag.REDIRECTED))
_CLIENT, _INTERIM = int(abi.Side.CLIENT), int(abi.FlowKind.INTERIM)
_HOOK_CONNECT, _HOOK_INGRESS = int(abi.Hook.CONNECT), int(abi.Hook.INGRESS)


def flow_record(ev: abi.FlowEvent, meta: Mapping[int, IdentityMeta], mono_to_wall_ns: int,
                agent_id: str = "", node: str = "", workloads: Workloads | None = None) -> FlowRecordData:
    """One TCP connection side. Source is always the client, destination the server, whichever side observed it.

    The kernel counts from its own socket's point of view; the record is client-relative on both sides: bytes_sent and
    packets_sent are what the client sent to the server, bytes_received and packets_received what it got back. So the
    server side's event is turned around (its received bytes are the client's sent bytes).
    On the hot path (one call per connection side): plain ints instead of enum arithmetic, cached address text.
    workloads: the local socket's cgroup -> its Kubernetes workload, put on the source (client side) or the
    destination (server side).
    """
    local, remote = format_addr(bytes(ev.local_addr)), format_addr(bytes(ev.remote_addr))
    lport, rport = ev.local_port, ev.remote_port
    client_side = ev.side == _CLIENT
    if client_side:
        src_addr, src_port, dst_addr, dst_port = local, lport, remote, rport
        c_sent, c_received, c_segs_out, c_segs_in = ev.bytes_sent, ev.bytes_received, ev.segs_out, ev.segs_in
    else:
        src_addr, src_port, dst_addr, dst_port = remote, rport, local, lport
        c_sent, c_received, c_segs_out, c_segs_in = ev.bytes_received, ev.bytes_sent, ev.segs_in, ev.segs_out
    flags, start, end = ev.flags, ev.start_ns, ev.end_ns
    source, destination = identity_data(meta, ev.src_id), identity_data(meta, ev.dst_id)
    w = _local(workloads, ev.cgroup_id)
    if w is not None:
        if client_side:
            source = with_workload(source, w)
        else:
            destination = with_workload(destination, w)
    return FlowRecordData(
        agent_id=agent_id, node=node, cookie=ev.cookie,
        kind=RecordKind.CONNECTION, interim=ev.kind == _INTERIM,
        start_time_unix_nano=start + mono_to_wall_ns, end_time_unix_nano=end + mono_to_wall_ns,
        source=source, destination=destination,
        actual_destination=identity_data(meta, ev.actual_dst_id),
        source_address=src_addr, source_port=src_port, destination_address=dst_addr, destination_port=dst_port,
        dialed_address=format_addr(bytes(ev.dialed_addr)), dialed_port=ev.dialed_port,
        protocol=ev.proto, hook=_HOOK_CONNECT if client_side else _HOOK_INGRESS,
        verdict=ev.verdict, reason=ev.reason,
        deprecated=bool(flags & _DEPRECATED), redirected=bool(flags & _REDIRECTED), lifecycle=bool(flags & _LIFECYCLE),
        bytes_sent=c_sent, bytes_received=c_received, packets_sent=c_segs_out, packets_received=c_segs_in,
        duration_ns=end - start if end > start else 0, srtt_us=ev.srtt_us, retransmits=ev.retransmits,
        pid=ev.pid, comm=ev.comm.decode(errors="replace"),
    )


def decision_record(d, meta: Mapping[int, IdentityMeta], mono_to_wall_ns: int, agent_id: str = "",
                    node: str = "", count: int = 0, last_ns: int = 0,
                    workloads: Workloads | None = None) -> FlowRecordData:
    """A connect/sendmsg/ingress decision that made no connection (denied): kind DECISION, no bytes.

    count > 1: the record stands for that many decisions (agent/flows/denials.py), d is the first one (the sample)
    and last_ns the monotonic time of the last one (the record's end time)."""
    ingress = d.hook == abi.Hook.INGRESS
    end_ns = max(last_ns, d.ts_ns)
    source, destination = identity_data(meta, d.src_id), identity_data(meta, d.dst_id)
    w = _local(workloads, d.cgroup_id)     # the local socket's: the caller's, or the server's at ingress
    if w is not None:
        if ingress:
            destination = with_workload(destination, w)
        else:
            source = with_workload(source, w)
    return FlowRecordData(
        agent_id=agent_id, node=node, cookie=d.cookie, kind=RecordKind.DECISION,
        start_time_unix_nano=d.ts_ns + mono_to_wall_ns, end_time_unix_nano=end_ns + mono_to_wall_ns,
        source=source, destination=destination,
        actual_destination=identity_data(meta, d.actual_dst_id),
        source_address=(d.peer_addr or "") if ingress else "", source_port=d.peer_port if ingress else 0,
        destination_address=d.actual_addr, destination_port=d.actual_port,
        dialed_address=d.dialed_addr, dialed_port=d.dialed_port,
        protocol=6 if d.protocol == "tcp" else 17, hook=int(d.hook), verdict=int(d.verdict), reason=int(d.reason),
        rule_id=d.rule_id, deprecated=bool(d.flags & abi.EventFlag.DEPRECATED),
        redirected=bool(d.flags & abi.EventFlag.REDIRECTED), lifecycle=bool(d.flags & abi.EventFlag.LIFECYCLE),
        pid=d.pid, comm=d.comm, count=count if count > 1 else 0)


@dataclass
class UdpCounters:
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0


@dataclass
class UdpWindow:
    """Per-socket UDP counters seen at the previous drain, to report deltas; entries idle for long are forgotten."""
    seen: dict[bytes, UdpCounters] = field(default_factory=dict)


def udp_aggregate(entries: Iterable[tuple[abi.SocketPeerKey, abi.UdpFlow]], window: UdpWindow,
                  meta: Mapping[int, IdentityMeta], mono_to_wall_ns: int, window_start_ns: int, now_ns: int,
                  agent_id: str = "", node: str = "", workloads: Workloads | None = None) -> list[FlowRecordData]:
    """Sum the traffic since the last drain per (source, destination, actual destination, port, verdict).

    Returns one FlowRecordData (kind UDP_AGGREGATE) per group that moved bytes in the window. Updates window.seen.
    Client-relative like flow_record: udp_flows entries exist only for the sending (client) socket, created at its
    sendmsg/connect, so its sent/received counters are already the client's.
    """
    groups: dict[tuple, tuple[FlowRecordData, UdpCounters]] = {}
    alive: set[bytes] = set()
    for key, uf in entries:
        k = bytes(key)
        alive.add(k)
        prev = window.seen.get(k, UdpCounters())
        delta = UdpCounters(uf.bytes_sent - prev.bytes_sent, uf.bytes_received - prev.bytes_received,
                            uf.packets_sent - prev.packets_sent, uf.packets_received - prev.packets_received)
        window.seen[k] = UdpCounters(uf.bytes_sent, uf.bytes_received, uf.packets_sent, uf.packets_received)
        if delta.packets_sent <= 0 and delta.packets_received <= 0:
            continue
        actual = format_addr(bytes(key.addr))
        w = _local(workloads, uf.cgroup_id)   # the sender's workload: one group per pod container, where known
        gkey = (uf.src_id, uf.dst_id, uf.actual_dst_id, key.port, uf.verdict, w)
        if gkey not in groups:
            flags = abi.EventFlag(uf.flags)
            base = FlowRecordData(
                agent_id=agent_id, node=node, kind=RecordKind.UDP_AGGREGATE,
                start_time_unix_nano=window_start_ns + mono_to_wall_ns, end_time_unix_nano=now_ns + mono_to_wall_ns,
                source=with_workload(identity_data(meta, uf.src_id), w) if w is not None
                else identity_data(meta, uf.src_id), destination=identity_data(meta, uf.dst_id),
                actual_destination=identity_data(meta, uf.actual_dst_id),
                destination_address=actual, destination_port=key.port,
                dialed_address=format_addr(bytes(uf.dialed_addr)), dialed_port=uf.dialed_port,
                protocol=17, hook=int(abi.Hook.SENDMSG), verdict=uf.verdict, reason=uf.reason,
                deprecated=bool(flags & abi.EventFlag.DEPRECATED), redirected=bool(flags & abi.EventFlag.REDIRECTED),
                lifecycle=bool(flags & abi.EventFlag.LIFECYCLE),
                duration_ns=max(0, now_ns - window_start_ns), pid=uf.pid, comm=uf.comm.decode(errors="replace"))
            groups[gkey] = (base, UdpCounters())
        acc = groups[gkey][1]
        acc.bytes_sent += delta.bytes_sent
        acc.bytes_received += delta.bytes_received
        acc.packets_sent += delta.packets_sent
        acc.packets_received += delta.packets_received
    for k in [k for k in window.seen if k not in alive]:
        del window.seen[k]
    return [replace(base, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received, packets_sent=c.packets_sent,
                    packets_received=c.packets_received) for base, c in groups.values()]
