"""What the kernel test matrix found in the decoder: bytes the capture did not copy (gaps), connections cut inside a
message, API calls cut before their "model", and the tracker's undecoded counts. Hand-made wire bytes, no kernel."""
from __future__ import annotations

import gzip
import json

from prometheus_client import CollectorRegistry, generate_latest

from agent.export.metrics import capture_metrics
from agent.kernel import abi
from agent.l7.capture import CaptureTracker, decode_capture_event
from agent.l7.http1 import Direction, Http1Connection, MessageEnd, Undecoded, UndecodedReason
from agent.l7.record import ConnectionDecoder
from tests.unit.test_l7_capture import raw_event


class _Capture:
    """The agent's capture metrics, as AgentCollector exports them, for one tracker."""
    def __init__(self, tracker: CaptureTracker) -> None:
        self.tracker = tracker

    def collect(self):
        yield from capture_metrics([0] * abi.COUNTER_SLOTS, self.tracker.undecoded_counts())

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
SEND, RECV, DATA, CLOSE = (abi.CaptureDirection.SEND, abi.CaptureDirection.RECV, abi.CaptureKind.DATA,
                           abi.CaptureKind.CLOSE)


def post(body: bytes, path: str = "/v1/chat/completions") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(), len(body), body)


def reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra, len(body), body)


BIG = json.dumps({"messages": [{"role": "user", "content": "lorem ipsum " * 5000}], "model": "big-m",
                  "max_tokens": 9}).encode()
ANSWER = json.dumps({"model": "big-m-served", "choices": [{"finish_reason": "stop", "message": {"content": "x" * 3000}}],
                     "usage": {"prompt_tokens": 10000, "completion_tokens": 1}}).encode()
SMALL = json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "small"}).encode()
SMALL_ANSWER = json.dumps({"model": "small-served", "choices": [{"finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()


def test_request_gap_reads_through_to_the_response_and_the_next_request_decodes() -> None:
    """A send over the kernel's copy limit: its head and tail pieces are seen, the middle is not (a bound only)."""
    wire = post(BIG)
    dec = ConnectionDecoder("gap")
    recs = dec.feed(REQ, 1, wire[:16384])
    recs += dec.gap(REQ, 1, len(wire) - 16384)          # what the kernel says the send asked for, not what it took
    recs += dec.feed(REQ, 2, wire[-2000:])               # sendall's last partial send: the model is in it
    recs += dec.feed(RESP, 3, reply(ANSWER))
    recs += dec.feed(REQ, 4, post(SMALL)) + dec.feed(RESP, 5, reply(SMALL_ANSWER)) + dec.close(6)
    assert [(r.request_model, r.response_model, r.input_tokens, r.truncated, r.incomplete) for r in recs] == [
        ("big-m", "big-m-served", 10000, True, False), ("small", "small-served", 1, False, False)]
    assert recs[0].request_bytes == 16384 + 2000 and recs[1].sequence == 1
    assert dec.counters.undecoded is None


def test_request_cut_before_its_model_is_still_a_call() -> None:
    wire = post(BIG)
    dec = ConnectionDecoder("lost-model")
    recs = dec.feed(REQ, 1, wire[:16384]) + dec.gap(REQ, 1, len(wire) - 16384) + dec.feed(RESP, 2, reply(ANSWER))
    assert len(recs) == 1 and recs[0].request_model is None and recs[0].truncated
    assert recs[0].response_model == "big-m-served" and recs[0].status == 200
    # not an API call at all: a JSON array, or a non-JSON body, cut the same way, gives no record
    dec = ConnectionDecoder("not-llm")
    arr = post(b"[" + b"1, " * 6000 + b"2]")
    assert dec.feed(REQ, 1, arr[:4000]) + dec.gap(REQ, 1, len(arr) - 4000) + dec.feed(RESP, 2, reply(b"{}")) == []


def test_response_gap_is_exact_and_keeps_the_framing() -> None:
    body = reply(ANSWER)
    dec = ConnectionDecoder("resp-gap")
    recs = dec.feed(REQ, 1, post(SMALL))
    cut = body.index(b"x" * 100) + 50                     # the hole is inside the completion string
    recs += dec.feed(RESP, 2, body[:cut]) + dec.gap(RESP, 2, 1000) + dec.feed(RESP, 3, body[cut + 1000:])
    recs += dec.feed(REQ, 4, post(SMALL)) + dec.feed(RESP, 5, reply(SMALL_ANSWER)) + dec.close(6)
    assert [(r.response_model, r.output_tokens, r.truncated, r.incomplete) for r in recs] == [
        ("big-m-served", 1, True, False), ("small-served", 2, False, False)]
    assert recs[0].response_bytes == len(body)


def test_gap_in_a_gzip_body_or_outside_a_body() -> None:
    gz = gzip.compress(ANSWER)
    body = reply(gz, b"Content-Encoding: gzip\r\n")
    head = len(body) - len(gz)
    dec = ConnectionDecoder("gz-gap")
    recs = dec.feed(REQ, 1, post(SMALL)) + dec.feed(RESP, 2, body[:head + 20]) + dec.gap(RESP, 2, 30)
    recs += dec.feed(RESP, 3, body[head + 50:]) + dec.close(4)
    assert len(recs) == 1 and recs[0].truncated and recs[0].status == 200 and recs[0].request_model == "small"
    # a gap in a head: the framing is lost, the connection is counted undecoded and nothing is raised later
    h = Http1Connection()
    evs = h.feed(REQ, 1, post(SMALL)[:20]) + h.gap(REQ, 1, 30)
    assert isinstance(evs[-1], Undecoded) and evs[-1].reason is UndecodedReason.GAP
    assert h.feed(REQ, 2, b"anything") == [] and h.undecoded_bytes == 30 + 8


def test_close_inside_a_message_is_counted_truncated() -> None:
    for wire in (post(SMALL)[:-5], b"POST /v1/chat/comp", b"PRI * HT"):
        h = Http1Connection()
        h.feed(REQ, 1, wire)
        evs = h.close(2)
        assert evs[-1] == Undecoded(2, UndecodedReason.TRUNCATED, evs[-1].detail), wire
        assert h.undecoded is UndecodedReason.TRUNCATED and h.undecoded_bytes > 0
    h = Http1Connection()      # a whole exchange then a close: nothing left over, nothing counted
    h.feed(REQ, 1, post(SMALL))
    h.feed(RESP, 2, reply(SMALL_ANSWER))
    assert not any(isinstance(e, (Undecoded, MessageEnd)) for e in h.close(3)) and h.undecoded is None
    dec = ConnectionDecoder("cut")    # the call in flight is still reported, incomplete
    recs = dec.feed(REQ, 1, post(SMALL)) + dec.feed(RESP, 2, reply(SMALL_ANSWER)[:-4]) + dec.close(3)
    assert len(recs) == 1 and recs[0].incomplete and recs[0].output_tokens is None
    assert dec.counters.undecoded is UndecodedReason.TRUNCATED


def test_tracker_turns_uncopied_bytes_into_gaps() -> None:
    wire, answer = post(BIG), reply(ANSWER.replace(b"x" * 3000, b"x" * 10000))
    t = CaptureTracker()
    calls = []

    def ev(*a, **kw):
        calls.extend(t.on_chunk(decode_capture_event(raw_event(*a, **kw))))
    # one send of the whole request: the kernel copies 4 chunks of 4096 (its byte budget), says total=len(wire),
    # then a GAP record says it copies no more of that call
    for i in range(4):
        ev(DATA, SEND, wire[i * 4096:(i + 1) * 4096], total=len(wire), offset=i * 4096, ts=1)
    assert t.bytes_missing == 0
    ev(abi.CaptureKind.GAP, SEND, b"", total=len(wire), offset=16384, ts=1)
    assert t.bytes_missing == len(wire) - 16384      # the GAP ends the call: no waiting for more
    # the response in one receive, its second chunk's copy failed (len 0): an exact gap
    ev(DATA, RECV, answer[:4096], total=len(answer), offset=0, ts=2)
    ev(DATA, RECV, b"", total=len(answer), offset=4096, ts=2)
    assert calls == [] and 8192 < len(answer) <= 3 * 4096
    ev(DATA, RECV, answer[8192:], total=len(answer), offset=8192, ts=2)
    assert len(calls) == 1 and calls[0].record.request_model is None and calls[0].record.truncated
    assert calls[0].record.status == 200 and calls[0].record.response_bytes == len(answer)
    assert t.bytes_missing == len(wire) - 16384 + 4096
    ev(CLOSE, 0, b"", ts=3)
    assert t.undecoded_counts() == {}


def test_tracker_counts_undecoded_connections_by_reason() -> None:
    t = CaptureTracker()
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, b"\x16\x03\x01\x00\xa5" + bytes(range(200)), cookie=1)))
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", cookie=2)))
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, b"POST /v1/chat/comp", cookie=3)))
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, b"more garbage", cookie=1)))   # counted once
    assert t.undecoded_counts() == {"protocol_error": 1, "http2": 1}
    for cookie in (1, 2, 3):
        t.on_chunk(decode_capture_event(raw_event(CLOSE, 0, b"", cookie=cookie)))
    assert t.undecoded_counts() == {"protocol_error": 1, "http2": 1, "truncated": 1}
    assert t.undecoded_bytes == 205 + 12 + 24 + 18 and len(t) == 0
    reg = CollectorRegistry()
    reg.register(_Capture(t))
    text = generate_latest(reg).decode()
    assert 'aimesh_capture_undecoded_connections_total{reason="truncated"} 1.0' in text


def test_stream_closed_after_its_terminal_event_is_complete() -> None:
    """openai-python closes the response at [DONE]: the chunked terminator may never be read; the stream was whole."""
    events = [{"model": "s-served", "choices": [{"delta": {"content": "a"}, "finish_reason": None}]},
              {"model": "s-served", "choices": [{"delta": {}, "finish_reason": "stop"}]},
              {"model": "s-served", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}]
    sse = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = head + b"%x\r\n%s\r\n" % (len(sse), sse)
    req = post(json.dumps({"model": "s", "messages": [], "stream": True}).encode())
    for tail, incomplete in ((b"", False), (b"0\r\n\r\n", False)):
        dec = ConnectionDecoder("done")
        recs = dec.feed(REQ, 1, req) + dec.feed(RESP, 2, body + tail) + dec.close(3)
        assert [(r.incomplete, r.output_tokens, r.finish_reasons) for r in recs] == [(incomplete, 1, ("stop",))]
    dec = ConnectionDecoder("cut")      # without [DONE] it is cut: tokens unknown
    cut = body[: body.index(b"data: [DONE]")]
    recs = dec.feed(REQ, 1, req) + dec.feed(RESP, 2, cut) + dec.close(3)
    assert recs[0].incomplete and recs[0].output_tokens is None


def test_http2_refined_to_grpc_is_counted_once_as_grpc() -> None:
    import hpack
    block = hpack.Encoder().encode([(":method", "POST"), (":path", "/svc/M"), ("content-type", "application/grpc")])
    frame = len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block
    t = CaptureTracker()
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", cookie=5)))
    assert t.undecoded_counts() == {"http2": 1}
    t.on_chunk(decode_capture_event(raw_event(DATA, SEND, frame, cookie=5)))
    t.on_chunk(decode_capture_event(raw_event(CLOSE, 0, b"", cookie=5)))
    assert t.undecoded_counts() == {"http2": 0, "grpc": 1}


def test_bytes_after_the_close_are_counted_not_raised() -> None:
    dec = ConnectionDecoder("after-close")
    recs = dec.feed(REQ, 1, post(SMALL)) + dec.close(2)
    recs += dec.feed(RESP, 3, reply(SMALL_ANSWER)) + dec.feed(REQ, 4, post(SMALL)) + dec.gap(RESP, 5, 10) + dec.close(6)
    assert len(recs) == 1 and recs[0].incomplete
    assert dec.counters.undecoded is UndecodedReason.PROTOCOL_ERROR and dec.counters.undecoded_bytes > 0


def test_tracker_flushes_a_failed_last_chunk_before_the_other_direction() -> None:
    """A send whose last chunk could not be copied: the gap is known only when something else moves, and it must
    reach the decoder before the response does (the request ends at the response head)."""
    wire = post(SMALL + b" " * 6000)
    t = CaptureTracker()
    calls = []
    for raw in (raw_event(DATA, SEND, wire[:4096], total=len(wire)),
                raw_event(DATA, SEND, b"", total=len(wire), offset=4096),
                raw_event(DATA, RECV, reply(SMALL_ANSWER), ts=2),
                raw_event(CLOSE, 0, b"", ts=3)):
        calls.extend(t.on_chunk(decode_capture_event(raw)))
    assert [(c.record.request_model, c.record.response_model, c.record.truncated) for c in calls] == [
        ("small", "small-served", True)]
    assert t.bytes_missing == len(wire) - 4096 and t.undecoded_counts() == {}


def test_binary_first_bytes_are_not_http1_at_once() -> None:
    """A request starts with a method (a token): binary is refused on its first chunk, so the kernel can stop copying
    the socket at once instead of at close."""
    h = Http1Connection()
    out = h.feed(Direction.REQUEST, 1, b"\x80\x01\x00\x00" + bytes(range(64)))
    assert h.undecoded is UndecodedReason.PROTOCOL_ERROR and any(isinstance(e, Undecoded) for e in out)
    ok = Http1Connection()
    ok.feed(Direction.REQUEST, 1, b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert ok.undecoded is None
