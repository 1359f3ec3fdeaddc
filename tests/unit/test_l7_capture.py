"""Capture ring records -> CaptureTracker -> model-call records, without a kernel (bytes from tests/llm_server.py)."""
from __future__ import annotations

import ctypes as ct

import openai
import pytest

from agent.kernel import abi
from agent.l7.capture import (CaptureDecodeError, CaptureTracker, decode_capture_event, model_call_json,
                              status_class)
from agent.l7.http1 import Direction
from tests.llm_server import LLMServer

CHUNK = 4096


def raw_event(kind: int, direction: int, data: bytes, cookie: int = 7, ts: int = 1, total: int | None = None,
              offset: int = 0, src: int = 16, dst: int = 17) -> bytes:
    h = abi.CaptureEvent(ts_ns=ts, cookie=cookie, tgid=42, fd=3, src_id=src, dst_id=dst, actual_dst_id=dst,
                         total=len(data) if total is None else total, offset=offset, len=len(data), kind=kind,
                         direction=direction)
    return bytes(h) + data + b"\0" * (CHUNK - len(data)) if kind == abi.CaptureKind.DATA else bytes(h)


def events_of(log) -> list[bytes]:
    out = []
    for d, ts, b in log:
        direction = abi.CaptureDirection.SEND if d is Direction.REQUEST else abi.CaptureDirection.RECV
        for off in range(0, len(b), CHUNK):
            out.append(raw_event(abi.CaptureKind.DATA, direction, b[off:off + CHUNK], ts=ts, total=len(b),
                                 offset=off))
    return out


def test_decode_rejects_bad_records():
    with pytest.raises(CaptureDecodeError, match="bytes"):
        decode_capture_event(b"\0" * 8)
    with pytest.raises(CaptureDecodeError, match="kind"):
        decode_capture_event(raw_event(9, 1, b""))
    with pytest.raises(CaptureDecodeError, match="direction"):
        decode_capture_event(raw_event(abi.CaptureKind.DATA, 5, b"x"))
    short = raw_event(abi.CaptureKind.DATA, 1, b"abc")[: ct.sizeof(abi.CaptureEvent) + 1]
    with pytest.raises(CaptureDecodeError, match="data bytes"):
        decode_capture_event(short)
    c = decode_capture_event(raw_event(abi.CaptureKind.DATA, abi.CaptureDirection.RECV, b"hello"))
    assert c.data == b"hello" and c.direction is Direction.RESPONSE and c.pid == 42


def test_tracker_turns_server_bytes_into_records():
    with LLMServer() as srv:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        cl.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
        list(cl.chat.completions.create(model="m2", messages=[{"role": "user", "content": "hi"}], stream=True))
        cl.close()
        srv.wait_calls(2)
        log = srv.connections[0]
    t = CaptureTracker()
    calls = []
    for raw in events_of(log):
        calls += t.on_chunk(decode_capture_event(raw))
    assert [c.record.response_model for c in calls] == ["m1-served", "m2-served"]
    assert t.on_chunk(decode_capture_event(raw_event(abi.CaptureKind.CLOSE, 0, b""))) == [] and len(t) == 0
    j = model_call_json(calls[0], {16: "chat", 17: "llama"}, lambda ts: str(ts))
    assert j["source"] == {"name": "chat", "pid": 42} and j["destination"] == {"name": "llama"}
    assert j["protocol"] == "openai" and j["stream"] is False and status_class(j["status"]) == "2xx"


def test_tracker_is_bounded_and_closes_in_flight_calls():
    t = CaptureTracker(max_connections=2, idle_ns=10)
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{\"model\": \"abc\"}"
    for cookie in (1, 2, 3):
        t.on_chunk(decode_capture_event(raw_event(abi.CaptureKind.DATA, abi.CaptureDirection.SEND, req,
                                                  cookie=cookie)))
    assert len(t) == 2 and t.evicted == 1
    out = t.expire(100)
    assert len(t) == 0 and {c.cookie for c in out} == {2, 3} and all(c.record.incomplete for c in out)


def _body(model: str, pad: int = 0) -> bytes:
    import json
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * pad}]}).encode()


def _request(model: str, pad: int = 0) -> bytes:
    b = _body(model, pad)
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b


def _response(model: str) -> bytes:
    import json
    b = json.dumps({"id": "c", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b) + b


def _send(t: CaptureTracker, data: bytes, ts: int, direction=abi.CaptureDirection.SEND, total=None, offset=0):
    return t.on_chunk(decode_capture_event(raw_event(abi.CaptureKind.DATA, direction, data, ts=ts, total=total,
                                                     offset=offset)))


def test_a_gap_marks_the_call_truncated_and_the_next_request_is_still_decoded():
    t = CaptureTracker()
    req = _request("first", pad=9000)
    kept = 4096
    out = _send(t, req[:kept], 1, total=len(req))
    gap = decode_capture_event(raw_event(abi.CaptureKind.GAP, abi.CaptureDirection.SEND, b"", ts=1, total=len(req),
                                         offset=kept))
    assert gap.kind is abi.CaptureKind.GAP and gap.missing == len(req) - kept and gap.data == b""
    out += t.on_chunk(gap)
    out += _send(t, _response("first-served"), 2, abi.CaptureDirection.RECV)
    out += _send(t, _request("second"), 3)
    out += _send(t, _response("second-served"), 4, abi.CaptureDirection.RECV)
    assert [(c.record.request_model, c.record.response_model, c.record.truncated) for c in out] == [
        ("first", "first-served", True), ("second", "second-served", False)]
    assert out[0].record.request_bytes == kept       # a request hole is only a bound: what was captured (record.py)
    assert t.bytes_missing == len(req) - kept and not t.undecoded and t.take_skips() == []


def test_a_response_gap_keeps_the_head_and_marks_it_truncated():
    t = CaptureTracker()
    resp = _response("m-served")
    out = _send(t, _request("m"), 1)
    out += _send(t, resp[:-10], 2, abi.CaptureDirection.RECV, total=len(resp))
    out += t.on_chunk(decode_capture_event(raw_event(abi.CaptureKind.GAP, abi.CaptureDirection.RECV, b"", ts=2,
                                                     total=len(resp), offset=len(resp) - 10)))
    assert len(out) == 1 and out[0].record.status == 200 and out[0].record.truncated


@pytest.mark.parametrize("first,reason", [(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http2"),
                                          (b"\x00\x01garbage\r\n\r\n", "protocol_error")])
def test_a_connection_the_decoder_gives_up_on_is_counted_once_and_queued_for_skipping(first, reason):
    t = CaptureTracker()
    _send(t, first, 1)
    _send(t, b"more bytes", 2)
    assert t.undecoded == {reason: 1}
    assert t.take_skips() == [(42, 3)] and t.take_skips() == []
    _send(t, _request("m"), 3)
    assert t.undecoded == {reason: 1}


def test_a_tls_handshake_record_makes_no_decoder():
    t = CaptureTracker()
    hs = decode_capture_event(raw_event(abi.CaptureKind.TLS_HANDSHAKE, abi.CaptureDirection.SEND, b"", total=517))
    assert hs.kind is abi.CaptureKind.TLS_HANDSHAKE and hs.data == b"" and hs.missing == 0
    assert t.on_chunk(hs) == [] and len(t) == 0 and not t.undecoded
