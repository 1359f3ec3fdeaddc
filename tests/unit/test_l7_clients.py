"""Real clients (openai, anthropic SDKs, httpx, requests, curl) against tests/llm_server.py; the bytes the server logged
per connection are fed to ConnectionDecoder, as logged and split at random points, and the records must say what the
server sent."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess

import anthropic
import httpx
import openai
import pytest
import requests

from agent.l7.llm import Operation, Protocol
from agent.l7.record import ConnectionDecoder, ModelCallRecord
from tests.llm_server import ByteLog, LLMServer, SentCall


def resplit(log: ByteLog, rng: random.Random) -> ByteLog:
    """The same bytes in the same order, cut at random points (the kernel's chunking is not the app's writes)."""
    out: ByteLog = []
    for d, ts, b in log:
        i = 0
        while i < len(b):
            n = rng.choice((1, 2, 3, 7, 64, 500, 4096))
            out.append((d, ts + i, b[i:i + n]))
            i += n
    return out


def decode(conn_id: int, log: ByteLog, **kw: object) -> list[ModelCallRecord]:
    dec = ConnectionDecoder(conn_id, **kw)   # type: ignore[arg-type]
    recs: list[ModelCallRecord] = []
    for d, ts, b in log:
        recs.extend(dec.feed(d, ts, b))
    recs.extend(dec.close(log[-1][1] + 1 if log else 0))
    return recs


def all_records(srv: LLMServer, rng: random.Random | None = None, **kw: object) -> dict[int, list[ModelCallRecord]]:
    return {cid: decode(cid, resplit(log, rng) if rng else log, **kw) for cid, log in srv.connections.items()}


def check(rec: ModelCallRecord, sent: SentCall) -> None:
    assert rec.request_model == sent.request_model
    assert rec.status == sent.status
    assert rec.stream == sent.stream
    if sent.status == 200 and not sent.cut:
        assert rec.response_model == sent.response_model
        assert rec.input_tokens == sent.input_tokens
        assert rec.output_tokens == sent.output_tokens
        assert rec.finish_reasons == ((sent.finish_reason,) if sent.finish_reason else ())
        assert rec.time_to_first_chunk_ns is not None and rec.time_to_first_chunk_ns >= 0
        assert rec.duration_ns is not None and rec.duration_ns >= rec.time_to_first_chunk_ns
        assert not rec.incomplete and rec.error_type is None
        if rec.stream:
            assert rec.output_chunks > 1 and rec.time_per_output_chunk_ns is not None
    if sent.status >= 400:
        assert rec.error_type == sent.error_type
        assert rec.output_tokens is None
    assert len(rec.request_digest) == 64 and rec.request_bytes > 0


def check_all(srv: LLMServer, n: int) -> dict[int, list[ModelCallRecord]]:
    srv.wait_calls(n)
    as_logged = all_records(srv)
    for seed in (1, 2):     # timestamps move with the split; everything else must not
        split = all_records(srv, random.Random(seed))
        for cid in as_logged:
            a = [(r.request_model, r.response_model, r.input_tokens, r.output_tokens, r.status, r.finish_reasons,
                  r.stream, r.incomplete, r.error_type, r.request_digest, r.request_bytes, r.response_bytes)
                 for r in as_logged[cid]]
            b = [(r.request_model, r.response_model, r.input_tokens, r.output_tokens, r.status, r.finish_reasons,
                  r.stream, r.incomplete, r.error_type, r.request_digest, r.request_bytes, r.response_bytes)
                 for r in split[cid]]
            assert a == b
    for cid, recs in as_logged.items():
        sent = srv.calls_on(cid)
        assert len(recs) == len(sent), (cid, recs, sent)
        for rec, s in zip(recs, sent):
            check(rec, s)
    assert sum(len(r) for r in as_logged.values()) == n
    return as_logged


MSG = [{"role": "user", "content": "say hello to the test"}]


def test_openai_sync_all_shapes() -> None:
    with LLMServer() as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        r = c.chat.completions.create(model="gpt-a", messages=MSG)
        assert r.model == "gpt-a-served"
        for include_usage in (True, False):
            kw = {"stream_options": {"include_usage": True}} if include_usage else {}
            chunks = list(c.chat.completions.create(model="gpt-b", messages=MSG, stream=True, **kw))
            assert chunks
        c.chat.completions.create(model="gpt-c", messages=MSG, logprobs=True, top_logprobs=1, max_tokens=3)
        c.completions.create(model="gpt-instruct", prompt="one two three")
        list(c.completions.create(model="gpt-instruct", prompt="one two", stream=True,
                                  stream_options={"include_usage": True}))
        c.embeddings.create(model="text-embed", input="embed these words")
        c.responses.create(model="gpt-resp", input="hi responses")
        recs = check_all(srv, 8)
    flat = [r for cid in sorted(recs) for r in recs[cid]]
    assert [r.operation for r in flat] == [Operation.CHAT] * 4 + [Operation.COMPLETION] * 2 + [
        Operation.EMBEDDINGS, Operation.RESPONSES]
    assert all(r.protocol is Protocol.OPENAI for r in flat)
    assert len(recs) < 8        # keep-alive: connections carried several calls (the SDK drops one after a stream)
    chat_plain, stream_usage, stream_no_usage, chat_lp = flat[:4]
    assert chat_plain.cached_tokens == 0
    assert stream_usage.include_usage is True and stream_usage.output_tokens == 7
    # without include_usage the server sends no usage: unknown, not zero
    assert stream_no_usage.include_usage is None and stream_no_usage.output_tokens is None
    assert not stream_no_usage.incomplete
    assert chat_lp.max_tokens == 3 and chat_lp.finish_reasons == ("length",)
    assert chat_lp.confidence_mean is not None and chat_lp.confidence_min is not None
    assert 0 < chat_lp.confidence_min < chat_lp.confidence_mean < 1
    assert flat[-1].response_model == "gpt-resp-served" and flat[-1].finish_reasons == ("completed",)


def test_openai_non_streamed_bodies_are_gzip_like_the_hosted_api() -> None:
    with LLMServer() as srv:
        openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0).chat.completions.create(
            model="gpt-gz", messages=MSG)
        srv.wait_calls(1)
        raw = b"".join(b for _, _, b in srv.connections[0])
    assert b"content-encoding: gzip" in raw.lower()
    check_all_srv = decode(0, srv.connections[0])
    assert check_all_srv[0].response_model == "gpt-gz-served" and check_all_srv[0].output_tokens == 7


def test_openai_async_fifty_concurrent_streams_none_mixed_up() -> None:
    async def run(url: str) -> None:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)

        async def one(i: int) -> None:
            s = await c.chat.completions.create(model=f"model-{i}", messages=[{"role": "user", "content": "w " * i}],
                                                stream=True, stream_options={"include_usage": True})
            async for _ in s:
                pass
        await asyncio.gather(*(one(i) for i in range(50)))
        # a second round reuses the kept-alive connections
        await asyncio.gather(*(one(i) for i in range(50, 60)))
        await c.close()
    with LLMServer() as srv:
        asyncio.run(run(srv.url))
        recs = check_all(srv, 60)
    flat = [r for rs in recs.values() for r in rs]
    assert sorted(r.request_model for r in flat) == sorted(f"model-{i}" for i in range(60))
    for r in flat:
        i = int(r.request_model.split("-")[1])
        assert r.response_model == f"model-{i}-served" and r.input_tokens == i + 1   # the server counts "user" too
    assert any(len(rs) > 1 for rs in recs.values())     # keep-alive did carry several calls on one connection


def test_anthropic_sync_and_async() -> None:
    with LLMServer() as srv:
        c = anthropic.Anthropic(base_url=srv.url, api_key="sk-ant-test", max_retries=0)
        m = c.messages.create(model="claude-t", max_tokens=100, messages=MSG)
        assert m.model == "claude-t-served"
        with c.messages.stream(model="claude-s", max_tokens=100, messages=MSG) as s:
            assert "".join(s.text_stream)

        async def run() -> None:
            a = anthropic.AsyncAnthropic(base_url=srv.url, api_key="sk-ant-test", max_retries=0)
            await a.messages.create(model="claude-a", max_tokens=4, messages=MSG)
            s = await a.messages.create(model="claude-as", max_tokens=100, messages=MSG, stream=True)
            async for _ in s:
                pass
            await a.close()
        asyncio.run(run())
        recs = check_all(srv, 4)
    flat = [r for cid in sorted(recs) for r in recs[cid]]
    assert all(r.protocol is Protocol.ANTHROPIC and r.operation is Operation.MESSAGES for r in flat)
    assert [r.stream for r in flat] == [False, True, False, True]
    assert flat[0].cached_tokens == 2 and flat[1].cached_tokens == 2
    assert flat[2].finish_reasons == ("max_tokens",) and flat[2].max_tokens == 4


def test_ollama_httpx_requests_and_curl() -> None:
    with LLMServer() as srv:
        with httpx.Client(base_url=srv.url) as h:
            with h.stream("POST", "/api/chat", json={"model": "llama3", "messages": MSG}) as r:
                assert [json.loads(x) for x in r.iter_lines() if x][-1]["done"] is True
            h.post("/api/generate", json={"model": "llama3", "prompt": "why sky", "stream": False})
            h.post("/api/embed", json={"model": "nomic", "input": "embed me"})
            with h.stream("POST", "/v1/responses", json={"model": "gpt-rs", "input": "hi", "stream": True}) as r:
                r.read()
        with requests.Session() as s:
            s.post(srv.url + "/api/generate", json={"model": "llama3", "prompt": "a b c"}).raise_for_status()
            s.post(srv.url + "/v1/chat/completions", json={"model": "gpt-req", "messages": MSG}).raise_for_status()
        n = 6
        if shutil.which("curl"):
            subprocess.run(["curl", "-sS", "-o", "/dev/null", "-H", "content-type: application/json", "--data",
                            json.dumps({"model": "gpt-curl", "messages": MSG, "stream": True}),
                            srv.url + "/v1/chat/completions", "--next", "-sS", "-o", "/dev/null", "-H",
                            "content-type: application/json", "--compressed", "--data",
                            json.dumps({"model": "gpt-curl2", "messages": MSG}), srv.url + "/v1/chat/completions"],
                           check=True, timeout=30)
            n += 2
        recs = check_all(srv, n)
    flat = {r.request_model + ("/" + r.operation.value): r for rs in recs.values() for r in rs}
    assert flat["llama3/chat"].protocol is Protocol.OLLAMA and flat["llama3/chat"].stream is True
    assert flat["nomic/embeddings"].input_tokens == 2 and flat["nomic/embeddings"].output_tokens is None
    assert flat["gpt-rs/responses"].output_tokens == 7 and flat["gpt-rs/responses"].stream


def test_errors_and_cut_streams_are_recorded_as_such() -> None:
    with LLMServer() as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="error-400", messages=MSG)
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="error-500", messages=MSG)
        with pytest.raises(anthropic.NotFoundError):
            anthropic.Anthropic(base_url=srv.url, api_key="k", max_retries=0).messages.create(
                model="error-404", max_tokens=5, messages=MSG)
        with pytest.raises(Exception):
            list(c.chat.completions.create(model="cut-stream", messages=MSG, stream=True))
        with pytest.raises(Exception):
            c.chat.completions.create(model="cut-stream", messages=MSG)
        with pytest.raises(Exception):
            with anthropic.Anthropic(base_url=srv.url, api_key="k", max_retries=0).messages.stream(
                    model="cut-stream", max_tokens=5, messages=MSG) as s:
                list(s.text_stream)
        srv.wait_calls(5)
        recs = all_records(srv)
    flat = {}
    for rs in recs.values():
        for r in rs:
            flat.setdefault(r.request_model, []).append(r)
    assert flat["error-400"][0].status == 400 and flat["error-400"][0].error_type == "invalid_request_error"
    assert flat["error-500"][0].error_type == "server_error"
    assert flat["error-404"][0].error_type == "not_found_error" and flat["error-404"][0].protocol is Protocol.ANTHROPIC
    cut = flat["cut-stream"]
    assert len(cut) == 3
    for r in cut:
        assert r.incomplete and r.output_tokens is None and r.status == 200
    assert [r.stream for r in cut] == [True, False, True]


def test_large_prompt_still_yields_the_model_and_capture_redacts() -> None:
    big = "lorem ipsum " * 17_000          # ~200 KB; openai-python puts "model" after the messages
    secret = "my key is sk-proj-abcdefghijklmnopqrstuvwxyz and mail me at jane.doe@example.com"
    with LLMServer() as srv:
        with httpx.Client(base_url=srv.url) as h:      # "model" last, as openai-python 1.x serialises it
            h.post("/v1/chat/completions", headers={"content-type": "application/json"},
                   content=json.dumps({"messages": [{"role": "user", "content": big}], "model": "gpt-big"}))
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": big}])
        c.chat.completions.create(model="gpt-secret", messages=[{"role": "user", "content": secret}], stream=True)
        srv.wait_calls(3)
        raw = b"".join(b for d, _, b in srv.connections[0])
        assert raw.find(b'"model"') > raw.find(b"lorem")
        check_all(srv, 3)
        first = all_records(srv)[0]
        assert first[0].request_model == "gpt-big" and first[0].input_tokens == 34_001
        off = all_records(srv)[1]
        on = all_records(srv, content_cap=1000, capture_content=True, redact=[r"lorem"])[1]
    assert off[0].request_model == "gpt-big" and off[0].input_tokens == 34_001 and not off[0].truncated
    assert off[0].prompt_text is None and off[1].completion_text is None
    assert len(on[0].prompt_text or "") == 1000 and "lorem" not in (on[0].prompt_text or "")
    assert on[0].truncated
    p = on[1].prompt_text or ""
    assert "sk-proj" not in p and "jane.doe" not in p and p.count("[REDACTED]") == 2
    assert on[1].completion_text == "Hello from the local test server."
