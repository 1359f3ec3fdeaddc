"""Decision events: bytes from the kernel -> records -> flow-log JSON, without a kernel."""
from __future__ import annotations

import ctypes as ct
import ipaddress

import pytest

from agent.flows.decode import DecodeError, decode_agent_event, decode_decision, to_json
from agent.kernel import abi
from agent.policy.compile import addr16
from agent.policy.identities import UNMANAGED, WORLD, IdentityMeta


def _event(**kw) -> bytes:
    ev = abi.DecisionEvent()
    ev.ts_ns = 5_000_000_000
    ev.cgroup_id = 42
    ev.cookie = 7
    ev.dialed_addr[:] = addr16(ipaddress.ip_address("127.0.0.1"))
    ev.actual_addr[:] = addr16(ipaddress.ip_address("127.0.0.1"))
    ev.pid, ev.src_id, ev.dst_id, ev.actual_dst_id = 1234, 16, 17, 18
    ev.dialed_port, ev.actual_port = 8000, 8001
    ev.proto, ev.hook, ev.verdict, ev.reason = 6, abi.Hook.CONNECT, abi.Verdict.REDIRECTED, abi.Reason.POLICY
    ev.flags = abi.EventFlag.REDIRECTED | abi.EventFlag.LIFECYCLE | abi.EventFlag.DEPRECATED
    ev.comm = b"python3"
    for k, v in kw.items():
        setattr(ev, k, v)
    return bytes(ev)


META = {16: IdentityMeta(16, "chat", "service"), 17: IdentityMeta(17, "llama", "model", "3.1"),
        18: IdentityMeta(18, "llama-next", "model", "4.0"), 1: UNMANAGED, 2: WORLD}


def test_decode_connect_redirect():
    d = decode_decision(_event())
    assert (d.dialed_addr, d.dialed_port, d.actual_port, d.family, d.protocol) == ("127.0.0.1", 8000, 8001,
                                                                                    "ipv4", "tcp")
    j = to_json(d, META, mono_to_wall_ns=1_700_000_000_000_000_000)
    assert j["time"] == "2023-11-14T22:13:25.000000Z"
    assert j["verdict"] == "redirected" and j["hook"] == "connect" and j["reason"] == "policy"
    assert j["source"] == {"name": "chat", "kind": "service", "version": None, "pid": 1234, "comm": "python3",
                           "cgroup_id": 42, "address": None, "port": None}
    assert (j["destination"]["name"], j["destination"]["version"], j["destination"]["port"]) == ("llama", "3.1", 8000)
    assert (j["actual"]["name"], j["actual"]["version"], j["actual"]["port"]) == ("llama-next", "4.0", 8001)
    assert j["deprecated"] and j["redirected"] and j["lifecycle_redirect"] and j["rule"] == 0


def test_decode_ipv6_ingress():
    ev = _event(is_v6=1, hook=abi.Hook.INGRESS, verdict=abi.Verdict.DENIED, reason=abi.Reason.NO_POLICY_DST,
                src_id=2, pid=0, flags=0, peer_port=40000)
    raw = bytearray(ev)
    off = abi.DecisionEvent.peer_addr.offset
    raw[off:off + 16] = ipaddress.ip_address("fd00::2").packed
    j = to_json(decode_decision(bytes(raw)), META, 0)
    assert j["family"] == "ipv6" and j["hook"] == "ingress" and j["rule"] is None
    assert j["source"]["name"] == "world" and j["source"]["address"] == "fd00::2" and j["source"]["port"] == 40000


def test_unknown_identity_is_named_by_id():
    j = to_json(decode_decision(_event(src_id=999)), META, 0)
    assert j["source"]["name"] == "id:999" and j["source"]["kind"] == "unknown"


@pytest.mark.parametrize("data", [b"", b"\0" * 10, _event()[:-1]])
def test_short_events_are_rejected(data):
    with pytest.raises(DecodeError):
        decode_decision(data)


def test_unknown_codes_are_rejected():
    with pytest.raises(DecodeError, match="unknown code"):
        decode_decision(_event(verdict=77))


def test_agent_event():
    ev = abi.AgentEvent(cgroup_id=9, kind=abi.AgentEventKind.CGROUP_MKDIR, pid=0, path=b"/demo/chat")
    out = decode_agent_event(bytes(ev))
    assert (out.cgroup_id, out.path) == (9, b"/demo/chat")
    with pytest.raises(DecodeError):
        decode_agent_event(b"\0" * 8)


def test_event_layout_is_packed_as_the_c_header_says():
    # widest first, no implicit padding: 3*8 + 3*16 + 5*4 + 3*2 + 6*1 + 16
    assert ct.sizeof(abi.DecisionEvent) == 120
