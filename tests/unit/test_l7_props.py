"""Properties of the decoder, on real exchanges (openai, anthropic, Ollama clients against tests/llm_server.py):
any split of the bytes gives the records the unsplit bytes give, and no bytes, gaps or closes make it raise."""
from __future__ import annotations

import dataclasses

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.l7.capture import CaptureDecodeError, CaptureTracker, decode_capture_event
from agent.l7.http1 import Direction
from agent.l7.record import ConnectionDecoder, ModelCallRecord
from tests.llm_server import ByteLog, LLMServer
from tests.unit.test_l7_capture import raw_event

MSG = [{"role": "user", "content": "mail bob@example.com the key sk-abcdefghijklmnopqrstu"}]


@pytest.fixture(scope="module")
def logs() -> list[ByteLog]:
    """One connection per client, each carrying several calls of different shapes."""
    with LLMServer() as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        c.chat.completions.create(model="m-json", messages=MSG, logprobs=True)      # gzip'd JSON
        c.chat.completions.create(model="m-len", messages=MSG, max_tokens=2)
        c.close()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        list(c.chat.completions.create(model="m-sse", messages=MSG, stream=True,
                                       stream_options={"include_usage": True}))
        c.close()
        a = anthropic.Anthropic(base_url=srv.url, api_key="sk-ant-test", max_retries=0)
        with a.messages.stream(model="a-sse", max_tokens=64, messages=MSG) as s:
            list(s.text_stream)
        a.close()
        with httpx.Client(base_url=srv.url) as h:
            with h.stream("POST", "/api/chat", json={"model": "o-nd", "messages": MSG}) as r:
                list(r.iter_lines())
            h.post("/v1/chat/completions", json={"model": "error-400", "messages": MSG})
            h.post("/v1/embeddings", json={"model": "e-1", "input": "some text"})
        srv.wait_calls(7)
        return [log for _, log in sorted(srv.connections.items()) if log]


def decode(log: ByteLog, capture: bool = True) -> list[ModelCallRecord]:
    dec = ConnectionDecoder("p", capture_content=capture)
    out: list[ModelCallRecord] = []
    for d, ts, b in log:
        out += dec.feed(d, ts, b)
    return out + dec.close(log[-1][1] + 1)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_split_gives_the_same_records(logs: list[ByteLog], data: st.DataObject) -> None:
    log = data.draw(st.sampled_from(logs), label="connection")
    whole = decode(log)
    assert whole and all(r.request_model for r in whole)
    parts: ByteLog = []
    for d, ts, b in log:     # cut each write anywhere; the pieces keep the write's time (the split is all that varies)
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(b) - 1)), max_size=6), label="cuts")))
        prev = 0
        for c in cuts + [len(b)]:
            if c > prev:
                parts.append((d, ts, b[prev:c]))
                prev = c
    assert decode(parts) == whole


def untimed(r: ModelCallRecord) -> ModelCallRecord:
    return dataclasses.replace(r, start_ns=0, time_to_first_chunk_ns=None, duration_ns=None,
                               time_per_output_chunk_ns=None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_writes_merged_as_one_read_give_the_same_records_but_times(logs: list[ByteLog], data: st.DataObject) -> None:
    """A receive can return several of the server's writes at once: same records, only the times move."""
    log = data.draw(st.sampled_from(logs), label="connection")
    merged: ByteLog = []
    for d, ts, b in log:
        if merged and merged[-1][0] is d and data.draw(st.booleans(), label="merge"):
            merged[-1] = (d, merged[-1][1], merged[-1][2] + b)
        else:
            merged.append((d, ts, b))
    assert [untimed(r) for r in decode(merged)] == [untimed(r) for r in decode(log)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.lists(st.tuples(st.sampled_from(["feed", "gap", "close"]), st.booleans(),
                                     st.binary(max_size=200), st.integers(0, 70_000)), max_size=12))
def test_random_bytes_gaps_and_closes_never_raise(logs: list[ByteLog], data: st.DataObject,
                                                   ops: list[tuple[str, bool, bytes, int]]) -> None:
    log = data.draw(st.sampled_from(logs), label="connection")
    keep = data.draw(st.integers(0, len(log)), label="valid prefix")
    dec = ConnectionDecoder("fuzz", capture_content=True)
    recs: list[ModelCallRecord] = []
    for d, ts, b in log[:keep]:
        recs += dec.feed(d, ts, b)
    for i, (op, req, b, n) in enumerate(ops):
        d = Direction.REQUEST if req else Direction.RESPONSE
        if op == "feed":
            recs += dec.feed(d, 10**12 + i, b)
        elif op == "gap":
            recs += dec.gap(d, 10**12 + i, n)
        else:
            recs += dec.close(10**12 + i)
    recs += dec.close(2 * 10**12)
    assert all(isinstance(r, ModelCallRecord) for r in recs)
    c = dec.counters
    assert c.undecoded_bytes >= 0 and c.llm_calls + c.other_requests <= c.http_requests + 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.binary(max_size=64), st.integers(0, 9000),
                          st.integers(0, 9000), st.integers(1, 3)), max_size=20))
def test_tracker_never_raises_on_any_capture_records(events: list[tuple[int, int, bytes, int, int, int]]) -> None:
    t = CaptureTracker(capture_content=lambda _i: True, max_connections=2)
    for kind, direction, b, total, offset, cookie in events:
        try:
            chunk = decode_capture_event(raw_event(kind, direction, b, cookie=cookie, total=total, offset=offset))
        except CaptureDecodeError:
            continue
        t.on_chunk(chunk)
    t.expire(10**18)
    assert len(t) == 0 and t.bytes_missing >= 0


def test_a_flipped_byte_anywhere_never_raises(logs: list[ByteLog]) -> None:
    for log in logs:
        flat = [(d, ts, b) for d, ts, b in log]
        for i in range(0, sum(len(b) for _, _, b in flat), 97):
            pos, out = i, []
            for d, ts, b in flat:
                if 0 <= pos < len(b):
                    b = b[:pos] + bytes([b[pos] ^ 0x5A]) + b[pos + 1:]
                pos -= len(b)
                out.append((d, ts, b))
            decode(out)
