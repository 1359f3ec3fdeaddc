"""agent/export/model_calls.py: a ModelCallRecord survives to_proto -> PushCalls -> ListCalls -> from_proto against a
real collector, unknown stays unknown (None, not 0), and a value that does not fit is named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.unit.calls_testlib import AUTH, StartFn, start, tmp_dir  # noqa: F401  (fixtures)
from tests.unit.collector_testlib import stub_for
from agent._gen.aimesh.v1 import collector_pb2, model_call_pb2
from agent.export.model_calls import CallContext, from_proto, to_proto
from agent.flows.model import IdentityData
from agent.l7.http1 import Direction
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ConnectionDecoder, ModelCallRecord

MONO_TO_WALL = 1_764_000_000_000_000_000 - 5_000_000_000  # kernel clock 5 s after boot = T0
SRC = IdentityData("chat-ui", "agent", "v1")
DST = IdentityData("llm", "model", "v1")
ACT = IdentityData("llm", "model", "v2")


def full_record(**changes: object) -> ModelCallRecord:
    rec = ModelCallRecord(
        conn_key=0xDEADBEEF12345678, sequence=3, start_ns=5_000_000_000, protocol=Protocol.ANTHROPIC,
        operation=Operation.MESSAGES, request_model="claude-x", response_model="claude-x-2025", stream=True,
        status=429, error_type="rate_limit_error", input_tokens=0, output_tokens=17, cached_tokens=4,
        time_to_first_chunk_ns=1234, duration_ns=987654, time_per_output_chunk_ns=55, output_chunks=18,
        finish_reasons=("end_turn", "max_tokens"), request_bytes=4096, response_bytes=2048, tls=True, truncated=True,
        incomplete=False, confidence_mean=0.875, confidence_min=0.125, request_digest="0f" * 32, max_tokens=256,
        temperature=0.7, include_usage=True, prompt_text="hello [REDACTED]", completion_text="hi\nthere",
    )  # fmt: skip
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


def unknown_record() -> ModelCallRecord:
    """Everything the decoder may not know left unknown."""
    return full_record(request_model=None, response_model=None, status=None, error_type=None, input_tokens=None,
                       output_tokens=None, cached_tokens=None, time_to_first_chunk_ns=None, duration_ns=None,
                       time_per_output_chunk_ns=None, finish_reasons=(), confidence_mean=None, confidence_min=None,
                       max_tokens=None, temperature=None, include_usage=None, prompt_text=None,
                       completion_text=None, stream=False, tls=False, truncated=False, incomplete=True)  # fmt: skip


def round_trip(start: StartFn, records: list[ModelCallRecord]) -> list[tuple[ModelCallRecord, CallContext]]:
    srv = start()
    msgs = [to_proto(r, SRC, DST, ACT, pid=4242, comm="python3", agent_id="node-a", node="host-1",
                     mono_to_wall_ns=MONO_TO_WALL) for r in records]  # fmt: skip
    ch, stub = stub_for(str(srv.address))
    with ch:
        reply = stub.PushCalls(collector_pb2.ModelCallBatch(agent_id="node-a", sequence=1, calls=msgs),
                               metadata=AUTH, timeout=5)  # fmt: skip
        assert reply.accepted == len(records) and not reply.duplicate
        got = list(stub.ListCalls(collector_pb2.CallQuery(), metadata=AUTH, timeout=5))
    return [from_proto(m, MONO_TO_WALL) for m in got]


def test_a_full_record_survives_push_and_list(start: StartFn) -> None:
    rec = full_record()
    ((back, ctx),) = round_trip(start, [rec])
    assert back == rec
    assert ctx == CallContext(source=SRC, destination=DST, actual_destination=ACT, cookie=rec.conn_key, pid=4242,
                              comm="python3", agent_id="node-a", node="host-1")  # fmt: skip


def test_unknown_stays_unknown_and_zero_stays_zero(start: StartFn) -> None:
    unknown, zero = unknown_record(), full_record(conn_key=7, input_tokens=0, output_tokens=0, status=200)
    (u, _), (z, _) = round_trip(start, [unknown, dataclasses.replace(zero, start_ns=6_000_000_000)])
    assert u == unknown and u.input_tokens is None and u.status is None and u.request_model is None
    assert z.input_tokens == 0 and z.output_tokens == 0


def test_a_decoded_call_survives(start: StartFn) -> None:
    """A record the real decoder made from wire bytes, not one built by hand."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "m1", "stream": False}).encode()
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    out = json.dumps({"model": "m1-x", "choices": [{"finish_reason": "stop", "message": {"content": "yo"}}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out)
    dec = ConnectionDecoder(99)
    recs = dec.feed(Direction.REQUEST, 5_000_000_000, req) + dec.feed(Direction.RESPONSE, 5_100_000_000, resp)
    (rec,) = recs + dec.close(5_200_000_000)
    ((back, ctx),) = round_trip(start, [rec])
    assert back == rec and back.response_model == "m1-x" and back.input_tokens == 3 and ctx.cookie == 99


def test_proto_fields_cover_the_record() -> None:
    """Every ModelCallRecord field has a ModelCall field (conn_key -> cookie, start_ns -> start_time_unix_nano)."""
    renamed = {"conn_key": "cookie", "start_ns": "start_time_unix_nano"}
    proto = set(model_call_pb2.ModelCall.DESCRIPTOR.fields_by_name)
    missing = [f.name for f in dataclasses.fields(ModelCallRecord) if renamed.get(f.name, f.name) not in proto]
    assert missing == []


def test_values_that_do_not_fit_are_named() -> None:
    with pytest.raises(ValueError, match=r"ModelCall\.duration_ns=-1"):
        to_proto(full_record(duration_ns=-1), SRC, DST)
    with pytest.raises(ValueError, match="conn_key='c' is not a socket cookie"):
        to_proto(full_record(conn_key="c"), SRC, DST)
    msg = to_proto(full_record(conn_key="c"), SRC, DST, cookie=5)
    assert msg.cookie == 5 and msg.actual_destination.version == "v1"  # actual defaults to the dialed identity
    with pytest.raises(ValueError, match="protocol 9"):
        from_proto(model_call_pb2.ModelCall(protocol=9, operation=1))  # type: ignore[arg-type]


def test_protocol_and_operation_mirror_the_proto_enums() -> None:
    """llm.Protocol / llm.Operation and LlmProtocol / LlmOperation name the same values, both ways."""
    assert {f"LLM_PROTOCOL_{p.name}" for p in Protocol} | {"LLM_PROTOCOL_UNSPECIFIED"} == set(
        model_call_pb2.LlmProtocol.keys())
    assert {f"LLM_OPERATION_{o.name}" for o in Operation} | {"LLM_OPERATION_UNSPECIFIED"} == set(
        model_call_pb2.LlmOperation.keys())
    for p in Protocol:
        for o in Operation:
            back, _ = from_proto(to_proto(full_record(protocol=p, operation=o), SRC, DST))
            assert (back.protocol, back.operation) == (p, o)


def test_the_callers_kubernetes_workload_survives_the_wire() -> None:
    src = IdentityData("chat-ui", "agent", "v1", namespace="shop", pod="chat-0", container="app",
                       service_account="chat")
    msg = to_proto(full_record(), src, DST, ACT, pid=7)
    assert (msg.source.namespace, msg.source.pod, msg.source.container, msg.source.service_account) == (
        "shop", "chat-0", "app", "chat")
    assert msg.destination.pod == ""
    _rec, ctx = from_proto(model_call_pb2.ModelCall.FromString(msg.SerializeToString()))
    assert ctx.source == src and ctx.destination == DST
