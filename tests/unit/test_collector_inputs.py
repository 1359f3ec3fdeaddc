"""Bad input of every kind: each field over its limit, forged and conflicting batches, bytes that are not a
FlowBatch, stream floods. The collector answers each with a clear status, stores nothing bad, and keeps serving.

Hypothesis is not installed in the shared venv (checked when this was written), so the fuzzing is done with
parametrized cases and seeded random mutations: deterministic, and the seed is in the test id.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.collector_testlib import batch, record, stub_for, tmp_dir, wait_until  # noqa: F401 (fixture)
from agent._gen.aimesh.v1 import collector_pb2, flow_pb2
from agent._gen.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.collector.server import CollectorConfig, CollectorServer
from agent.collector.service import MAX_COMM, ServiceLimits, record_problem
from agent.collector.store import FlowFilter

TOKEN = "inputs-token"
NOW = 1_700_000_000_000_000_000  # the records' times (record()); the collector's clock is the real one


@pytest.fixture
def srv(tmp_dir: Path) -> Iterator[CollectorServer]:
    s = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token=TOKEN, grace_s=0.2))
    s.start()
    yield s
    s.stop(0)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value  # type: ignore[return-value]


def rejected(s: CollectorServer, reason: str) -> float:
    return s.registry.get_sample_value("aimesh_collector_rejected_requests_total", {"reason": reason}) or 0.0


def all_stored_records_are_valid(s: CollectorServer) -> None:
    import time

    for f in s.store.iter_flows(FlowFilter()):
        rec = flow_pb2.FlowRecord.FromString(f.payload)
        assert record_problem(rec, time.time_ns()) is None, rec


BAD_FIELDS: list[tuple[str, dict[str, object], str]] = [
    ("comm-1MB", {"comm": "x" * (1 << 20)}, "records[1].comm is 1048576 characters, at most 16"),
    ("comm-17", {"comm": "y" * (MAX_COMM + 1)}, "records[1].comm"),
    ("node", {"node": "n" * 254}, "records[1].node"),
    ("node-control", {"node": "a\nb"}, "records[1].node contains control characters"),
    ("source-name", {"source": flow_pb2.Identity(name="s" * 300)}, "records[1].source.name"),
    ("dst-version-escape", {"destination": flow_pb2.Identity(name="d", version="\x1b[2J")},
     "records[1].destination.version contains control characters"),
    ("actual-kind", {"actual_destination": flow_pb2.Identity(kind="k" * 254)}, "records[1].actual_destination.kind"),
    ("verdict-99", {"verdict": 99}, "records[1].verdict 99 is not a known value"),
    ("reason", {"reason": 1000}, "records[1].reason"),
    ("hook", {"hook": 7}, "records[1].hook"),
    ("kind", {"kind": 4}, "records[1].kind"),
    ("protocol", {"protocol": 256}, "records[1].protocol 256"),
    ("source-port", {"source_port": 65536}, "records[1].source_port 65536 is not a port"),
    ("destination-port", {"destination_port": 2**32 - 1}, "records[1].destination_port"),
    ("dialed-port", {"dialed_port": 70000}, "records[1].dialed_port"),
    ("address-text", {"source_address": "not-an-ip"}, "records[1].source_address 'not-an-ip' is not an IPv4"),
    ("address-long", {"destination_address": "1" * 100}, "records[1].destination_address is 100 characters"),
    ("address-5-bytes", {"dialed_address": "1.2.3.4.5"}, "records[1].dialed_address"),
    ("address-zone", {"source_address": "fe80::1%eth0"}, "records[1].source_address 'fe80::1%eth0' has a zone"),
    ("bytes", {"bytes_sent": 2**64 - 1}, "records[1].bytes_sent is out of range"),
    ("packets", {"packets_received": 2**63}, "records[1].packets_received"),
    ("duration", {"duration_ns": 2**63}, "records[1].duration_ns"),
    ("count", {"count": 2**63}, "records[1].count is out of range"),
    ("pid", {"pid": 2**32 - 1}, "records[1].pid"),
    ("time-huge", {"start_time_unix_nano": 2**64 - 1, "end_time_unix_nano": 2**64 - 1}, "out of range"),
    ("time-1970", {"start_time_unix_nano": 5, "end_time_unix_nano": 6}, "before 2000-01-01"),
    ("time-future", {"end_time_unix_nano": 2**62}, "more than 7 days after the collector's clock"),
    ("end-before-start", {"start_time_unix_nano": NOW + 10, "end_time_unix_nano": NOW}, "before start"),
]


@pytest.mark.parametrize("fields, message", [(f, m) for _, f, m in BAD_FIELDS], ids=[i for i, _, _ in BAD_FIELDS])
def test_each_field_is_checked(srv: CollectorServer, fields: dict[str, object], message: str) -> None:
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        err = rpc_error(lambda: stub.Push(batch("a", 1, [record(0), record(1, **fields)]), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert message in err.details()
        assert srv.store.count() == 0  # not even the good record of the batch
        assert stub.Push(batch("a", 1, [record(0)]), timeout=5).accepted == 1  # refused is not "seen"
    assert rejected(srv, "invalid") == 1


def test_unknown_fields_cannot_smuggle_a_large_record(srv: CollectorServer) -> None:
    rec = record(1).SerializeToString() + b"\xfa\x07" + bytes([0x80, 0x40]) + b"z" * 8192  # field 127, 8 KiB
    raw = collector_pb2.FlowBatch(agent_id="a", sequence=1).SerializeToString() + b"\x1a" + _varint(len(rec)) + rec
    ch, _ = stub_for(str(srv.address), token=TOKEN)
    with ch:
        push = ch.unary_unary("/aimesh.v1.FlowCollector/Push", request_serializer=None,
                              response_deserializer=collector_pb2.PushReply.FromString)  # fmt: skip
        err = rpc_error(lambda: push(raw, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "records[0].(record) is" in err.details()
    assert srv.store.count() == 0


def test_edge_values_are_accepted(srv: CollectorServer) -> None:
    ok = record(1, source_address="::1", destination_address="2001:db8::ffff:1.2.3.4", dialed_address="10.0.0.1",
                source_port=65535, protocol=1, comm="\x1b[31mred", pid=1 << 22, verdict=flow_pb2.VERDICT_REDIRECTED,
                reason=flow_pb2.REASON_REPLY, kind=flow_pb2.RECORD_KIND_DECISION, start_time_unix_nano=0,
                end_time_unix_nano=0, bytes_sent=2**63 - 1)  # fmt: skip
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        assert stub.Push(batch("a", 1, [ok]), timeout=5).accepted == 1  # a process may name itself anything


def test_reused_sequence_with_other_records_is_refused_and_counted(srv: CollectorServer) -> None:
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        first = batch("a", 7, [record(1), record(2)])
        assert stub.Push(first, timeout=5).accepted == 2
        again = stub.Push(first, timeout=5)
        assert again.duplicate and again.accepted == 0  # an idempotent retry
        err = rpc_error(lambda: stub.Push(batch("a", 7, [record(3)]), timeout=5))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "a/7 was stored before with different records" in err.details()
        assert stub.Push(batch("b", 7, [record(3)]), timeout=5).accepted == 1  # the key is per agent
        assert sorted(r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)) == [1, 2, 3]
    assert rejected(srv, "conflict") == 1
    assert srv.registry.get_sample_value("aimesh_collector_batches_total", {"result": "duplicate"}) == 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


VALID = batch("a", 1, [record(1, comm="curl", source_address="10.0.0.1")]).SerializeToString()
RAW_CASES = {
    "truncated-varint": b"\x10\xff\xff",
    "wrong-wire-type": b"\x0d\x00\x00\x00\x00",  # agent_id as fixed32
    "bad-utf8-agent-id": b"\x0a\x02\xc3\x28",
    "bad-utf8-comm": b"\x0a\x01a\x1a\x04\x8a\x02\xff\xfe",
    "length-past-end": b"\x0a\x7fabc",
    "huge-length": b"\x1a\xff\xff\xff\xff\x0f",
    "field-zero": b"\x00\x01",
    "group-start-no-end": b"\x1b",
    "record-garbage": b"\x0a\x01a\x1a\x05\xff\xff\xff\xff\xff",
    "deep-nesting": b"\x1a\x03\x42\x01\x42" * 50,
    "empty": b"",
    "truncated-valid": VALID[: len(VALID) // 2],
    "zeros": bytes(64),
}


@pytest.mark.parametrize("raw", list(RAW_CASES.values()), ids=list(RAW_CASES))
def test_bytes_that_are_not_a_batch(srv: CollectorServer, raw: bytes) -> None:
    ch, _ = stub_for(str(srv.address), token=TOKEN)
    with ch:
        push = ch.unary_unary("/aimesh.v1.FlowCollector/Push", request_serializer=None,
                              response_deserializer=collector_pb2.PushReply.FromString)  # fmt: skip
        err = rpc_error(lambda: push(raw, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details()  # a reason, not gRPC's bare INTERNAL
        assert push(VALID, timeout=5).accepted == 1  # still serving
    assert srv.store.count() == 1


@pytest.mark.parametrize("seed", range(6))
def test_mutated_batches_store_nothing_bad(srv: CollectorServer, seed: int) -> None:
    """Random bytes flipped, inserted, cut in a valid batch: whatever the collector accepts passes every check."""
    rng = random.Random(seed)
    base = batch("a", 0, [record(i, comm="py", source_address="10.0.0.1", destination_port=80,
                                 source=flow_pb2.Identity(name="ui", kind="agent")) for i in range(3)])  # fmt: skip
    ch, _ = stub_for(str(srv.address), token=TOKEN)
    codes: set[grpc.StatusCode] = set()
    with ch:
        push = ch.unary_unary("/aimesh.v1.FlowCollector/Push", request_serializer=None,
                              response_deserializer=collector_pb2.PushReply.FromString)  # fmt: skip
        for n in range(40):
            base.sequence = seed * 1000 + n
            data = bytearray(base.SerializeToString())
            for _ in range(rng.randint(1, 4)):
                op, at = rng.choice("fic"), rng.randrange(len(data))
                if op == "f":
                    data[at] = rng.randrange(256)
                elif op == "i":
                    data[at:at] = rng.randbytes(rng.randint(1, 8))
                else:
                    del data[at:]
                    if not data:
                        data = bytearray(b"\xff")
            try:
                push(bytes(data), timeout=5)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), e.details()  # type: ignore[attr-defined]
                assert e.details()  # type: ignore[attr-defined]
                codes.add(e.code())  # type: ignore[attr-defined]
        assert push(VALID, timeout=5).accepted == 1
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    all_stored_records_are_valid(srv)
    for f in srv.store.iter_flows(FlowFilter()):
        assert flow_pb2.FlowRecord.FromString(f.payload).agent_id == "a"


def test_a_flood_of_streams_cannot_starve_push(tmp_dir: Path) -> None:
    limits = ServiceLimits(max_streams=8, max_followers=8)
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token=TOKEN, grace_s=0.2,
                                          max_workers=16, limits=limits))  # fmt: skip
    srv.start()
    addr = str(srv.address)
    held: list[object] = []
    busy: list[str] = []
    lock = threading.Lock()
    channels = []
    try:
        def open_stream(k: int) -> None:
            ch, stub = stub_for(addr, token=TOKEN)
            channels.append(ch)
            if k % 2:
                stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            else:
                stream = stub.Follow(collector_pb2.FlowQuery(limit=1))
            try:
                next(stream)  # the handler runs: it holds a worker thread
                with lock:
                    held.append(stream)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()  # type: ignore[attr-defined]
                with lock:
                    busy.append(e.details())  # type: ignore[attr-defined]

        ch, stub = stub_for(addr, token=TOKEN)
        with ch:
            stub.Push(batch("a", 1, [record(1)]), timeout=10)  # a backlog for the followers' first message
            openers = [threading.Thread(target=open_stream, args=(k,)) for k in range(48)]
            for t in openers:
                t.start()
            for t in openers:
                t.join(60)
            assert len(held) == 8 and len(busy) == 40
            assert all("already serves 8 streams" in b for b in busy)
            # Every worker a stream may take is taken; pushes still go through.
            for seq in range(2, 40):
                assert stub.Push(batch("a", seq, [record(seq)]), timeout=20).accepted == 1
            assert rejected(srv, "busy") == 40
    finally:
        for s in held:
            s.cancel()  # type: ignore[attr-defined]
        for c in channels:
            c.close()
        srv.stop(0)


def test_max_streams_must_leave_workers_for_pushes(tmp_dir: Path) -> None:
    from agent.collector.channel import ConfigError

    with pytest.raises(ConfigError, match="max_streams"):
        CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", max_workers=16,
                                        limits=ServiceLimits(max_streams=9, max_followers=8)))  # fmt: skip
