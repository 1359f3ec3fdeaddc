"""Issue 22 items 3 and 4: the token limit of a request in every shape, caps, and budgets that hold for n and streams.

Pure parts (agent/gateway/limits.py, agent/gateway/usage.py, the BudgetBook) with Hypothesis; then the gateway
in-process on real sockets with the official openai SDK (Python, and the Node SDK when tests/node has it installed:
`npm install --prefix tests/node`) in front and a packing upstream behind: it honours `n`, puts a whole choice's
tokens in one SSE chunk, and sends usage only when asked for (or never, `usage=False`).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings, strategies as st

from agent.gateway.budget import BudgetBook, Exceeded, Limits
from agent.gateway.limits import UNBOUNDED, LimitError, TokenLimit, apply_cap, cap_field, token_limit
from agent.gateway.policy import Outcome, decide
from agent.gateway.usage import UsageChunkStrip, estimate_tokens, want_stream_usage
from agent.l7.llm import Operation, Protocol
from tests.unit.test_gateway_server import MSG, make_gateway, oai, policy_for, upstream  # noqa: F401 (fixtures)

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


# -- pure: the limit ------------------------------------------------------------------------------------------------
def test_the_largest_limit_field_is_judged_in_any_shape():
    assert token_limit({"max_tokens": 50, "max_completion_tokens": 5000}) == TokenLimit(
        5000, ("max_tokens", "max_completion_tokens"), 1)
    assert token_limit({"max_output_tokens": 70}).value == 70
    assert token_limit({"options": {"num_predict": 900}, "max_tokens": 3}).value == 900
    assert token_limit({"options": {"num_predict": -1}}).value == UNBOUNDED      # Ollama: until the context is full
    assert token_limit({"max_tokens": None}) == TokenLimit(None, (), 1)          # null is absent, as SDKs send it
    assert token_limit({"n": 8, "best_of": 3}).choices == 8
    assert token_limit({"n": 2, "best_of": 5}).choices == 5


@pytest.mark.parametrize("body,field", [
    ({"max_tokens": 5000.0}, "max_tokens"), ({"max_completion_tokens": "5000"}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_output_tokens": -3}, "max_output_tokens"),
    ({"options": {"num_predict": 10.5}}, "options.num_predict"), ({"n": 8.0}, "n"), ({"best_of": 0}, "best_of")])
def test_non_integer_limits_are_refused_naming_the_field(body, field):
    with pytest.raises(LimitError) as e:
        token_limit(body)
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("proto,op,field", [
    (Protocol.OPENAI, Operation.CHAT, "max_completion_tokens"), (Protocol.OPENAI, Operation.COMPLETION, "max_tokens"),
    (Protocol.OPENAI, Operation.RESPONSES, "max_output_tokens"), (Protocol.ANTHROPIC, Operation.MESSAGES, "max_tokens"),
    (Protocol.OLLAMA, Operation.CHAT, "options.num_predict")])
def test_a_cap_is_inserted_in_the_field_of_the_shape(proto, op, field):
    obj: dict[str, Any] = {"model": "m", "options": {"temperature": 0}} if proto is Protocol.OLLAMA else {"model": "m"}
    apply_cap(obj, token_limit(obj), 64, proto, op)
    assert cap_field(proto, op) == field
    got = obj["options"]["num_predict"] if field == "options.num_predict" else obj[field]
    assert got == 64 and token_limit(obj).value == 64
    if proto is Protocol.OLLAMA:
        assert obj["options"]["temperature"] == 0


def test_every_field_over_the_cap_is_lowered():
    obj = {"max_tokens": 50, "max_completion_tokens": 5000, "options": {"num_predict": -1}}
    apply_cap(obj, token_limit(obj), 100, Protocol.OPENAI, Operation.CHAT)
    assert obj == {"max_tokens": 50, "max_completion_tokens": 100, "options": {"num_predict": 100}}


def test_decide_reserves_n_times_and_inserts_the_cap():
    pol = policy_for(1, [{"models": ["gpt-4o"], "max_tokens": 100, "cap_max_tokens": True}])
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc)
    d = decide(pol, "chat", "openai", 1, "gpt-4o", None, 10, now, 8)
    assert (d.outcome, d.max_tokens, d.reserve_tokens) == (Outcome.SERVED, 100, 10 + 8 * 100)
    d = decide(pol, "chat", "openai", 1, "gpt-4o", 5000, 10, now, 3)
    assert (d.max_tokens, d.reserve_tokens) == (100, 310)


# -- pure: usage in streams -----------------------------------------------------------------------------------------
def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


USAGE = _sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
STREAM = [_sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}),
          _sse({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
          USAGE, b"data: [DONE]\n\n"]


@given(st.lists(st.integers(1, 40), max_size=30))
def test_the_usage_event_is_stripped_however_the_stream_is_cut(cuts):
    whole = b"".join(STREAM)
    f, out, at = UsageChunkStrip(), bytearray(), 0
    for c in cuts:
        out += f.feed(whole[at:at + c])
        at += c
    out += f.feed(whole[at:]) + f.flush()
    assert bytes(out) == whole.replace(USAGE, b"") and f.stripped == 1


def test_include_usage_is_asked_for_only_on_openai_streams():
    obj: dict[str, Any] = {"stream": True, "stream_options": {"x": 1}}
    assert want_stream_usage(obj, Protocol.OPENAI, Operation.CHAT) is True
    assert obj["stream_options"] == {"x": 1, "include_usage": True}
    assert want_stream_usage(obj, Protocol.OPENAI, Operation.CHAT) is None         # already asked: nothing to strip
    assert want_stream_usage({"stream": False}, Protocol.OPENAI, Operation.CHAT) is None
    assert want_stream_usage({"stream": True}, Protocol.OPENAI, Operation.RESPONSES) is None  # usage always sent
    assert want_stream_usage({"stream": True}, Protocol.ANTHROPIC, Operation.MESSAGES) is None
    assert [estimate_tokens(b) for b in (0, 1, 4, 5)] == [0, 1, 1, 2]


# -- property: the budget is never overspent by more than one reservation ---------------------------------------------
requests = st.lists(st.tuples(st.integers(1, 64), st.integers(1, 8), st.integers(0, 64), st.integers(0, 40),
                              st.booleans()), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(requests, st.integers(50, 3000), st.randoms(use_true_random=False))
def test_budget_property_served_total_stays_within_one_reservation(reqs, budget, rnd):
    """Requests (max_tokens, n, tokens the upstream really generates per choice, input, whether it names a limit) are
    admitted with the gateway's reservation (decide: input + n x limit) and settled in random order with what the
    upstream generated — at most the limit per choice, as a server honouring max_tokens does. Then the served total
    never exceeds the budget (so never more than one reservation over); without the n factor it does."""
    pol = policy_for(1, [{"models": ["m"], "max_tokens": 64, "cap_max_tokens": True, "tokens_per_minute": budget}])
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc)
    book = BudgetBook(lambda: 1_000_000.0)
    lim = Limits(tokens_per_minute=budget)
    open_: list[tuple[Any, int]] = []
    served, biggest = 0, 0

    def settle_one() -> None:
        nonlocal served
        r, used = open_.pop(rnd.randrange(len(open_)))
        book.settle(r, used)
        served += used
    for mt, n, gen, inp, named in reqs:
        d = decide(pol, "chat", "openai", 1, "m", mt if named else None, inp, now, n)
        assert d.max_tokens is not None and d.max_tokens <= 64
        r = book.reserve("k", lim, d.reserve_tokens)
        if not isinstance(r, Exceeded):
            used = inp + n * min(gen, d.max_tokens)        # what the upstream really spent
            biggest = max(biggest, d.reserve_tokens)
            open_.append((r, used))
        if open_ and rnd.random() < 0.5:
            settle_one()
    while open_:
        settle_one()
    assert served <= budget, (served, budget, biggest)


# -- through the gateway: a packing upstream honouring n -------------------------------------------------------------
class PackingUpstream:
    """OpenAI chat: n choices of `max_tokens` words each (default 40), each choice's words in ONE chunk; usage chunk
    only when include_usage (and `usage=True`). `spent` is the server's own count of output tokens."""

    def __init__(self, usage: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self.lock = threading.Lock()
        self.spent = 0
        self.bodies: list[dict[str, Any]] = []
        owner = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                n = int(body.get("n") or 1)
                mt = body.get("max_completion_tokens") or body.get("max_tokens") or 40
                words = ["tok"] * int(mt)
                with owner.lock:
                    owner.spent += n * len(words)
                    owner.bodies.append(body)
                base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                for i in range(n):
                    chunk(_sse({**base, "choices": [{"index": i, "delta": {"content": " ".join(words)},
                                                     "finish_reason": "length"}]}))
                if usage and (body.get("stream_options") or {}).get("include_usage"):
                    chunk(_sse({**base, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens":
                                                                  n * len(words), "total_tokens": 4 + n * len(words)}}))
                chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer((host, port), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(params=[True, False], ids=["usage", "no-usage"])
def packing(request):
    up = PackingUpstream(usage=request.param)
    yield up
    up.close()


BUDGET = 2000
MAXT = 40


def FIXED_CLOCK() -> float:      # one budget minute for the whole test: no window rolls over mid-test
    return 1_800_000_030.0


def _check_budget(h: Any, up: PackingUpstream, results: list[str], total: int) -> None:
    recs = h.drain(total)
    served = results.count("served")
    assert served > 0 and results.count("429") > 0 and served + results.count("429") == total
    reservation = max(math.ceil(x["request_bytes"] / 4) + 8 * MAXT for x in recs)
    assert up.spent <= BUDGET + reservation, (up.spent, BUDGET, reservation)
    settled, reserved = h.gw.budgets.committed(("chat", "openai"))
    assert reserved == 0 and settled >= up.spent          # what was debited covers what the server says it generated


def test_50_concurrent_n8_streams_from_the_python_sdk_stay_in_budget(packing, make_gateway):
    h = make_gateway(policy_for(packing.port, [{"models": ["gpt-4o"], "tokens_per_minute": BUDGET}]), packing.port,
                     clock=FIXED_CLOCK)

    async def one(c: openai.AsyncOpenAI) -> str:
        try:
            s = await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=MAXT, n=8, stream=True)
            got = [ch async for ch in s]
            assert all(ch.choices for ch in got)      # the usage chunk the client did not ask for is not seen
            return "served"
        except openai.RateLimitError:
            return "429"

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=h.url(), api_key="none", max_retries=0) as c:
            return list(await asyncio.gather(*(one(c) for _ in range(50))))
    results = asyncio.run(main())
    _check_budget(h, packing, results, 50)
    assert all(b["stream_options"] == {"include_usage": True} for b in packing.bodies)


NODE_SCRIPT = r"""
const OpenAI = require('openai');
const c = new OpenAI({baseURL: process.argv[process.argv.length - 1], apiKey: 'none', maxRetries: 0});
async function one() {
  try {
    const s = await c.chat.completions.create({model: 'gpt-4o', messages: [{role: 'user', content: 'hello'}],
                                               max_tokens: 40, n: 8, stream: true});
    for await (const ch of s) { if (!ch.choices.length) return 'usage-chunk-seen'; }
    return 'served';
  } catch (e) { return e.status === 429 ? '429' : 'error ' + e; }
}
Promise.all(Array.from({length: 50}, one)).then(r => console.log(JSON.stringify(r)));
"""


@pytest.mark.skipif(shutil.which("node") is None or not (NODE_DIR / "node_modules" / "openai").is_dir(),
                    reason="the Node openai SDK is not installed (npm install --prefix tests/node)")
def test_50_concurrent_n8_streams_from_the_node_sdk_stay_in_budget(make_gateway, tmp_path):
    up = PackingUpstream(usage=False)
    try:
        h = make_gateway(policy_for(up.port, [{"models": ["gpt-4o"], "tokens_per_minute": BUDGET}]), up.port,
                         clock=FIXED_CLOCK)
        out = subprocess.run(["node", "-e", NODE_SCRIPT, h.url()], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")}, check=True)
        results = json.loads(out.stdout)
        assert set(results) <= {"served", "429"}, results
        _check_budget(h, up, results, 50)
    finally:
        up.close()


# -- through the gateway: the limit fields ----------------------------------------------------------------------------
def _sent(upstream: Any) -> bytes:
    return b"".join(b for conn in upstream.connections.values() for d, _, b in conn if d.name == "REQUEST")


def test_a_small_max_tokens_next_to_a_large_max_completion_tokens_is_judged_by_the_large(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "max_tokens": 100}]), upstream.port)
    with pytest.raises(openai.BadRequestError) as e:
        oai(h).chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=50, max_completion_tokens=5000)
    assert e.value.code == "max_tokens_exceeded" and upstream.calls == []


@pytest.mark.parametrize("value", [5000.0, "5000", True])
def test_a_non_integer_limit_is_refused_with_a_clear_error(upstream, make_gateway, value):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "max_tokens": 100}]), upstream.port)
    with pytest.raises(openai.BadRequestError) as e:
        oai(h).chat.completions.create(model="gpt-4o", messages=MSG, extra_body={"max_tokens": value})
    assert e.value.code == "invalid_token_limit" and "max_tokens" in str(e.value) and upstream.calls == []
    assert h.drain(1)[0]["reason"] == "invalid_token_limit"


def test_cap_max_tokens_inserts_the_cap_when_the_request_names_none(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "max_tokens": 3, "cap_max_tokens": True}]),
                     upstream.port)
    oai(h).chat.completions.create(model="gpt-4o", messages=MSG)
    assert b'"max_completion_tokens": 3' in _sent(upstream)
    rec = h.drain(1)[0]
    assert (rec["max_tokens"], rec["sent_max_tokens"]) == (None, 3) and "inserted" in rec["reason"]
    assert rec["response_id"] and rec["choice_count"] is None      # gen_ai.response.id from the gateway's record too
