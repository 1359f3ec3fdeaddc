"""The collector over real gRPC on 127.0.0.1: pushes, idempotency, validation, tokens, garbage, listing, following."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.collector_testlib import batch, record, stub_for, tmp_dir, wait_until  # noqa: F401 (fixture)
from agent._gen.aimesh.v1 import collector_pb2, flow_pb2
from agent._gen.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.collector.server import CollectorConfig, CollectorServer, ServerError, transport_limit
from agent.collector.service import MD_MAX_RECORDS, ServiceLimits, bearer_token, validate_batch
from agent.collector.channel import ConfigError

TOKEN = "t0ken-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)

StartFn = Callable[..., CollectorServer]


@pytest.fixture
def start(tmp_dir: Path) -> Iterator[StartFn]:
    servers: list[CollectorServer] = []

    def _start(**overrides: object) -> CollectorServer:
        fields: dict[str, object] = {"listen": "127.0.0.1:0", "db": tmp_dir / "flows.db", "grace_s": 0.5,
                                     "token": TOKEN}
        fields.update(overrides)
        srv = CollectorServer(CollectorConfig(**fields))  # type: ignore[arg-type]
        srv.start()
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop(0)


def rejected(srv: CollectorServer, reason: str) -> float:
    return srv.registry.get_sample_value("aimesh_collector_rejected_requests_total", {"reason": reason}) or 0.0


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value  # type: ignore[return-value]


def test_push_and_list_round_trip(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        rec = record(1, source=flow_pb2.Identity(name="ui", kind="agent", version="v1"), bytes_sent=10, comm="curl")
        reply = stub.Push(batch("node-a", 1, [rec, record(2)]), timeout=5)
        assert (reply.accepted, reply.duplicate) == (2, False)
        got = list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5))
    assert [r.cookie for r in got] == [1, 2]
    expected = flow_pb2.FlowRecord()
    expected.CopyFrom(rec)
    expected.agent_id = "node-a"  # filled from the batch
    assert got[0] == expected
    assert srv.registry.get_sample_value("aimesh_collector_records_total") == 2


def test_retried_batch_is_stored_once(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        b = batch("node-a", 2**64 - 1, [record(i) for i in range(5)])
        assert not stub.Push(b, timeout=5).duplicate
        again = stub.Push(b, timeout=5)
        assert (again.accepted, again.duplicate) == (0, True)
        assert not stub.Push(batch("node-b", 2**64 - 1, [record(9)]), timeout=5).duplicate  # other agent
        cookies = [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)]
    assert sorted(cookies) == [0, 1, 2, 3, 4, 9]
    assert srv.registry.get_sample_value("aimesh_collector_batches_total", {"result": "duplicate"}) == 1


def test_missing_agent_id(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        err = rpc_error(lambda: stub.Push(batch("", 1, [record(1)]), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "agent_id is required" in err.details()
        err = rpc_error(lambda: stub.Push(batch("   ", 1, [record(1)]), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = rpc_error(lambda: stub.Push(batch("x" * 300, 1, [record(1)]), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in err.details()
    assert rejected(srv, "invalid") == 3


def test_bad_record_times(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        bad = record(1, start_time_unix_nano=10, end_time_unix_nano=5)
        err = rpc_error(lambda: stub.Push(batch("a", 1, [record(0), bad]), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "records[1]" in err.details()
        huge = record(1, start_time_unix_nano=2**64 - 1, end_time_unix_nano=2**64 - 1)
        err = rpc_error(lambda: stub.Push(batch("a", 2, [huge]), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.details()
        assert list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)) == []  # nothing of either batch stored
        assert not stub.Push(batch("a", 1, [record(0)]), timeout=5).duplicate  # a refused batch is not "seen"


def test_too_many_records_and_bytes(start: StartFn) -> None:
    srv = start(limits=ServiceLimits(max_batch_records=10, max_batch_bytes=4096))
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        err = rpc_error(lambda: stub.Push(batch("a", 1, [record(i) for i in range(11)]), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "11 records, the limit is 10" in err.details()
        assert dict(err.trailing_metadata())[MD_MAX_RECORDS] == "10"
        big = [record(i, comm="x" * 1000) for i in range(5)]
        err = rpc_error(lambda: stub.Push(batch("a", 2, big), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 4096 bytes" in err.details()
        # Beyond the transport limit, gRPC refuses the message before it is parsed.
        huge = [record(0, comm="y" * (transport_limit(ServiceLimits(max_batch_bytes=4096)) + 10))]
        err = rpc_error(lambda: stub.Push(batch("a", 3, huge), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Push(batch("a", 4, [record(1)]), timeout=5).accepted == 1  # still serving
    assert rejected(srv, "too_large") == 2


def test_token_required(start: StartFn) -> None:
    srv = start(token=TOKEN)
    addr = str(srv.address)
    ch, stub = stub_for(addr)
    with ch:
        err = rpc_error(lambda: stub.Push(batch("a", 1, [record(1)]), timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in err.details()
        wrong = (("authorization", "Bearer nope"),)
        err = rpc_error(lambda: stub.Push(batch("a", 1, [record(1)]), metadata=wrong, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in err.details()
        err = rpc_error(lambda: list(stub.ListFlows(collector_pb2.FlowQuery(), metadata=wrong, timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = rpc_error(lambda: list(stub.Follow(collector_pb2.FlowQuery(), timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        basic = (("authorization", f"Basic {TOKEN}"),)
        assert rpc_error(lambda: stub.Push(batch("a", 1, []), metadata=basic, timeout=5)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.Push(batch("a", 1, [record(1)]), metadata=AUTH, timeout=5).accepted == 1
        lower = (("authorization", f"bearer {TOKEN}"),)
        assert [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), metadata=lower, timeout=5)] == [1]
        # Health checks need no token (probes).
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert rejected(srv, "unauthenticated") == 5


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", b"BEARER  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("x", "Bearer abc")]) is None


def test_malformed_request_bytes(start: StartFn) -> None:
    srv = start()
    ch, _ = stub_for(str(srv.address), token=TOKEN)
    with ch:
        raw = ch.unary_unary("/aimesh.v1.FlowCollector/Push", request_serializer=None,
                             response_deserializer=collector_pb2.PushReply.FromString)  # fmt: skip
        err = rpc_error(lambda: raw(b"\xff\xff\xff\xff\xff", timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid aimesh.v1.FlowBatch" in err.details()
        raw_list = ch.unary_stream("/aimesh.v1.FlowCollector/ListFlows", request_serializer=None,
                                   response_deserializer=flow_pb2.FlowRecord.FromString)  # fmt: skip
        err = rpc_error(lambda: list(raw_list(b"\x0a\xff", timeout=5)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        unknown = ch.unary_unary("/aimesh.v1.FlowCollector/Nope", request_serializer=None, response_deserializer=None)
        assert rpc_error(lambda: unknown(b"", timeout=5)).code() == grpc.StatusCode.UNIMPLEMENTED
        assert raw(batch("a", 1, [record(1)]).SerializeToString(), timeout=5).accepted == 1
    assert rejected(srv, "malformed") == 2


def _garbage(port: int, payload: bytes, *, wait_reply: bool = True) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        if wait_reply:
            s.settimeout(2)
            try:
                while s.recv(4096):
                    pass
            except (TimeoutError, OSError):
                pass


def test_keeps_serving_after_tcp_garbage(start: StartFn) -> None:
    srv = start(token=TOKEN)
    port = srv.address.port
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)  # a connection that never speaks
    try:
        _garbage(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _garbage(port, bytes(range(256)) * 64)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        _garbage(port, preface + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + b"\xde\xad" * 500)  # a bad frame
        _garbage(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100)  # a TLS hello to plaintext
        _garbage(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", wait_reply=False)  # preface, then hang up
        ch, stub = stub_for(f"127.0.0.1:{port}")
        with ch:
            assert stub.Push(batch("a", 1, [record(1)]), metadata=AUTH, timeout=5).accepted == 1
            assert [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), metadata=AUTH, timeout=5)] == [1]
    finally:
        idle.close()


def test_list_filters_and_limit(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    ui = flow_pb2.Identity(name="ui", kind="agent", version="v1")
    llm1 = flow_pb2.Identity(name="llm", kind="model", version="v1")
    llm2 = flow_pb2.Identity(name="llm", kind="model", version="v2")
    db = flow_pb2.Identity(name="db", kind="tool")
    recs = [
        record(1, source=ui, destination=llm1, actual_destination=llm1),
        record(2, source=ui, destination=llm1, actual_destination=llm2, verdict=flow_pb2.VERDICT_REDIRECTED),
        record(3, source=ui, destination=db, actual_destination=db, verdict=flow_pb2.VERDICT_DENIED),
        record(4, source=db, destination=llm2, actual_destination=llm2, verdict=flow_pb2.VERDICT_AUDIT),
    ]
    with ch:
        stub.Push(batch("a", 1, recs), timeout=5)

        def q(**kw: object) -> list[int]:
            query = collector_pb2.FlowQuery(**kw)  # type: ignore[arg-type]
            return [r.cookie for r in stub.ListFlows(query, timeout=5)]

        assert q() == [1, 2, 3, 4]
        assert q(limit=2) == [3, 4]
        assert q(source=collector_pb2.IdentityMatch(name="ui")) == [1, 2, 3]
        assert q(destination=collector_pb2.IdentityMatch(name="llm", version="v2")) == [2, 4]
        assert q(destination=collector_pb2.IdentityMatch(kind="tool")) == [3]
        assert q(verdicts=[flow_pb2.VERDICT_DENIED, flow_pb2.VERDICT_AUDIT]) == [3, 4]
        t = recs[1].end_time_unix_nano
        assert q(since_unix_nano=t) == [2, 3, 4]
        assert q(since_unix_nano=t, until_unix_nano=t + 1) == [2]
        assert q(agent_id="other") == []


def test_follow_streams_new_flows(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        stub.Push(batch("a", 1, [record(1), record(2, source=flow_pb2.Identity(name="ui"))]), timeout=5)
        query = collector_pb2.FlowQuery(source=collector_pb2.IdentityMatch(name="ui"), limit=5)
        stream = stub.Follow(query)
        got: list[int] = []
        reader = threading.Thread(target=lambda: [got.append(r.cookie) for r in _until_cancelled(stream)])
        reader.start()
        try:
            assert wait_until(lambda: got == [2], 5)  # the backlog
            second = batch("a", 2, [record(3), record(4, source=flow_pb2.Identity(name="ui"))])
            stub.Push(second, timeout=5)
            assert wait_until(lambda: got == [2, 4], 5)
            assert stub.Push(second, timeout=5).duplicate  # a retry: nothing new to follow
            stub.Push(batch("a", 3, [record(5, source=flow_pb2.Identity(name="ui"))]), timeout=5)
            assert wait_until(lambda: got == [2, 4, 5], 5)
        finally:
            stream.cancel()
            reader.join(5)
        assert not reader.is_alive()


def _until_cancelled(stream: Iterator[flow_pb2.FlowRecord]) -> Iterator[flow_pb2.FlowRecord]:
    try:
        yield from stream
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            raise


def test_follow_since_sends_the_backlog_first(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        stub.Push(batch("a", 1, [record(1), record(2), record(3)]), timeout=5)
        stream = stub.Follow(collector_pb2.FlowQuery(since_unix_nano=record(2).end_time_unix_nano))
        try:
            assert [next(stream).cookie for _ in range(2)] == [2, 3]
            stub.Push(batch("a", 2, [record(4)]), timeout=5)
            assert next(stream).cookie == 4
        finally:
            stream.cancel()


def test_follower_limit_and_shutdown_ends_streams(start: StartFn) -> None:
    srv = start(limits=ServiceLimits(max_followers=1))
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    with ch:
        stub.Push(batch("a", 1, [record(1)]), timeout=5)
        first = stub.Follow(collector_pb2.FlowQuery(limit=1))
        assert next(first).cookie == 1  # the server-side handler is running
        second = stub.Follow(collector_pb2.FlowQuery())
        err = rpc_error(lambda: next(second))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "follow streams" in err.details()
        assert rejected(srv, "busy") == 1
        t0 = time.monotonic()
        srv.stop(grace=5)
        assert time.monotonic() - t0 < 3  # the open follower did not hold the shutdown for the whole grace
        assert list(_until_cancelled(first)) == []


def test_health_check_and_watch(start: StartFn) -> None:
    srv = start()
    ch, _ = stub_for(str(srv.address), token=TOKEN)
    with ch:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        request = health_pb2.HealthCheckRequest(service="aimesh.v1.FlowCollector")
        assert health.Check(request, timeout=5).status == serving
        err = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="nope"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == serving
        srv.stop(grace=2)
        statuses = [r.status for r in _until_cancelled(watch)]
        assert statuses in ([], [health_pb2.HealthCheckResponse.NOT_SERVING])


def test_port_in_use_is_an_error(start: StartFn, tmp_dir: Path) -> None:
    srv = start()
    with pytest.raises(ServerError, match="cannot listen"):
        start(listen=str(srv.address), db=tmp_dir / "other.db")


def test_bad_config(tmp_dir: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        CollectorServer(CollectorConfig(listen="nope", db=tmp_dir / "f.db"))
    with pytest.raises(ConfigError, match="max_followers"):
        CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", max_workers=4,
                                        limits=ServiceLimits(max_followers=4)))  # fmt: skip


def test_store_survives_restart(start: StartFn, tmp_dir: Path) -> None:
    srv = start()
    addr = str(srv.address)
    ch, stub = stub_for(addr, token=TOKEN)
    with ch:
        stub.Push(batch("a", 1, [record(1)]), timeout=5)
    srv.stop(0)
    srv2 = start(listen=addr)
    ch, stub = stub_for(str(srv2.address), token=TOKEN)
    with ch:
        assert stub.Push(batch("a", 1, [record(1)]), timeout=5).duplicate
        assert [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)] == [1]


def test_retention_runs_in_the_background(start: StartFn) -> None:
    from agent.collector.service import flow_row
    from agent.collector.store import RetentionPolicy

    hour = 3600 * 10**9
    srv = start(retention=RetentionPolicy(max_age_ns=hour), retention_interval_s=0.1)
    ch, stub = stub_for(str(srv.address), token=TOKEN)
    now = time.time_ns()
    with ch:
        # Received two hours ago (by the collector's clock): retention takes it whatever the record's own times.
        srv.store.insert_batch("a", 1, [flow_row(record(1, start_time_unix_nano=now, end_time_unix_nano=now), "a",
                                                 now - 2 * hour)], received_ns=now - 2 * hour)  # fmt: skip
        stub.Push(batch("a", 2, [record(2, start_time_unix_nano=now, end_time_unix_nano=now)]), timeout=5)
        # Two whole background passes, the second begun after both rows were in: seeing the row gone is not enough
        # (the pass deletes it, then counts it), nor is a fixed wait on a loaded machine.
        assert srv.wait_retention_passes(2, timeout=60)
        assert [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)] == [2]
    assert srv.registry.get_sample_value("aimesh_collector_retention_deleted_records_total", {"by": "age"}) == 1
    assert (srv.registry.get_sample_value("aimesh_collector_store_data_bytes") or 0) > 0


def test_validate_batch_is_pure() -> None:
    limits = ServiceLimits(max_batch_records=2)
    assert validate_batch(batch("a", 1, [record(1)]), limits) is None
    r = validate_batch(batch("a", 1, [record(1)] * 3), limits)
    assert r is not None and r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and r.reason == "too_large"


def test_serve_until_stopped_with_metrics(tmp_dir: Path) -> None:
    import urllib.request

    from agent.collector.server import serve

    with socket.socket() as s:  # a free port for the metrics endpoint
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    stop = threading.Event()
    ready: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve("127.0.0.1:0", tmp_dir / "f.db", metrics_listen=f"127.0.0.1:{metrics_port}", stop=stop,
                  on_ready=lambda a: ready.append(str(a)))  # fmt: skip
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert wait_until(lambda: bool(ready) or bool(errors), 10) and not errors
        token_file = tmp_dir / "f.db.token"  # no authentication chosen: serve() made one beside the database
        assert token_file.stat().st_mode & 0o777 == 0o600
        ch, stub = stub_for(ready[0], token=token_file.read_text().strip())
        with ch:
            stub.Push(batch("a", 1, [record(1)]), timeout=5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "aimesh_collector_records_total 1.0" in text
        assert 'aimesh_collector_batches_total{result="stored"} 1.0' in text
        assert "aimesh_collector_store_data_bytes" in text
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and not errors
