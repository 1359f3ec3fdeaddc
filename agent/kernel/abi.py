"""Python mirror of bpf/include/abi.h: one ctypes struct per C struct, one IntEnum per C enum.

Change this file together with abi.h and proto/aimesh/v1/flow.proto; values are never renumbered.
tests/kernel/test_abi.py compiles a _Static_assert for every offset, size, enum member, flag, limit and counter slot
here against abi.h (Cilium's alignchecker, with bcc as the compiler), and checks that every enum member and #define of
abi.h has a mirror here (ENUMS, FLAGS, CONSTANTS, Limits) and back, and that flow.proto numbers its enums the same.
"""
from __future__ import annotations

import ctypes as ct
import enum
from dataclasses import dataclass, fields

ID_NONE = 0
ID_UNMANAGED = 1
ID_WORLD = 2
ID_FIRST_USER = 16

BACKENDS_PER_SERVICE = 16
AGENT_EV_PATH_LEN = 256
CAPTURE_CHUNKS_PER_CALL = 256
CAPTURE_IOVECS = 8
MAX_GATEWAY_ORIGINS = 65536
MAX_UDP_REPLIES = 65536
RULE_ID_GATEWAY = 0xFFFFFFFF


class Verdict(enum.IntEnum):
    NONE = 0
    ALLOWED = 1
    DENIED = 2
    AUDIT = 3
    REDIRECTED = 4


VERDICT_MAX = 8


class Hook(enum.IntEnum):
    NONE = 0
    CONNECT = 1
    SENDMSG = 2
    INGRESS = 3
    EGRESS = 4   # a raw socket's packet; no decision counter block (COUNTER_RAW_*)


HOOK_MAX = 5


class Reason(enum.IntEnum):
    NONE = 0
    POLICY = 1
    NOT_GOVERNED = 2
    SAME_IDENTITY = 3
    DNS = 4
    NO_POLICY_SRC = 5
    NO_POLICY_DST = 6
    SUNSET = 7
    FAMILY = 8
    REPLY = 9
    RAW_SOCKET = 10


class EventFlag(enum.IntFlag):
    DEPRECATED = 0x01
    LIFECYCLE = 0x02
    REDIRECTED = 0x04
    GATEWAY = 0x08


class IdentityFlag(enum.IntFlag):
    GOVERNED = 0x01
    ENFORCE = 0x02
    DEPRECATED = 0x04
    SUNSET = 0x08
    LLM_CAPTURE = 0x10
    GATEWAY = 0x20
    GW_ORIGINATE = 0x40


class PolicyFlag(enum.IntFlag):
    """policy_value.flags (POLICY_F_*)."""
    GATEWAY = 0x01
    TLS = 0x02
    FAST_PATH = 0x04


class GatewayOriginFlag(enum.IntFlag):
    """gateway_origin.flags (GW_ORIGIN_F_*)."""
    TLS = 0x01


class ConfigFlag(enum.IntFlag):
    DNS_ALLOW = 0x01
    WATCH_EXEC = 0x02
    FAST_PATH = 0x04
    UNMANAGED_CLOSED = 0x08
    ALL_DECISIONS = 0x10
    LLM_CAPTURE = 0x20


class FlowKind(enum.IntEnum):
    CONNECTION = 1
    INTERIM = 2
    UDP = 3


class Side(enum.IntEnum):
    UNKNOWN = 0
    CLIENT = 1
    SERVER = 2


class AgentEventKind(enum.IntEnum):
    CGROUP_MKDIR = 1
    EXEC = 2


class CaptureKind(enum.IntEnum):
    DATA = 1
    CLOSE = 2
    GAP = 3
    TLS_HANDSHAKE = 4
    OPEN = 5


class CaptureDirection(enum.IntEnum):
    SEND = 1
    RECV = 2


class CaptureSockFlag(enum.IntFlag):
    """capture_sock.flags (CAPTURE_SOCK_F_*)."""
    TLS = 0x01
    SENT = 0x02
    SKIP = 0x04


class CaptureEventFlag(enum.IntFlag):
    TLS = 0x1


# verdict_counters slots: fixed numbers, as in abi.h; never derived from HOOK_MAX or VERDICT_MAX.
COUNTER_DECISION_BASE = 0
COUNTER_DECISION_HOOKS = 4
COUNTER_DECISION_VERDICTS = 8


def counter_decision(hook: int, verdict: int) -> int:
    """The slot of COUNTER_DECISION(hook, verdict): 0..31."""
    if not (0 <= hook < COUNTER_DECISION_HOOKS and 0 <= verdict < COUNTER_DECISION_VERDICTS):
        raise ValueError(f"counter_decision: hook {hook} or verdict {verdict} has no decision counter slot")
    return COUNTER_DECISION_BASE + hook * COUNTER_DECISION_VERDICTS + verdict


COUNTER_DECISION_EVENTS_LOST = 32
COUNTER_AGENT_EVENTS_LOST = 33
COUNTER_LOCAL_ENDPOINTS_FULL = 34
COUNTER_REVERSE_NAT_FULL = 35
COUNTER_FLOW_EVENTS_LOST = 36
COUNTER_UDP_FLOWS_FULL = 37
COUNTER_FLOWS_UNTRACKED = 38
COUNTER_FASTPATH_SOCKETS = 39
COUNTER_FASTPATH_FULL = 40
COUNTER_FASTPATH_REMOTE = 41
COUNTER_FASTPATH_UNWATCHED = 42
COUNTER_FASTPATH_MESSAGES = 43
COUNTER_FASTPATH_BYTES = 44
COUNTER_DECISION_KEYS_FULL = 45
COUNTER_CAPTURE_SOCKETS_FULL = 46
COUNTER_CAPTURE_EVENTS_LOST = 47
COUNTER_CAPTURE_TRUNCATED = 48
COUNTER_CAPTURE_NOT_CAPTURED = 49
COUNTER_CAPTURE_CHUNKS = 50
COUNTER_CAPTURE_READ_FAILED = 51
COUNTER_CAPTURE_TLS_SOCKETS = 52
COUNTER_CAPTURE_TRUNCATED_BYTES = 53
COUNTER_CAPTURE_LOST_BYTES = 54
COUNTER_PROCESS_IDENTITY_FULL = 55
COUNTER_PORT_COBIND_REFUSED = 56
COUNTER_PORT_BIND_RACE = 57
COUNTER_INGRESS_UNLISTED_EXACT = 58
COUNTER_INGRESS_UNLISTED_JUDGED = 59
COUNTER_RAW_DENIED = 60
COUNTER_RAW_PASSED = 61
COUNTER_SLOTS = 64

Addr16 = ct.c_uint8 * 16


class RuntimeConfig(ct.Structure):
    """struct runtime_config { __u32 active_gen; __u32 flags; __u64 interim_ns; __u32 capture_request_bytes;
    __u32 capture_response_bytes; __u8 gw_addr[16]; __u16 gw_port; __u16 gw_pad; __u32 pad; };"""
    _fields_ = [("active_gen", ct.c_uint32), ("flags", ct.c_uint32), ("interim_ns", ct.c_uint64),
                ("capture_request_bytes", ct.c_uint32), ("capture_response_bytes", ct.c_uint32),
                ("gw_addr", Addr16), ("gw_port", ct.c_uint16), ("gw_pad", ct.c_uint16), ("pad", ct.c_uint32)]


class EndpointKey(ct.Structure):
    """struct endpoint_key { __u32 prefixlen; __u8 gen; __u8 pad; __u16 port; __u8 addr[16]; };"""
    _fields_ = [("prefixlen", ct.c_uint32), ("gen", ct.c_uint8), ("pad", ct.c_uint8),
                ("port", ct.c_uint16), ("addr", Addr16)]


class LocalEndpointKey(ct.Structure):
    """struct local_endpoint_key { __u8 addr[16]; __u16 port; __u8 proto; __u8 pad; };"""
    _fields_ = [("addr", Addr16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class LocalEndpointRefFlag(enum.IntFlag):
    DEAD = 1      # the last holder is deleting the entry
    SEEDED = 2    # written by the agent for a socket bound before the datapath


class LocalEndpointRef(ct.Structure):
    """struct local_endpoint_ref { struct bpf_spin_lock lock; __u32 identity; __u32 flags; __u32 pad; __u64 refs; };"""
    _fields_ = [("lock", ct.c_uint32), ("identity", ct.c_uint32), ("flags", ct.c_uint32), ("pad", ct.c_uint32),
                ("refs", ct.c_uint64)]


class BoundPort(ct.Structure):
    """struct bound_port { struct local_endpoint_key key; __u32 identity; };"""
    _fields_ = [("key", LocalEndpointKey), ("identity", ct.c_uint32)]


class IdentityKey(ct.Structure):
    """struct identity_key { __u32 id; __u32 gen; };"""
    _fields_ = [("id", ct.c_uint32), ("gen", ct.c_uint32)]


class IdentityInfo(ct.Structure):
    """struct identity_info { __u32 flags; __u32 pad; };"""
    _fields_ = [("flags", ct.c_uint32), ("pad", ct.c_uint32)]


class PolicyKey(ct.Structure):
    """struct policy_key { __u32 src; __u32 dst; __u16 port; __u8 proto; __u8 gen; };"""
    _fields_ = [("src", ct.c_uint32), ("dst", ct.c_uint32), ("port", ct.c_uint16),
                ("proto", ct.c_uint8), ("gen", ct.c_uint8)]


class PolicyValue(ct.Structure):
    """struct policy_value { __u32 rule_id; __u32 flags; };"""
    _fields_ = [("rule_id", ct.c_uint32), ("flags", ct.c_uint32)]


class RedirectKey(ct.Structure):
    """struct redirect_key { __u32 src; __u32 dst; __u32 gen; };"""
    _fields_ = [("src", ct.c_uint32), ("dst", ct.c_uint32), ("gen", ct.c_uint32)]


class RedirectValue(ct.Structure):
    """struct redirect_value { __u32 first_backend, target_id, total_weight; __u16 count, flags; };"""
    _fields_ = [("first_backend", ct.c_uint32), ("target_id", ct.c_uint32), ("total_weight", ct.c_uint32),
                ("count", ct.c_uint16), ("flags", ct.c_uint16)]


class BackendKey(ct.Structure):
    """struct backend_key { __u32 index; __u32 gen; };"""
    _fields_ = [("index", ct.c_uint32), ("gen", ct.c_uint32)]


class Backend(ct.Structure):
    """struct backend { __u8 addr[16]; __u32 cum_weight; __u16 port; __u8 is_v4; __u8 pad; };"""
    _fields_ = [("addr", Addr16), ("cum_weight", ct.c_uint32), ("port", ct.c_uint16),
                ("is_v4", ct.c_uint8), ("pad", ct.c_uint8)]


class Dialed(ct.Structure):
    """struct dialed { __u8 addr[16]; __u8 backend[16]; __u16 port; __u16 backend_port; __u32 pad; };"""
    _fields_ = [("addr", Addr16), ("backend", Addr16), ("port", ct.c_uint16), ("backend_port", ct.c_uint16),
                ("pad", ct.c_uint32)]


class SocketPeerKey(ct.Structure):
    """struct socket_peer_key { __u64 cookie; __u8 addr[16]; __u16 port; __u16 pad1; __u32 pad2; };"""
    _fields_ = [("cookie", ct.c_uint64), ("addr", Addr16), ("port", ct.c_uint16), ("pad1", ct.c_uint16),
                ("pad2", ct.c_uint32)]


class DecisionEvent(ct.Structure):
    """struct decision_event: one connect/sendmsg/ingress decision (see abi.h for each field)."""
    _fields_ = [
        ("ts_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("cookie", ct.c_uint64),
        ("dialed_addr", Addr16), ("actual_addr", Addr16), ("peer_addr", Addr16),
        ("pid", ct.c_uint32), ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32),
        ("rule_id", ct.c_uint32),
        ("dialed_port", ct.c_uint16), ("actual_port", ct.c_uint16), ("peer_port", ct.c_uint16),
        ("is_v6", ct.c_uint8), ("proto", ct.c_uint8), ("hook", ct.c_uint8), ("verdict", ct.c_uint8),
        ("reason", ct.c_uint8), ("flags", ct.c_uint8),
        ("comm", ct.c_char * 16),
    ]


class FlowOrigin(ct.Structure):
    """struct flow_origin: flow_state sk storage (see abi.h)."""
    _fields_ = [
        ("start_ns", ct.c_uint64), ("last_report_ns", ct.c_uint64), ("cookie", ct.c_uint64),
        ("cgroup_id", ct.c_uint64), ("dialed_addr", Addr16),
        ("pid", ct.c_uint32), ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32),
        ("dialed_port", ct.c_uint16), ("verdict", ct.c_uint8), ("reason", ct.c_uint8), ("flags", ct.c_uint8),
        ("side", ct.c_uint8), ("pad", ct.c_uint8 * 2),
        ("comm", ct.c_char * 16),
    ]


class FlowEvent(ct.Structure):
    """struct flow_event: one TCP connection side, at close or interim (see abi.h)."""
    _fields_ = [
        ("cookie", ct.c_uint64), ("start_ns", ct.c_uint64), ("end_ns", ct.c_uint64),
        ("bytes_sent", ct.c_uint64), ("bytes_received", ct.c_uint64), ("cgroup_id", ct.c_uint64),
        ("local_addr", Addr16), ("remote_addr", Addr16), ("dialed_addr", Addr16),
        ("pid", ct.c_uint32), ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32),
        ("srtt_us", ct.c_uint32), ("retransmits", ct.c_uint32), ("segs_out", ct.c_uint32), ("segs_in", ct.c_uint32),
        ("local_port", ct.c_uint16), ("remote_port", ct.c_uint16), ("dialed_port", ct.c_uint16),
        ("is_v6", ct.c_uint8), ("proto", ct.c_uint8), ("side", ct.c_uint8), ("kind", ct.c_uint8),
        ("verdict", ct.c_uint8), ("reason", ct.c_uint8), ("flags", ct.c_uint8), ("pad", ct.c_uint8 * 3),
        ("comm", ct.c_char * 16),
    ]


class UdpFlow(ct.Structure):
    """struct udp_flow: udp_flows value (see abi.h)."""
    _fields_ = [
        ("first_ns", ct.c_uint64), ("last_ns", ct.c_uint64), ("bytes_sent", ct.c_uint64),
        ("bytes_received", ct.c_uint64), ("packets_sent", ct.c_uint64), ("packets_received", ct.c_uint64),
        ("cgroup_id", ct.c_uint64), ("dialed_addr", Addr16),
        ("pid", ct.c_uint32), ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32),
        ("dialed_port", ct.c_uint16), ("verdict", ct.c_uint8), ("reason", ct.c_uint8), ("flags", ct.c_uint8),
        ("is_v6", ct.c_uint8), ("pad", ct.c_uint8 * 2),
        ("comm", ct.c_char * 16),
    ]


class DecisionCountKey(ct.Structure):
    """struct decision_count_key { __u32 src; __u32 dst; __u8 hook; __u8 verdict; __u8 deprecated; __u8 pad; };"""
    _fields_ = [("src", ct.c_uint32), ("dst", ct.c_uint32), ("hook", ct.c_uint8), ("verdict", ct.c_uint8),
                ("deprecated", ct.c_uint8), ("pad", ct.c_uint8)]


class PeerOrigin(ct.Structure):
    """struct peer_origin { __u32 src_id; __u32 pid; };"""
    _fields_ = [("src_id", ct.c_uint32), ("pid", ct.c_uint32)]


class SockTuple(ct.Structure):
    """struct sock_tuple { __u8 local[16]; __u8 remote[16]; __u16 local_port; __u16 remote_port; __u32 pad; };"""
    _fields_ = [("local", Addr16), ("remote", Addr16), ("local_port", ct.c_uint16), ("remote_port", ct.c_uint16),
                ("pad", ct.c_uint32)]


class FastpathState(ct.Structure):
    """struct fastpath_state { __u64 bytes_sent; __u64 bytes_received; __u32 mode; __u32 pad; };"""
    _fields_ = [("bytes_sent", ct.c_uint64), ("bytes_received", ct.c_uint64), ("mode", ct.c_uint32),
                ("pad", ct.c_uint32)]


class AgentEvent(ct.Structure):
    """struct agent_event { __u64 cgroup_id; __u32 kind; __u32 pid; char path[256]; };"""
    _fields_ = [("cgroup_id", ct.c_uint64), ("kind", ct.c_uint32), ("pid", ct.c_uint32),
                ("path", ct.c_char * AGENT_EV_PATH_LEN)]


class CaptureSockKey(ct.Structure):
    """struct capture_sock_key { __u32 tgid; __u32 fd; };"""
    _fields_ = [("tgid", ct.c_uint32), ("fd", ct.c_uint32)]


class CaptureSock(ct.Structure):
    """struct capture_sock { __u64 cookie, burst_bytes; __u32 src_id, dst_id, actual_dst_id, fd, ready, flags,
    lost_send, lost_recv; __u8 dialed_addr[16]; __u16 dialed_port; __u8 direction; __u8 pad[5]; };"""
    _fields_ = [("cookie", ct.c_uint64), ("burst_bytes", ct.c_uint64), ("src_id", ct.c_uint32),
                ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32), ("fd", ct.c_uint32), ("ready", ct.c_uint32),
                ("flags", ct.c_uint32), ("lost_send", ct.c_uint32), ("lost_recv", ct.c_uint32),
                ("dialed_addr", ct.c_uint8 * 16), ("dialed_port", ct.c_uint16), ("direction", ct.c_uint8),
                ("pad", ct.c_uint8 * 5)]


class CaptureOpen(ct.Structure):
    """struct capture_open { __u8 addr[16]; __u16 port; __u8 pad[6]; }: the data of a CAPTURE_KIND_OPEN record."""
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("pad", ct.c_uint8 * 6)]


class CaptureCursor(ct.Structure):
    """struct capture_cursor { __u64 seg, seg_len, seg_off, done; __u32 iov; __u32 pad; };"""
    _fields_ = [("seg", ct.c_uint64), ("seg_len", ct.c_uint64), ("seg_off", ct.c_uint64), ("done", ct.c_uint64),
                ("iov", ct.c_uint32), ("pad", ct.c_uint32)]


class CaptureEvent(ct.Structure):
    """struct capture_event: the header of one capture_events record; a data area of 256, 1024 or Limits.capture_chunk
    bytes follows (len of them valid)."""
    _fields_ = [
        ("ts_ns", ct.c_uint64), ("cookie", ct.c_uint64), ("tgid", ct.c_uint32), ("fd", ct.c_uint32),
        ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("actual_dst_id", ct.c_uint32), ("total", ct.c_uint32),
        ("offset", ct.c_uint32), ("len", ct.c_uint32), ("lost_send", ct.c_uint32), ("lost_recv", ct.c_uint32),
        ("kind", ct.c_uint8), ("direction", ct.c_uint8), ("flags", ct.c_uint8), ("pad", ct.c_uint8 * 5),
    ]


class TlsCall(ct.Structure):
    """struct tls_call { __u64 ssl, buf, len_ptr; __u32 fd; __u8 direction, has_fd, depth, pad; };"""
    _fields_ = [("ssl", ct.c_uint64), ("buf", ct.c_uint64), ("len_ptr", ct.c_uint64), ("fd", ct.c_uint32),
                ("direction", ct.c_uint8), ("has_fd", ct.c_uint8), ("depth", ct.c_uint8), ("pad", ct.c_uint8)]


class TlsSslKey(ct.Structure):
    """struct tls_ssl_key { __u64 ssl; __u32 tgid; __u32 pad; };"""
    _fields_ = [("ssl", ct.c_uint64), ("tgid", ct.c_uint32), ("pad", ct.c_uint32)]


class GatewayClientKey(ct.Structure):
    """struct gateway_client_key { __u8 addr[16]; __u16 port; __u16 pad; };"""
    _fields_ = [("addr", Addr16), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class GatewayOrigin(ct.Structure):
    """struct gateway_origin { __u8 addr[16]; __u16 port; __u8 family; __u8 flags; __u32 src_id; __u32 dst_id;
    __u32 policy_gen; __u64 cookie; __u64 ts_ns; };"""
    _fields_ = [("addr", Addr16), ("port", ct.c_uint16), ("family", ct.c_uint8), ("flags", ct.c_uint8),
                ("src_id", ct.c_uint32), ("dst_id", ct.c_uint32), ("policy_gen", ct.c_uint32),
                ("cookie", ct.c_uint64), ("ts_ns", ct.c_uint64)]


# C struct name -> ctypes mirror; the ABI test walks this.
MIRRORS: dict[str, type[ct.Structure]] = {
    "runtime_config": RuntimeConfig,
    "endpoint_key": EndpointKey,
    "local_endpoint_key": LocalEndpointKey,
    "local_endpoint_ref": LocalEndpointRef,
    "bound_port": BoundPort,
    "identity_key": IdentityKey,
    "identity_info": IdentityInfo,
    "policy_key": PolicyKey,
    "policy_value": PolicyValue,
    "redirect_key": RedirectKey,
    "redirect_value": RedirectValue,
    "backend_key": BackendKey,
    "backend": Backend,
    "dialed": Dialed,
    "socket_peer_key": SocketPeerKey,
    "flow_origin": FlowOrigin,
    "flow_event": FlowEvent,
    "udp_flow": UdpFlow,
    "peer_origin": PeerOrigin,
    "sock_tuple": SockTuple,
    "fastpath_state": FastpathState,
    "decision_event": DecisionEvent,
    "agent_event": AgentEvent,
    "decision_count_key": DecisionCountKey,
    "capture_sock_key": CaptureSockKey,
    "capture_sock": CaptureSock,
    "capture_cursor": CaptureCursor,
    "capture_event": CaptureEvent,
    "capture_open": CaptureOpen,
    "tls_call": TlsCall,
    "tls_ssl_key": TlsSslKey,
    "gateway_client_key": GatewayClientKey,
    "gateway_origin": GatewayOrigin,
}


# C enum -> (prefix of its members in abi.h, Python mirror). A member NAME here is PREFIX + NAME there.
ENUMS: dict[str, tuple[str, type[enum.IntEnum]]] = {
    "aimesh_verdict": ("VERDICT_", Verdict),
    "aimesh_hook": ("HOOK_", Hook),
    "aimesh_reason": ("REASON_", Reason),
    "flow_kind": ("FLOW_KIND_", FlowKind),
    "flow_side": ("SIDE_", Side),
    "agent_event_kind": ("AGENT_EV_", AgentEventKind),
    "capture_kind": ("CAPTURE_KIND_", CaptureKind),
    "capture_direction": ("CAPTURE_DIR_", CaptureDirection),
}

# Python-only members: values the C side uses without naming them (flow_origin.side is 0 until established).
UNNAMED_IN_C: frozenset[str] = frozenset({"Side.UNKNOWN"})

# Prefix of a #define family in abi.h -> Python mirror (EV_F_DEPRECATED is EventFlag.DEPRECATED).
FLAGS: dict[str, type[enum.IntFlag]] = {"EV_F_": EventFlag, "ID_F_": IdentityFlag, "CFG_F_": ConfigFlag,
                                        "CAPTURE_SOCK_F_": CaptureSockFlag, "CAPTURE_EV_F_": CaptureEventFlag,
                                        "POLICY_F_": PolicyFlag, "GW_ORIGIN_F_": GatewayOriginFlag,
                                        "LREF_F_": LocalEndpointRefFlag}

# Every other value abi.h defines (the limits are Limits' defaults), by its C name.
CONSTANTS: dict[str, int] = {
    "ID_NONE": ID_NONE, "ID_UNMANAGED": ID_UNMANAGED, "ID_WORLD": ID_WORLD, "ID_FIRST_USER": ID_FIRST_USER,
    "BACKENDS_PER_SERVICE": BACKENDS_PER_SERVICE, "AGENT_EV_PATH_LEN": AGENT_EV_PATH_LEN,
    "CAPTURE_CHUNKS_PER_CALL": CAPTURE_CHUNKS_PER_CALL, "CAPTURE_IOVECS": CAPTURE_IOVECS,
    "MAX_GATEWAY_ORIGINS": MAX_GATEWAY_ORIGINS, "MAX_UDP_REPLIES": MAX_UDP_REPLIES, "RULE_ID_GATEWAY": RULE_ID_GATEWAY,
    "VERDICT__MAX": VERDICT_MAX, "HOOK__MAX": HOOK_MAX,
    "COUNTER_DECISION_BASE": COUNTER_DECISION_BASE, "COUNTER_DECISION_HOOKS": COUNTER_DECISION_HOOKS,
    "COUNTER_DECISION_VERDICTS": COUNTER_DECISION_VERDICTS,
    "COUNTER_DECISION_EVENTS_LOST": COUNTER_DECISION_EVENTS_LOST, "COUNTER_AGENT_EVENTS_LOST": COUNTER_AGENT_EVENTS_LOST,
    "COUNTER_LOCAL_ENDPOINTS_FULL": COUNTER_LOCAL_ENDPOINTS_FULL, "COUNTER_REVERSE_NAT_FULL": COUNTER_REVERSE_NAT_FULL,
    "COUNTER_FLOW_EVENTS_LOST": COUNTER_FLOW_EVENTS_LOST, "COUNTER_UDP_FLOWS_FULL": COUNTER_UDP_FLOWS_FULL,
    "COUNTER_FLOWS_UNTRACKED": COUNTER_FLOWS_UNTRACKED, "COUNTER_FASTPATH_SOCKETS": COUNTER_FASTPATH_SOCKETS,
    "COUNTER_FASTPATH_FULL": COUNTER_FASTPATH_FULL, "COUNTER_FASTPATH_REMOTE": COUNTER_FASTPATH_REMOTE,
    "COUNTER_FASTPATH_UNWATCHED": COUNTER_FASTPATH_UNWATCHED, "COUNTER_FASTPATH_MESSAGES": COUNTER_FASTPATH_MESSAGES,
    "COUNTER_FASTPATH_BYTES": COUNTER_FASTPATH_BYTES, "COUNTER_DECISION_KEYS_FULL": COUNTER_DECISION_KEYS_FULL,
    "COUNTER_CAPTURE_SOCKETS_FULL": COUNTER_CAPTURE_SOCKETS_FULL,
    "COUNTER_CAPTURE_EVENTS_LOST": COUNTER_CAPTURE_EVENTS_LOST, "COUNTER_CAPTURE_TRUNCATED": COUNTER_CAPTURE_TRUNCATED,
    "COUNTER_CAPTURE_NOT_CAPTURED": COUNTER_CAPTURE_NOT_CAPTURED, "COUNTER_CAPTURE_CHUNKS": COUNTER_CAPTURE_CHUNKS,
    "COUNTER_CAPTURE_READ_FAILED": COUNTER_CAPTURE_READ_FAILED,
    "COUNTER_CAPTURE_TLS_SOCKETS": COUNTER_CAPTURE_TLS_SOCKETS,
    "COUNTER_CAPTURE_TRUNCATED_BYTES": COUNTER_CAPTURE_TRUNCATED_BYTES,
    "COUNTER_CAPTURE_LOST_BYTES": COUNTER_CAPTURE_LOST_BYTES,
    "COUNTER_PROCESS_IDENTITY_FULL": COUNTER_PROCESS_IDENTITY_FULL,
    "COUNTER_PORT_COBIND_REFUSED": COUNTER_PORT_COBIND_REFUSED, "COUNTER_PORT_BIND_RACE": COUNTER_PORT_BIND_RACE,
    "COUNTER_INGRESS_UNLISTED_EXACT": COUNTER_INGRESS_UNLISTED_EXACT,
    "COUNTER_INGRESS_UNLISTED_JUDGED": COUNTER_INGRESS_UNLISTED_JUDGED,
    "COUNTER_RAW_DENIED": COUNTER_RAW_DENIED, "COUNTER_RAW_PASSED": COUNTER_RAW_PASSED,
    "COUNTER_SLOTS": COUNTER_SLOTS,
}


@dataclass(frozen=True)
class Limits:
    """Map capacities, passed to the compiler as -D (no text patching). Policy maps hold two generations.

    Each field is the -D name in lower case; the defaults are abi.h's (checked by tests/kernel/test_abi.py).
    """
    max_cgroups: int = 65536
    max_processes: int = 65536
    max_endpoints: int = 65536
    max_local_endpoints: int = 16384
    max_identities: int = 16384
    max_policies: int = 262144
    max_redirects: int = 4096
    max_backends: int = 16384
    max_reverse_nat: int = 65536
    max_udp_flows: int = 65536
    max_local_peers: int = 65536
    max_fastpath_sockets: int = 65536
    max_decision_keys: int = 65536
    ringbuf_pages: int = 256   # mapped twice into the agent: counts 2x in its RSS
    flow_ringbuf_pages: int = 1024
    max_capture_sockets: int = 16384
    capture_ringbuf_pages: int = 1024
    capture_chunk: int = 4096   # data bytes per capture_events record

    def cflags(self) -> list[str]:
        return [f"-D{f.name.upper()}={getattr(self, f.name)}" for f in fields(self)]
