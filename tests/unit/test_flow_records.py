"""Flow events -> flow records, UDP counters -> window aggregates, denied decisions -> records. No kernel."""
from __future__ import annotations

import ipaddress

import pytest

from agent.export.records import RecordKind
from agent.flows.decode import DecodeError, decode_decision
from agent.flows.records import UdpWindow, decision_record, decode_flow_event, flow_record, udp_aggregate
from agent.kernel import abi
from agent.policy.compile import addr16
from agent.policy.identities import UNMANAGED, IdentityMeta
from tests.unit.test_decode import _event

META = {16: IdentityMeta(16, "chat", "service"), 17: IdentityMeta(17, "llama", "model", "3.1"), 1: UNMANAGED}


def _a(text: str) -> bytes:
    return addr16(ipaddress.ip_address(text))


def _flow(**kw) -> abi.FlowEvent:
    ev = abi.FlowEvent(cookie=9, start_ns=1_000, end_ns=5_001_000, bytes_sent=100, bytes_received=2000,
                       src_id=16, dst_id=17, actual_dst_id=17, srtt_us=40, retransmits=1, segs_out=3, segs_in=4,
                       local_port=40000, remote_port=8000, dialed_port=8000, proto=6, side=abi.Side.CLIENT,
                       kind=abi.FlowKind.CONNECTION, verdict=abi.Verdict.ALLOWED, reason=abi.Reason.POLICY,
                       flags=abi.EventFlag.DEPRECATED, comm=b"python3", pid=77)
    ev.local_addr[:] = _a("10.1.0.1")
    ev.remote_addr[:] = _a("10.1.0.2")
    ev.dialed_addr[:] = _a("10.1.0.2")
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_client_side_record():
    r = flow_record(decode_flow_event(bytes(_flow())), META, 10**18, "node-a", "host")
    assert (r.source.name, r.destination.name, r.destination.version) == ("chat", "llama", "3.1")
    assert (r.source_address, r.source_port, r.destination_address, r.destination_port) == ("10.1.0.1", 40000,
                                                                                             "10.1.0.2", 8000)
    assert (r.bytes_sent, r.bytes_received, r.duration_ns, r.srtt_us, r.retransmits) == (100, 2000, 5_000_000, 40, 1)
    assert (r.packets_sent, r.packets_received) == (3, 4)
    assert r.start_time_unix_nano == 10**18 + 1_000 and r.hook == abi.Hook.CONNECT and r.kind == RecordKind.CONNECTION
    assert r.deprecated and not r.redirected and not r.interim and r.comm == "python3" and r.agent_id == "node-a"


def test_server_side_record_keeps_client_as_source():
    r = flow_record(decode_flow_event(bytes(_flow(side=abi.Side.SERVER, local_port=8000, remote_port=40000))),
                    META, 0)
    assert (r.source_address, r.source_port) == ("10.1.0.2", 40000)
    assert (r.destination_address, r.destination_port) == ("10.1.0.1", 8000)
    assert r.hook == abi.Hook.INGRESS


def test_server_side_record_counts_bytes_and_packets_from_the_client():
    """The server's socket sent 100 and received 2000: the client sent 2000 and got 100 back."""
    ev = _flow(side=abi.Side.SERVER, local_port=8000, remote_port=40000, bytes_sent=100, bytes_received=2000,
               segs_out=3, segs_in=4)
    r = flow_record(decode_flow_event(bytes(ev)), META, 0)
    assert (r.bytes_sent, r.bytes_received, r.packets_sent, r.packets_received) == (2000, 100, 4, 3)
    client = flow_record(decode_flow_event(bytes(_flow(bytes_sent=2000, bytes_received=100, segs_out=4, segs_in=3))),
                         META, 0)
    assert (client.bytes_sent, client.bytes_received, client.packets_sent, client.packets_received) == \
        (r.bytes_sent, r.bytes_received, r.packets_sent, r.packets_received)


def test_interim_and_bad_events():
    assert flow_record(decode_flow_event(bytes(_flow(kind=abi.FlowKind.INTERIM))), META, 0).interim
    with pytest.raises(DecodeError):
        decode_flow_event(bytes(_flow(side=0)))
    with pytest.raises(DecodeError):
        decode_flow_event(b"\0" * 8)


def test_unknown_identity_ids():
    r = flow_record(decode_flow_event(bytes(_flow(src_id=0, dst_id=99))), META, 0)
    assert (r.source.name, r.destination.name) == ("unknown", "id:99")


def _udp(cookie: int, key_port: int, sent: int, recv: int, pkts: int, src=16, dst=17):
    k = abi.SocketPeerKey(cookie=cookie, port=key_port)
    k.addr[:] = _a("10.1.0.2")
    v = abi.UdpFlow(bytes_sent=sent, bytes_received=recv, packets_sent=pkts, packets_received=pkts, src_id=src,
                    dst_id=dst, actual_dst_id=dst, dialed_port=key_port, verdict=abi.Verdict.ALLOWED)
    return k, v


def test_udp_windows_report_deltas_per_identity_pair():
    w = UdpWindow()
    first = udp_aggregate([_udp(1, 53, 100, 200, 2), _udp(2, 53, 50, 0, 1)], w, META, 0, 0, 10)
    # two sockets to the same (pair, port): one aggregate
    assert len(first) == 1 and (first[0].bytes_sent, first[0].bytes_received, first[0].packets_sent) == (150, 200, 3)
    assert first[0].kind == RecordKind.UDP_AGGREGATE and first[0].protocol == 17 and first[0].destination_port == 53
    # next window: only what moved since
    second = udp_aggregate([_udp(1, 53, 130, 200, 3), _udp(2, 53, 50, 0, 1)], w, META, 0, 10, 20)
    assert [(r.bytes_sent, r.bytes_received, r.packets_sent) for r in second] == [(30, 0, 1)]
    # nothing moved: nothing reported; a vanished socket is forgotten
    assert udp_aggregate([_udp(1, 53, 130, 200, 3)], w, META, 0, 20, 30) == []
    assert len(w.seen) == 1


def test_denied_decision_becomes_a_decision_record():
    d = decode_decision(_event(verdict=abi.Verdict.DENIED, reason=abi.Reason.NO_POLICY_DST, src_id=1, dst_id=17,
                               actual_dst_id=17, flags=0))
    r = decision_record(d, META, 0, "node-a")
    assert r.kind == RecordKind.DECISION and r.verdict == abi.Verdict.DENIED
    assert (r.source.name, r.destination.name, r.destination_port, r.bytes_sent) == ("unmanaged", "llama", 8001, 0)


def test_records_carry_the_local_ends_kubernetes_workload():
    """The local socket's cgroup names its pod container: the source on the client side, the destination on the
    server side (ingress), the sender of UDP; metrics keep identity names (tested in test_exposure)."""
    from agent.flows.model import WorkloadData
    w = WorkloadData("shop", "chat-0", "app", "chat")
    pods = {4242: w}.get
    r = flow_record(decode_flow_event(bytes(_flow(cgroup_id=4242))), META, 0, workloads=pods)
    assert (r.source.name, r.source.namespace, r.source.pod, r.source.container, r.source.service_account) == (
        "chat", "shop", "chat-0", "app", "chat")
    assert r.destination.pod == "" and r.destination.name == "llama"
    r = flow_record(decode_flow_event(bytes(_flow(cgroup_id=4242, side=abi.Side.SERVER))), META, 0, workloads=pods)
    assert r.destination.pod == "chat-0" and r.source.pod == ""
    r = flow_record(decode_flow_event(bytes(_flow(cgroup_id=99))), META, 0, workloads=pods)
    assert r.source.pod == "" and r.source.name == "chat"        # a cgroup of no known pod: the identity alone
    assert flow_record(decode_flow_event(bytes(_flow(cgroup_id=4242))), META, 0).source.pod == ""
