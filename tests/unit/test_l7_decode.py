"""HTTP/1.1 and LLM decoding on hand-made wire bytes: framing, caps, encodings, HTTP/2 and gRPC, garbage."""
from __future__ import annotations

import gzip
import json
import zlib

import hpack
from hypothesis import given, settings, strategies as st

from agent.l7.http1 import (H2_PREFACE, Body, Direction, Http1Connection, MessageEnd, RequestHead, ResponseHead,
                            UndecodedReason)
from agent.l7.record import ConnectionDecoder

REQ, RESP = Direction.REQUEST, Direction.RESPONSE


def post(path: str, body: dict[str, object], extra: bytes = b"") -> bytes:
    b = json.dumps(body).encode()
    return b"POST %s HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path.encode(), extra, len(b), b)


def response(body: bytes, headers: bytes = b"Content-Type: application/json\r\n", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, headers, len(body), body)


CHAT = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "m1"})
CHAT_RESP = response(json.dumps({"model": "m1-x", "choices": [{"finish_reason": "stop", "message": {"content": "yo"}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode())


def feed_all(dec: ConnectionDecoder, parts: list[tuple[Direction, bytes]]) -> list:
    out = []
    for i, (d, b) in enumerate(parts):
        out += dec.feed(d, i, b)
    return out + dec.close(len(parts))


def test_keep_alive_calls_in_sequence() -> None:
    dec = ConnectionDecoder("c")
    recs = feed_all(dec, [(REQ, CHAT), (RESP, CHAT_RESP)] * 3)
    assert [r.sequence for r in recs] == [0, 1, 2]
    assert all(r.response_model == "m1-x" and r.input_tokens == 3 and not r.incomplete for r in recs)
    assert dec.counters.llm_calls == 3 and dec.counters.undecoded is None


def test_deflate_raw_and_wrapped_and_unsupported_encoding() -> None:
    body = CHAT_RESP.split(b"\r\n\r\n", 1)[1]
    raw = zlib.compressobj(wbits=-15)
    raw_b = raw.compress(body) + raw.flush()
    for enc, data in ((b"deflate", zlib.compress(body)), (b"deflate", raw_b), (b"gzip", gzip.compress(body))):
        recs = feed_all(ConnectionDecoder("c"), [(REQ, CHAT), (RESP, response(
            data, b"Content-Type: application/json\r\nContent-Encoding: " + enc + b"\r\n"))])
        assert recs[0].output_tokens == 1 and not recs[0].truncated
    recs = feed_all(ConnectionDecoder("c"), [(REQ, CHAT), (RESP, response(
        b"\x00\x01", b"Content-Type: application/json\r\nContent-Encoding: br\r\n"))])
    assert recs[0].truncated and recs[0].incomplete and recs[0].output_tokens is None


def test_body_cap_counts_and_never_buffers() -> None:
    c = Http1Connection(body_cap=100)
    big = gzip.compress(b"x" * 1_000_000)
    evs = c.feed(REQ, 0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    evs += c.feed(RESP, 1, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(big))
    for i in range(0, len(big), 333):
        evs += c.feed(RESP, 2, big[i:i + 333])
    assert sum(len(e.data) for e in evs if isinstance(e, Body)) == 100
    end = [e for e in evs if isinstance(e, MessageEnd) and e.direction is RESP][0]
    assert end.body_bytes == 100 and end.truncated_bytes > 0 and end.complete


def test_sse_split_anywhere_and_anthropic_events() -> None:
    events = [("message_start", {"type": "message_start", "message": {"model": "c-1", "usage": {
        "input_tokens": 9, "output_tokens": 1}}}),
              ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}}),
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 5}}),
              ("message_stop", {"type": "message_stop"})]
    sse = b"".join(b"event: %s\r\ndata: %s\r\n\r\n" % (e.encode(), json.dumps(d).encode()) for e, d in events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(sse[i:i + 5]), sse[i:i + 5]) for i in range(0, len(sse), 5)) + b"0\r\n\r\n"
    req = post("/v1/messages", {"model": "c", "max_tokens": 10, "messages": [], "stream": True})
    wire = head + body
    recs = feed_all(ConnectionDecoder("c"), [(REQ, req)] + [(RESP, wire[i:i + 3]) for i in range(0, len(wire), 3)])
    r = recs[0]
    assert (r.response_model, r.input_tokens, r.output_tokens, r.finish_reasons) == ("c-1", 9, 5, ("end_turn",))
    assert r.stream and not r.incomplete and r.output_chunks == 4


def test_non_llm_requests_are_counted_not_recorded() -> None:
    dec = ConnectionDecoder("c")
    recs = feed_all(dec, [(REQ, b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"), (RESP, response(b"{}")),
                          (REQ, post("/v1/chat/completions", {"no": "model"})), (RESP, response(b"{}")),
                          (REQ, CHAT), (RESP, CHAT_RESP)])
    assert len(recs) == 1 and recs[0].sequence == 2
    assert dec.counters.other_requests == 2 and dec.counters.http_requests == 3


def test_http2_and_grpc_are_recognised_not_decoded() -> None:
    c = ConnectionDecoder("h2")
    assert feed_all(c, [(REQ, H2_PREFACE[:5]), (REQ, H2_PREFACE[5:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")]) == []
    assert c.counters.undecoded is UndecodedReason.HTTP2 and c.counters.undecoded_bytes > 0
    block = hpack.Encoder().encode([(":method", "POST"), (":path", "/svc/M"), ("content-type", "application/grpc")])
    frame = len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block
    g = ConnectionDecoder("grpc")
    feed_all(g, [(REQ, H2_PREFACE), (REQ, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + frame[:4]), (REQ, frame[4:])])
    assert g.counters.undecoded is UndecodedReason.GRPC


def test_garbage_binary_and_truncation_never_raise() -> None:
    for parts in ([(REQ, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" * 50)],
                  [(REQ, b"\x00" * 100_000)],
                  [(REQ, CHAT), (RESP, b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(range(256)))],
                  [(REQ, CHAT[:40])],
                  [(REQ, CHAT), (RESP, CHAT_RESP[:60])],
                  [(RESP, b"HTTP/1.1 200 OK\r\n" * 10_000)]):
        dec = ConnectionDecoder("g")
        recs = feed_all(dec, parts)
        assert all(r.incomplete for r in recs)
    dec = ConnectionDecoder("g")
    feed_all(dec, [(REQ, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"), (REQ, b"more")])
    assert dec.counters.undecoded is UndecodedReason.PROTOCOL_ERROR and dec.counters.undecoded_bytes > 0


def test_response_cut_mid_body_is_incomplete_with_unknown_tokens() -> None:
    recs = feed_all(ConnectionDecoder("c"), [(REQ, CHAT), (RESP, CHAT_RESP[:-10])])
    assert recs[0].incomplete and recs[0].output_tokens is None and recs[0].status == 200


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(CHAT) + len(CHAT_RESP)), max_size=12))
def test_any_split_gives_the_same_record(cuts: list[int]) -> None:
    wire = [(REQ, CHAT), (RESP, CHAT_RESP)] * 2
    parts: list[tuple[Direction, bytes]] = []
    for d, b in wire:
        prev = 0
        for c in sorted({x for x in cuts if x < len(b)}):
            parts.append((d, b[prev:c]))
            prev = c
        parts.append((d, b[prev:]))
    recs = feed_all(ConnectionDecoder("c"), parts)
    assert [(r.request_model, r.response_model, r.output_tokens, r.incomplete) for r in recs] == [
        ("m1", "m1-x", 1, False)] * 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=10))
def test_random_bytes_never_raise(chunks: list[tuple[bool, bytes]]) -> None:
    dec = ConnectionDecoder("fuzz", capture_content=True)
    for i, (req, b) in enumerate([(True, CHAT[:30])] + chunks):
        dec.feed(REQ if req else RESP, i, b)
    dec.close(99)


def test_http1_events_in_order() -> None:
    c = Http1Connection()
    evs = c.feed(REQ, 5, CHAT) + c.feed(RESP, 9, CHAT_RESP)
    kinds = [type(e) for e in evs]
    assert kinds == [RequestHead, Body, MessageEnd, ResponseHead, Body, MessageEnd]
    assert evs[2].wire_bytes == len(CHAT) and evs[5].wire_bytes == len(CHAT_RESP)
