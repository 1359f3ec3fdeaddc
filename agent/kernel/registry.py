"""What the datapath is made of: every map and every program, declared once. The loader and the agent walk these tables.

Maps mirror bpf/include/maps.h (name, type, key and value layouts from abi.py, capacity); tests/kernel/test_pinning.py
compares them with what the compiled program created. Each map is pinned under a name that carries a digest of its
layout, so a program upgrade keeps every map whose layout did not change (same pin) and starts a fresh one for a map
whose layout did (new pin): bcc reuses a pinned map when the path exists.
"""
from __future__ import annotations

import ctypes as ct
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

from agent.kernel import abi
from agent.kernel import bpfsys as sys_

# enum bpf_map_type
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LPM_TRIE, SOCKHASH, SK_STORAGE, RINGBUF = 1, 2, 5, 6, 9, 11, 18, 24, 27
BPF_F_NO_PREALLOC = 1

# enum bpf_prog_type (bcc's BPF.* constants)
KPROBE, TRACEPOINT, CGROUP_SKB, CGROUP_SOCK, SOCK_OPS, SK_MSG, RAW_TRACEPOINT, CGROUP_SOCK_ADDR = 2, 5, 8, 9, 13, 16, 17, 18


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key: Optional[type]            # ctypes type; None for ring buffers
    value: Optional[type]
    capacity: Callable[[abi.Limits], int]   # max_entries (bytes for ring buffers)
    flags: int = 0
    owner: str = "agent"           # agent: refilled by the agent from config and /proc; kernel: written by programs
    gen_keyed: bool = False        # the key holds a policy generation (double-buffered)

    def layout(self, limits: abi.Limits) -> str:
        return f"{self.name}|{self.map_type}|{_layout(self.key)}|{_layout(self.value)}|{self.capacity(limits)}|{self.flags}"

    def digest(self, limits: abi.Limits) -> str:
        return hashlib.sha256(self.layout(limits).encode()).hexdigest()[:12]

    def pin_name(self, limits: abi.Limits) -> str:
        return f"{self.name}-{self.digest(limits)}"


def _layout(t: Optional[type]) -> str:
    if t is None:
        return "-"
    if isinstance(t, type) and issubclass(t, ct.Structure):
        parts = []
        for f in t._fields_:
            d = getattr(t, f[0])
            parts.append(f"{f[0]}@{d.offset}:{d.size}:{_layout(f[1])}")
        return f"{t.__name__}{{{','.join(parts)}}}"
    if isinstance(t, type) and issubclass(t, ct.Array):
        return f"{_layout(t._type_)}[{t._length_}]"
    return f"{getattr(t, '__name__', str(t))}:{ct.sizeof(t)}"


MAPS: tuple[MapSpec, ...] = (
    MapSpec("runtime_config", ARRAY, ct.c_uint32, abi.RuntimeConfig, lambda lim: 1),
    MapSpec("cgroup_identity", HASH, ct.c_uint64, ct.c_uint32, lambda lim: lim.max_cgroups),
    MapSpec("cgroup_inherit", HASH, ct.c_uint64, ct.c_uint32, lambda lim: lim.max_cgroups),
    MapSpec("process_identity", HASH, ct.c_uint32, ct.c_uint32, lambda lim: lim.max_processes),
    MapSpec("endpoint_identity", LPM_TRIE, abi.EndpointKey, ct.c_uint32, lambda lim: lim.max_endpoints,
            BPF_F_NO_PREALLOC, gen_keyed=True),
    MapSpec("local_endpoint_identity", HASH, abi.LocalEndpointKey, ct.c_uint32, lambda lim: lim.max_local_endpoints),
    MapSpec("local_endpoint_refs", HASH, abi.LocalEndpointKey, abi.LocalEndpointRef,
            lambda lim: lim.max_local_endpoints),
    MapSpec("bound_port", SK_STORAGE, ct.c_int, abi.BoundPort, lambda lim: 0, BPF_F_NO_PREALLOC, owner="kernel"),
    MapSpec("local_address", HASH, abi.LocalEndpointKey, ct.c_uint8, lambda lim: 1024),
    MapSpec("dns_resolver", HASH, abi.LocalEndpointKey, ct.c_uint8, lambda lim: 64),
    MapSpec("identity_info", HASH, abi.IdentityKey, abi.IdentityInfo, lambda lim: lim.max_identities, gen_keyed=True),
    MapSpec("policy_verdict", HASH, abi.PolicyKey, abi.PolicyValue, lambda lim: lim.max_policies, gen_keyed=True),
    MapSpec("redirect_service", HASH, abi.RedirectKey, abi.RedirectValue, lambda lim: lim.max_redirects,
            gen_keyed=True),
    MapSpec("redirect_backend", HASH, abi.BackendKey, abi.Backend, lambda lim: lim.max_backends, gen_keyed=True),
    MapSpec("dialed_address", SK_STORAGE, ct.c_int, abi.Dialed, lambda lim: 0, BPF_F_NO_PREALLOC, owner="kernel"),
    MapSpec("udp_reverse_nat", LRU_HASH, abi.SocketPeerKey, abi.Dialed, lambda lim: lim.max_reverse_nat,
            owner="kernel"),
    MapSpec("udp_flows", HASH, abi.SocketPeerKey, abi.UdpFlow, lambda lim: lim.max_udp_flows, owner="kernel"),
    MapSpec("udp_reply", LRU_HASH, abi.SocketPeerKey, ct.c_uint32, lambda lim: abi.MAX_UDP_REPLIES, owner="kernel"),
    MapSpec("socket_cgroup", SK_STORAGE, ct.c_int, ct.c_uint64, lambda lim: 0, BPF_F_NO_PREALLOC, owner="kernel"),
    MapSpec("flow_state", SK_STORAGE, ct.c_int, abi.FlowOrigin, lambda lim: 0, BPF_F_NO_PREALLOC, owner="kernel"),
    MapSpec("local_peer", LRU_HASH, abi.LocalEndpointKey, abi.PeerOrigin, lambda lim: lim.max_local_peers,
            owner="kernel"),
    MapSpec("fastpath_sockets", SOCKHASH, abi.SockTuple, ct.c_int, lambda lim: lim.max_fastpath_sockets,
            owner="kernel"),
    MapSpec("fastpath_state", HASH, abi.SockTuple, abi.FastpathState, lambda lim: lim.max_fastpath_sockets,
            owner="kernel"),
    MapSpec("verdict_counters", PERCPU_ARRAY, ct.c_uint32, ct.c_uint64, lambda lim: abi.COUNTER_SLOTS,
            owner="kernel"),
    MapSpec("decision_counts", PERCPU_HASH, abi.DecisionCountKey, ct.c_uint64, lambda lim: lim.max_decision_keys,
            owner="kernel"),
    MapSpec("decision_events", RINGBUF, None, None, lambda lim: lim.ringbuf_pages * 4096, owner="kernel"),
    MapSpec("agent_events", RINGBUF, None, None, lambda lim: 16 * 4096, owner="kernel"),
    MapSpec("flow_events", RINGBUF, None, None, lambda lim: lim.flow_ringbuf_pages * 4096, owner="kernel"),
    MapSpec("capture_connect", LRU_HASH, ct.c_uint64, abi.CaptureSock, lambda lim: lim.max_capture_sockets,
            owner="kernel"),
    MapSpec("capture_sockets", HASH, abi.CaptureSockKey, abi.CaptureSock, lambda lim: lim.max_capture_sockets,
            owner="kernel"),
    MapSpec("capture_cursor", PERCPU_ARRAY, ct.c_uint32, abi.CaptureCursor, lambda lim: 1, owner="kernel"),
    MapSpec("capture_events", RINGBUF, None, None, lambda lim: lim.capture_ringbuf_pages * 4096, owner="kernel"),
    MapSpec("tls_calls", LRU_HASH, ct.c_uint64, abi.TlsCall, lambda lim: lim.max_capture_sockets, owner="kernel"),
    MapSpec("tls_ssl_fd", LRU_HASH, abi.TlsSslKey, ct.c_uint32, lambda lim: lim.max_capture_sockets,
            owner="kernel"),
    MapSpec("gateway_pending", LRU_HASH, ct.c_uint64, abi.GatewayOrigin, lambda lim: abi.MAX_GATEWAY_ORIGINS,
            owner="kernel"),
    MapSpec("gateway_origin", LRU_HASH, abi.GatewayClientKey, abi.GatewayOrigin,
            lambda lim: abi.MAX_GATEWAY_ORIGINS, owner="kernel"),
)
MAP_BY_NAME = {m.name: m for m in MAPS}
RINGS = ("decision_events", "flow_events", "agent_events", "capture_events")


# Optional program groups: name -> the runtime_config flag (abi.ConfigFlag) of a generation that needs them linked.
GROUP_CAPTURE = "capture"
GROUP_FLAGS: dict[str, int] = {GROUP_CAPTURE: abi.ConfigFlag.LLM_CAPTURE}
# maps only a group's programs write and clean: emptied when the group is unlinked
GROUP_MAPS: dict[str, tuple[str, ...]] = {GROUP_CAPTURE: ("capture_connect", "capture_sockets")}


@dataclass(frozen=True)
class ProgramSpec:
    """One program: the C function, its type, and where it attaches (one pinned link each, named `link`)."""
    name: str
    prog_type: int
    attach_type: int
    target: str        # "cgroup" | "sockhash" | "tracepoint" | "raw_tracepoint"
    link: str          # pin name under links/
    tracepoint: str = ""   # category:event for tracepoints, the event for raw tracepoints
    group: str = ""        # "": always linked; else an optional group, linked only while a generation needs it


PROGRAMS: tuple[ProgramSpec, ...] = (
    ProgramSpec("aimesh_sock_create", CGROUP_SOCK, sys_.CGROUP_INET_SOCK_CREATE, "cgroup", "sock_create"),
    ProgramSpec("aimesh_connect4", CGROUP_SOCK_ADDR, sys_.CGROUP_INET4_CONNECT, "cgroup", "connect4"),
    ProgramSpec("aimesh_connect6", CGROUP_SOCK_ADDR, sys_.CGROUP_INET6_CONNECT, "cgroup", "connect6"),
    ProgramSpec("aimesh_sendmsg4", CGROUP_SOCK_ADDR, sys_.CGROUP_UDP4_SENDMSG, "cgroup", "sendmsg4"),
    ProgramSpec("aimesh_sendmsg6", CGROUP_SOCK_ADDR, sys_.CGROUP_UDP6_SENDMSG, "cgroup", "sendmsg6"),
    ProgramSpec("aimesh_recvmsg4", CGROUP_SOCK_ADDR, sys_.CGROUP_UDP4_RECVMSG, "cgroup", "recvmsg4"),
    ProgramSpec("aimesh_recvmsg6", CGROUP_SOCK_ADDR, sys_.CGROUP_UDP6_RECVMSG, "cgroup", "recvmsg6"),
    ProgramSpec("aimesh_getpeername4", CGROUP_SOCK_ADDR, sys_.CGROUP_INET4_GETPEERNAME, "cgroup", "getpeername4"),
    ProgramSpec("aimesh_getpeername6", CGROUP_SOCK_ADDR, sys_.CGROUP_INET6_GETPEERNAME, "cgroup", "getpeername6"),
    ProgramSpec("aimesh_post_bind4", CGROUP_SOCK, sys_.CGROUP_INET4_POST_BIND, "cgroup", "post_bind4"),
    ProgramSpec("aimesh_post_bind6", CGROUP_SOCK, sys_.CGROUP_INET6_POST_BIND, "cgroup", "post_bind6"),
    ProgramSpec("aimesh_sock_release", CGROUP_SOCK, sys_.CGROUP_INET_SOCK_RELEASE, "cgroup", "sock_release"),
    ProgramSpec("aimesh_ingress", CGROUP_SKB, sys_.CGROUP_INET_INGRESS, "cgroup", "ingress"),
    ProgramSpec("aimesh_egress", CGROUP_SKB, sys_.CGROUP_INET_EGRESS, "cgroup", "egress"),
    ProgramSpec("aimesh_sock_ops", SOCK_OPS, sys_.CGROUP_SOCK_OPS, "cgroup", "sock_ops"),
    # The fast path's verdict attaches to the fastpath_sockets map (the map holds it), before sock_ops fills the map.
    ProgramSpec("aimesh_sk_msg", SK_MSG, sys_.SK_MSG_VERDICT, "sockhash", "sk_msg"),
    ProgramSpec("tracepoint__cgroup__cgroup_mkdir", TRACEPOINT, sys_.PERF_EVENT, "tracepoint", "tp_cgroup_mkdir",
                "cgroup:cgroup_mkdir"),
    ProgramSpec("tracepoint__cgroup__cgroup_rmdir", TRACEPOINT, sys_.PERF_EVENT, "tracepoint", "tp_cgroup_rmdir",
                "cgroup:cgroup_rmdir"),
    ProgramSpec("tracepoint__task__task_newtask", TRACEPOINT, sys_.PERF_EVENT, "tracepoint", "tp_task_newtask",
                "task:task_newtask"),
    ProgramSpec("tracepoint__sched__sched_process_exec", TRACEPOINT, sys_.PERF_EVENT, "tracepoint",
                "tp_sched_process_exec", "sched:sched_process_exec"),
    ProgramSpec("tracepoint__sched__sched_process_exit", TRACEPOINT, sys_.PERF_EVENT, "tracepoint",
                "tp_sched_process_exit", "sched:sched_process_exit"),
    # plaintext capture (bpf/capture.c): linked only while some identity has LLM capture on; each dispatches on the
    # syscall number (a raw tracepoint is one program for every syscall, where the syscalls:* events are one each)
    ProgramSpec("aimesh_sys_enter", RAW_TRACEPOINT, sys_.TRACE_RAW_TP, "raw_tracepoint", "raw_tp_sys_enter",
                "sys_enter", group=GROUP_CAPTURE),
    ProgramSpec("aimesh_sys_exit", RAW_TRACEPOINT, sys_.TRACE_RAW_TP, "raw_tracepoint", "raw_tp_sys_exit",
                "sys_exit", group=GROUP_CAPTURE),
)
CGROUP_PROGRAMS = tuple(p for p in PROGRAMS if p.target == "cgroup")


def groups_needed(config_flags: int) -> frozenset[str]:
    """The optional program groups a policy generation with these runtime_config flags needs linked."""
    return frozenset(g for g, flag in GROUP_FLAGS.items() if config_flags & flag)


@dataclass(frozen=True)
class UprobeSpec:
    """One uprobe (or uretprobe) on a libssl symbol (bpf/tls.c). Not in PROGRAMS: the loader loads and pins these
    with the build, but they are linked per library file by agent/kernel/uprobes.py, not by Datapath.attach."""
    name: str          # the C function (pinned under the build's progs/)
    symbol: str        # the libssl function it probes
    retprobe: bool


TLS_SYMBOLS = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_do_handshake")
UPROBES: tuple[UprobeSpec, ...] = (
    UprobeSpec("aimesh_ssl_write", "SSL_write", False),
    UprobeSpec("aimesh_ssl_write_ex", "SSL_write_ex", False),
    UprobeSpec("aimesh_ssl_read", "SSL_read", False),
    UprobeSpec("aimesh_ssl_read_ex", "SSL_read_ex", False),
    UprobeSpec("aimesh_ssl_handshake", "SSL_do_handshake", False),
    *(UprobeSpec("aimesh_ssl_return", sym, True) for sym in TLS_SYMBOLS),
)
UPROBE_PROGRAMS = tuple(dict.fromkeys(u.name for u in UPROBES))   # the distinct programs, in order


def pin_cflags(map_dir: str, limits: abi.Limits) -> list[str]:
    """-DPIN_<map>="<path>" for every map: maps.h pins each map there (bcc reuses it when it exists)."""
    return [f'-DPIN_{m.name}="{map_dir}/{m.pin_name(limits)}"' for m in MAPS]
