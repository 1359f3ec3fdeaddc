"""PushCalls / ListCalls / FollowCalls over real gRPC on 127.0.0.1: exactly-once, validation, auth, filters, follow."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest

from tests.unit.calls_testlib import AUTH, T0, TOKEN, StartFn, call, call_batch, ident, start, tmp_dir  # noqa: F401
from tests.unit.collector_testlib import batch, record, stub_for, wait_until
from agent._gen.aimesh.v1 import collector_pb2, model_call_pb2
from agent.collector.calls import call_problem
from agent.collector.server import CollectorServer
from agent.collector.service import ServiceLimits, validate_batch


def rpc_error(fn) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value  # type: ignore[return-value]


def cookies(stub, **query: object) -> list[int]:  # type: ignore[no-untyped-def]
    q = collector_pb2.CallQuery(**query)  # type: ignore[arg-type]
    return [c.cookie for c in stub.ListCalls(q, metadata=AUTH, timeout=5)]


def stored(srv: CollectorServer, name: str, labels: dict[str, str] | None = None) -> float:
    return srv.registry.get_sample_value(name, labels or {}) or 0.0


def test_push_is_exactly_once_and_apart_from_flow_batches(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address))
    with ch:
        b = call_batch("node-a", 7, [call(1), call(2)])
        assert stub.PushCalls(b, metadata=AUTH, timeout=5).accepted == 2
        again = stub.PushCalls(b, metadata=AUTH, timeout=5)
        assert again.duplicate and again.accepted == 0
        other = call_batch("node-a", 7, [call(3)])
        err = rpc_error(lambda: stub.PushCalls(other, metadata=AUTH, timeout=5))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "node-a/7" in err.details()
        # the same (agent, sequence) for flows is its own key
        assert stub.Push(batch("node-a", 7, [record(1)]), metadata=AUTH, timeout=5).accepted == 1
        assert cookies(stub) == [1, 2]
    assert stored(srv, "aimesh_collector_model_calls_total") == 2
    assert stored(srv, "aimesh_collector_call_batches_total", {"result": "duplicate"}) == 1
    assert stored(srv, "aimesh_collector_records_total") == 1


@pytest.mark.parametrize("fields,named", [
    ({"status": 700}, "calls[0].status 700 is not an HTTP status"),
    ({"confidence_mean": 1.5}, "calls[0].confidence_mean 1.5 is not a probability"),
    ({"confidence_min": math.nan}, "calls[0].confidence_min nan is not a probability"),
    ({"temperature": -1.0}, "calls[0].temperature -1.0 is out of range"),
    ({"request_digest": "xyz"}, "calls[0].request_digest is not a sha256 digest"),
    ({"request_model": "m" * 300}, "calls[0].request_model is 300 characters, at most 253"),
    ({"error_type": "a\x1bb"}, "calls[0].error_type contains control characters"),
    ({"protocol": 42}, "calls[0].protocol 42 is not a known value"),
    ({"finish_reasons": ["stop"] * 65}, "calls[0].finish_reasons has 65 entries"),
    ({"prompt_text": "x" * (65 << 10)}, "calls[0].prompt_text is 66560 characters"),
    ({"start_time_unix_nano": 5}, "calls[0].start_time_unix_nano 5 is before 2000-01-01"),
    ({"input_tokens": 1 << 63}, "calls[0].input_tokens is out of range"),
    ({"agent_id": "node-b"}, "calls[0].agent_id 'node-b' is not the batch's agent_id"),
])  # fmt: skip
def test_invalid_calls_are_refused_naming_the_field(start: StartFn, fields: dict[str, object], named: str) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address))
    with ch:
        err = rpc_error(lambda: stub.PushCalls(call_batch("node-a", 1, [call(1, **fields)]), metadata=AUTH,
                                               timeout=5))  # fmt: skip
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in err.details()
        assert cookies(stub) == []


def test_valid_edges_pass() -> None:
    now = T0
    assert call_problem(call(1, status=100, confidence_mean=0.0, confidence_min=1.0, temperature=0.0), now) is None
    assert call_problem(model_call_pb2.ModelCall(), now) is None  # everything unknown is still a call
    assert call_problem(call(1, prompt_text="line\nwith\ttabs"), now) is None  # text may hold control characters


def test_batch_limits_count_calls() -> None:
    rej = validate_batch(call_batch("a", 1, [call(i) for i in range(3)]), ServiceLimits(max_batch_records=2), T0)
    assert rej is not None and rej.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 calls" in rej.message


def test_auth_guards_the_call_methods(start: StartFn) -> None:
    agent_token = "agent-a-token-0123456789"
    srv = start(agent_tokens={agent_token: "node-a"})
    ch, stub = stub_for(str(srv.address))
    as_agent = (("authorization", f"Bearer {agent_token}"),)
    with ch:
        err = rpc_error(lambda: stub.PushCalls(call_batch("node-a", 1, [call(1)]), timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.PushCalls(call_batch("node-a", 1, [call(1)]), metadata=as_agent, timeout=5).accepted == 1
        err = rpc_error(lambda: stub.PushCalls(call_batch("node-b", 1, [call(2)]), metadata=as_agent, timeout=5))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "node-b" in err.details()
        err = rpc_error(lambda: list(stub.ListCalls(collector_pb2.CallQuery(), metadata=as_agent, timeout=5)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = rpc_error(lambda: list(stub.ListCalls(collector_pb2.CallQuery(), timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert cookies(stub) == [1]


def test_garbage_request_is_invalid_argument(start: StartFn) -> None:
    srv = start()
    ch, _ = stub_for(str(srv.address))
    with ch:
        raw = ch.unary_unary("/aimesh.v1.FlowCollector/PushCalls", request_serializer=None,
                             response_deserializer=None)  # fmt: skip
        err = rpc_error(lambda: raw(b"\xff\xff\xff", metadata=AUTH, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "aimesh.v1.ModelCallBatch" in err.details()


def test_list_filters(start: StartFn) -> None:
    srv = start()
    calls = [
        call(1, request_model="gpt-4o", response_model="gpt-4o-2024", status=200),
        call(2, source=ident("batch", "agent"), request_model="llama3", status=429, error_type="rate_limited"),
        call(3, destination=ident("gw", "external"), actual_destination=ident("llm", "model", "v2"),
             request_model="gpt-4o", status=503),
        model_call_pb2.ModelCall(cookie=4, start_time_unix_nano=T0 + 4 * 10**9, source=ident("chat-ui"),
                                 protocol=1, operation=1, request_model="gpt-4o"),  # no response
    ]  # fmt: skip
    ch, stub = stub_for(str(srv.address))
    with ch:
        stub.PushCalls(call_batch("node-a", 1, calls), metadata=AUTH, timeout=5)
        assert cookies(stub) == [1, 2, 3, 4]
        assert cookies(stub, limit=2) == [3, 4]
        assert cookies(stub, model="gpt-4o") == [1, 3, 4]
        assert cookies(stub, model="gpt-4o-2024") == [1]  # the response model matches too
        assert cookies(stub, source=collector_pb2.IdentityMatch(name="batch")) == [2]
        assert cookies(stub, destination=collector_pb2.IdentityMatch(name="llm", version="v2")) == [3]
        assert cookies(stub, statuses=[collector_pb2.StatusRange(min=400, max=599)]) == [2, 3]
        assert cookies(stub, statuses=[collector_pb2.StatusRange(min=0, max=0)]) == [4]
        # call time is the end (start + duration): call 1 ends at T0 + 1.2 s
        assert cookies(stub, since_unix_nano=T0 + 1_100_000_000, until_unix_nano=T0 + 3 * 10**9) == [1, 2]
        assert cookies(stub, agent_id="node-z") == []


def test_follow_sends_backlog_then_new_calls(start: StartFn) -> None:
    srv = start()
    ch, stub = stub_for(str(srv.address))
    with ch:
        stub.PushCalls(call_batch("node-a", 1, [call(1), call(2, request_model="other")]), metadata=AUTH, timeout=5)
        stream = stub.FollowCalls(collector_pb2.CallQuery(model="gpt-4o", limit=5), metadata=AUTH)
        got: list[int] = []

        def read() -> None:
            try:
                for c in stream:
                    got.append(c.cookie)
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert wait_until(lambda: got == [1])
            stub.PushCalls(call_batch("node-a", 2, [call(3, request_model="other"), call(4)]), metadata=AUTH,
                           timeout=5)  # fmt: skip
            assert wait_until(lambda: got == [1, 4]), got
        finally:
            stream.cancel()
            reader.join(10)
        assert not reader.is_alive()


def test_retention_by_age_uses_receive_time(start: StartFn) -> None:
    from agent.collector.store import RetentionPolicy

    srv = start(retention=RetentionPolicy(max_age_ns=3600 * 10**9))
    old, new = time.time_ns() - 2 * 3600 * 10**9, time.time_ns()
    srv.store.insert_call_batch("node-a", 1, [], old)  # a key only
    from agent.collector.calls import call_row

    srv.store.insert_call_batch("node-a", 2, [call_row(call(1), "node-a", old)], old)
    srv.store.insert_call_batch("node-a", 3, [call_row(call(2, start_time_unix_nano=0), "node-a", new)], new)
    srv.run_retention()
    ch, stub = stub_for(str(srv.address))
    with ch:
        assert cookies(stub) == [2]
    assert stored(srv, "aimesh_collector_retention_deleted_model_calls_total", {"by": "age"}) == 1
