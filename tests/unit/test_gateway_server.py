"""The gateway in-process, on real sockets, with the real SDKs in front and tests/llm_server.py behind.

The kernel's part (which connection came from whom, to where) is played by a StaticOrigins table the test fills:
the test client's address (127.0.0.1, any port) -> an origin pointing at the local upstream. Helpers here are
imported by the other test_gateway_* files.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import anthropic
import openai
import pytest

from agent.gateway.ca import NodeCA
from agent.gateway.policy import GatewayPolicy
from agent.gateway.records import GatewayRecordReceiver, RecordSender
from agent.gateway.server import Gateway, GatewayOrigin, GatewaySettings, StaticOrigins
from tests.llm_server import LLMServer

MSG = [{"role": "user", "content": "hello there gateway"}]


def policy_for(port: int, rules: list[dict[str, Any]], *, protocol: str = "openai", llm: dict[str, Any] | None = None,
               mode: str | None = None, dest: str = "openai") -> GatewayPolicy:
    cfg: dict[str, Any] = {
        "identities": [{"name": "chat", "kind": "process"},
                       {"name": dest, "kind": "external", "endpoints": [f"127.0.0.1:{port}"],
                        "llm": {"protocol": protocol, "gateway": "enforce", **(llm or {})}}],
        "policies": [{"from": "chat", "to": dest, **r} for r in rules]}
    if mode:
        cfg["gateway"] = {"mode": mode}
    return GatewayPolicy.from_json(GatewayPolicy.from_config_dict(cfg).to_json())   # what the process reads


class GatewayHarness:
    """A Gateway on its own event loop thread; records go to a real GatewayRecordReceiver."""

    def __init__(self, policy: GatewayPolicy, upstream_port: int, tmp: Path, *, tls: bool = False,
                 dest: str = "openai", ca: NodeCA | None = None, settings: GatewaySettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.origins = StaticOrigins()
        self.origins.add("127.0.0.1", 0, GatewayOrigin("127.0.0.1", upstream_port, "chat", dest, tls))
        self.receiver = GatewayRecordReceiver(tmp / "records.sock")
        self.sender = RecordSender(tmp / "records.sock")
        self.gw = Gateway(policy, self.origins, self.sender, ca, settings or GatewaySettings(port=0), clock)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host, self.port = self.run(self.gw.start())
        self.records: list[dict[str, Any]] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def url(self, scheme: str = "http", suffix: str = "/v1") -> str:
        return f"{scheme}://{self.host}:{self.port}{suffix}"

    def drain(self, n: int | None = None, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Records so far; with n, wait until there are n (the record is sent after the last byte)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.records += self.receiver.drain()
            if n is None or len(self.records) >= n or time.monotonic() > deadline:
                return self.records
            time.sleep(0.01)

    def close(self) -> None:
        self.run(self.gw.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
        self.sender.close()
        self.receiver.close()


@pytest.fixture
def upstream():
    with LLMServer() as srv:
        yield srv


@pytest.fixture
def make_gateway(tmp_path: Path):
    made: list[GatewayHarness] = []

    def make(policy: GatewayPolicy, port: int, **kw: Any) -> GatewayHarness:
        h = GatewayHarness(policy, port, tmp_path, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def oai(h: GatewayHarness, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=h.url(), api_key="sk-workload-none", max_retries=0, **kw)


# -- a gated upstream: proves chunks are passed on as they come -----------------------------------------------------
class GatedUpstream:
    """Sends the first SSE chunk of a stream, then waits for `release` before the rest."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.rest_sent = threading.Event()
        self.requests = 0
        owner = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(obj: Any) -> None:
                    data = f"data: {json.dumps(obj)}\n\n".encode() if obj is not None else b"data: [DONE]\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
                chunk({**base, "choices": [{"index": 0, "delta": {"content": "first"}, "finish_reason": None}]})
                owner.release.wait(20)
                owner.rest_sent.set()
                chunk({**base, "choices": [{"index": 0, "delta": {"content": " rest"}, "finish_reason": "stop"}]})
                chunk({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                        "total_tokens": 5}})
                chunk(None)
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "GatedUpstream":
        self.thread.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# -- test CAs and TLS upstreams --------------------------------------------------------------------------------------
def tls_upstream_context(tmp: Path, *names: str) -> tuple[ssl.SSLContext, Path]:
    """A server context for the upstream, from a test CA of its own; returns it and the CA's PEM path."""
    ca = NodeCA(tmp / "upstream-ca")
    chain, key = ca.issue(*names)
    (tmp / "up.pem").write_bytes(chain)
    (tmp / "up-key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "up.pem", tmp / "up-key.pem")
    return ctx, ca.dir / "ca.pem"


# ====================================================================================================================
def test_allowed_model_served_plain_and_streamed_with_records(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o*"]}]), upstream.port)
    c = oai(h)
    r = c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=50)
    assert r.model == "gpt-4o-served" and r.choices[0].message.content == "Hello from the local test server."
    parts = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True}) if ch.choices]
    assert "".join(p or "" for p in parts) == "Hello from the local test server."
    calls = upstream.wait_calls(2)
    assert [x.request_model for x in calls] == ["gpt-4o", "gpt-4o-mini"]
    recs = h.drain(2)
    assert [(x["gateway"], x["decision"], x["policy"], x["request_model"], x["sent_model"]) for x in recs] == [
        (True, "served", "policies[0]", "gpt-4o", "gpt-4o"), (True, "served", "policies[0]", "gpt-4o-mini",
                                                             "gpt-4o-mini")]
    assert (recs[0]["input_tokens"], recs[0]["output_tokens"]) == (calls[0].input_tokens, calls[0].output_tokens)
    assert recs[0]["stream"] is False
    assert recs[1]["stream"] is True and recs[1]["output_tokens"] == calls[1].output_tokens == 7
    assert recs[1]["output_chunks"] > 7
    assert recs[0]["response_model"] == "gpt-4o-served" and recs[0]["status"] == 200


def test_stream_chunks_arrive_before_the_upstream_sends_the_rest(make_gateway):
    with GatedUpstream() as up:
        h = make_gateway(policy_for(up.port, [{"models": ["gpt-4o"]}]), up.port)
        seen: list[tuple[str, bool]] = []
        for ch in oai(h).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                seen.append((ch.choices[0].delta.content, up.rest_sent.is_set()))
                up.release.set()
        assert seen == [("first", False), (" rest", True)]
        rec = h.drain(1)[0]
        assert rec["decision"] == "served" and rec["input_tokens"] == 3 and rec["output_tokens"] == 2


def test_anthropic_served_and_refused_in_its_own_error_shape(upstream, make_gateway):
    pol = policy_for(upstream.port, [{"models": ["claude-3-5-*"]}], protocol="anthropic", dest="anthropic")
    h = make_gateway(pol, upstream.port, dest="anthropic")
    c = anthropic.Anthropic(base_url=h.url(suffix=""), api_key="none", max_retries=0)
    m = c.messages.create(model="claude-3-5-haiku", max_tokens=64, messages=MSG)
    assert m.model == "claude-3-5-haiku-served"
    with c.messages.stream(model="claude-3-5-sonnet", max_tokens=64, messages=MSG) as s:
        assert "".join(s.text_stream) == "Hello from the local test server."
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model="claude-opus-4", max_tokens=64, messages=MSG)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "permission_error"
    assert "policies[0]" in e.value.body["error"]["message"]
    calls = upstream.wait_calls(2)
    assert [x.request_model for x in calls] == ["claude-3-5-haiku", "claude-3-5-sonnet"]
    recs = h.drain(3)
    assert [x["decision"] for x in recs] == ["served", "served", "refused"]
    assert (recs[1]["input_tokens"], recs[1]["output_tokens"]) == (calls[1].input_tokens, calls[1].output_tokens)


def test_disallowed_model_is_permission_denied_naming_policy_and_nothing_forwarded(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o*", "text-embedding-3-*"]}]), upstream.port)
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(h).chat.completions.create(model="o1-preview", messages=MSG)
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    assert e.value.type == "permission_denied"
    msg = e.value.body["message"]
    assert "chat" in msg and "o1-preview" in msg and "policies[0]" in msg
    assert upstream.calls == [] and upstream.connections == {}
    rec = h.drain(1)[0]
    assert (rec["decision"], rec["reason"], rec["policy"], rec["status"]) == (
        "refused", "model_not_allowed", "policies[0]", 403)


def test_model_name_after_a_big_messages_array_is_judged(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"]}]), upstream.port)
    big = [{"role": "user", "content": "word " * 50_000}]
    with pytest.raises(openai.PermissionDeniedError):
        oai(h).chat.completions.create(messages=big, model="o1")     # openai-python sends model after messages
    assert upstream.calls == []
    r = oai(h).chat.completions.create(messages=big, model="gpt-4o", max_tokens=2)
    assert r.usage.prompt_tokens > 50_000 and upstream.wait_calls(1)[0].request_model == "gpt-4o"


def test_max_tokens_over_cap_refused_or_capped(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "max_tokens": 3},
                                                {"models": ["gpt-4o-mini"], "max_tokens": 3,
                                                 "cap_max_tokens": True}]), upstream.port)
    with pytest.raises(openai.BadRequestError) as e:
        oai(h).chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=100)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error" and "policies[0]" in str(e.value)
    assert upstream.calls == []
    r = oai(h).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    sent = b"".join(b for conn in upstream.connections.values() for d, _, b in conn if d.name == "REQUEST")
    assert b'"max_tokens": 3' in sent and b'"max_tokens": 100' not in sent
    recs = h.drain(2)
    assert (recs[1]["max_tokens"], recs[1]["sent_max_tokens"], recs[1]["policy"]) == (100, 3, "policies[1]")


def test_tokens_per_minute_holds_under_50_concurrent_streams(upstream, make_gateway):
    budget = 200
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "tokens_per_minute": budget}]),
                     upstream.port)

    async def one(c: openai.AsyncOpenAI) -> str:
        try:
            s = await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=7, stream=True,
                                                stream_options={"include_usage": True})
            async for _ in s:
                pass
            return "served"
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded" and int(e.response.headers["retry-after-ms"]) > 0
            return "429"

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=h.url(), api_key="none", max_retries=0) as c:
            return await asyncio.gather(*(one(c) for _ in range(50)))
    results = asyncio.run(main())
    served = [c for c in upstream.wait_calls(results.count("served"))]
    assert results.count("429") > 0 and results.count("served") > 0
    total = sum((c.input_tokens or 0) + (c.output_tokens or 0) for c in served)
    recs = h.drain(50)
    reservation = max(x["max_tokens"] + x["request_bytes"] // 4 + 1 for x in recs)
    assert total <= budget + reservation
    assert sum(1 for x in recs if x["reason"] == "tokens_per_minute") == results.count("429")
    settled, reserved = h.gw.budgets.committed(("chat", "openai"))
    assert reserved == 0 and settled <= budget + reservation


def test_requests_per_minute_and_daily_quota(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "requests_per_minute": 2},
                                                {"models": ["gpt-4o-mini"], "tokens_per_day": 40}]), upstream.port)
    c = oai(h)
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after-ms"]) > 0
    # the daily budget: the second reservation does not fit; openai-python must not retry it (x-should-retry)
    h2 = openai.OpenAI(base_url=h.url(), api_key="none", max_retries=2)
    with pytest.raises(openai.RateLimitError) as e2:
        for _ in range(3):
            h2.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    assert e2.value.code == "insufficient_quota" and e2.value.response.headers["x-should-retry"] == "false"
    recs = h.drain()
    refused = [x for x in recs if x["decision"] == "refused"]
    assert [x["reason"] for x in refused] == ["requests_per_minute", "tokens_per_day"]     # no retries arrived
    assert len(upstream.wait_calls(len(recs) - 2)) == len(recs) - 2


def test_deprecated_model_before_and_after_sunset(upstream, make_gateway):
    sunset = "2026-06-30T00:00:00Z"
    llm = {"models": [{"name": "gpt-4-0613", "deprecated": {"sunset": sunset, "successor": "gpt-4o"}},
                      {"name": "gpt-3.5-turbo", "deprecated": {"sunset": sunset}}]}
    pol = policy_for(upstream.port, [{"models": ["gpt-4o*", "gpt-4-0613"]}], llm=llm)
    before = 1_780_000_000.0 - 10 * 86400     # 2026-05-18
    after = 1_790_000_000.0                   # 2026-09-21
    h = make_gateway(pol, upstream.port, clock=lambda: before)
    r = oai(h).chat.completions.create(model="gpt-4-0613", messages=MSG)
    assert r.model == "gpt-4-0613-served"
    rec = h.drain(1)[0]
    assert rec["deprecated"] is True and rec["sent_model"] == "gpt-4-0613" and "retires" in rec["reason"]

    strict = policy_for(upstream.port, [{"models": ["gpt-4o*"]}], llm=llm)     # allow-lists name current models
    h2 = make_gateway(strict, upstream.port, clock=lambda: after)
    raw = oai(h2).chat.completions.with_raw_response.create(model="gpt-4-0613", messages=MSG)
    assert raw.headers["x-aimesh-requested-model"] == "gpt-4-0613" and raw.headers["x-aimesh-sent-model"] == "gpt-4o"
    assert raw.parse().model == "gpt-4o-served"
    assert upstream.wait_calls(2)[-1].request_model == "gpt-4o"
    rec = h2.drain(1)[0]
    assert (rec["request_model"], rec["sent_model"], rec["decision"]) == ("gpt-4-0613", "gpt-4o", "served")
    with pytest.raises(openai.NotFoundError) as e:
        oai(h2).chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
    assert "retired" in str(e.value) and len(upstream.calls) == 2
    assert h2.drain(2)[-1]["reason"] == "model_retired"


def test_audit_mode_serves_and_records_would_deny(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "max_tokens": 5}], mode="audit"),
                     upstream.port)
    r = oai(h).chat.completions.create(model="o1", messages=MSG, max_tokens=50)
    assert r.model == "o1-served"
    assert upstream.wait_calls(1)[0].request_model == "o1"
    rec = h.drain(1)[0]
    assert (rec["decision"], rec["reason"], rec["status"]) == ("would_deny", "model_not_allowed", 200)


def test_intercept_with_node_ca_and_verified_upstream(tmp_path, make_gateway, monkeypatch):
    up_ctx, up_ca = tls_upstream_context(tmp_path, "127.0.0.1", "api.example.test")
    node = NodeCA(tmp_path / "node-ca")
    with LLMServer(tls=up_ctx) as srv:
        pol = policy_for(srv.port, [{"models": ["gpt-4o"]}], llm={"tls": "intercept", "upstream_ca": str(up_ca)})
        h = make_gateway(pol, srv.port, tls=True, ca=node)
        monkeypatch.setenv("SSL_CERT_FILE", str(node.dir / "ca.pem"))
        c = openai.OpenAI(base_url=h.url("https"), api_key="none", max_retries=0)
        assert c.chat.completions.create(model="gpt-4o", messages=MSG).model == "gpt-4o-served"
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="o1", messages=MSG)
        # with SNI: the leaf names the client's server name, and the upstream is verified against that name
        ctx = ssl.create_default_context(cafile=str(node.dir / "ca.pem"))
        import socket
        with socket.create_connection((h.host, h.port)) as raw, ctx.wrap_socket(
                raw, server_hostname="api.example.test") as s:
            body = json.dumps({"model": "gpt-4o", "messages": MSG}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.test\r\nContent-Type: "
                      b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            got = _read_all(s)
        assert got.startswith(b"HTTP/1.1 200") and b"gpt-4o-served" in got
        assert len(srv.wait_calls(2)) == 2
        recs = h.drain(3)
        assert all(x["tls"] for x in recs)


def test_intercept_upstream_not_trusted_is_502_and_not_served(tmp_path, make_gateway, monkeypatch):
    up_ctx, _ = tls_upstream_context(tmp_path, "127.0.0.1")
    other = NodeCA(tmp_path / "other-ca")
    node = NodeCA(tmp_path / "node-ca")
    with LLMServer(tls=up_ctx) as srv:
        pol = policy_for(srv.port, [{"models": ["gpt-4o"]}],
                         llm={"tls": "intercept", "upstream_ca": str(other.dir / "ca.pem")})
        h = make_gateway(pol, srv.port, tls=True, ca=node)
        monkeypatch.setenv("SSL_CERT_FILE", str(node.dir / "ca.pem"))
        c = openai.OpenAI(base_url=h.url("https"), api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="gpt-4o", messages=MSG)
        assert e.value.status_code == 502 and srv.calls == []


def test_originate_injects_the_key(tmp_path, make_gateway):
    up_ctx, up_ca = tls_upstream_context(tmp_path, "127.0.0.1")
    key = tmp_path / "openai.key"
    key.write_text("sk-provider-key-0123456789abcdef\n")
    with LLMServer(tls=up_ctx) as srv:
        pol = policy_for(srv.port, [{"models": ["gpt-4o"]}],
                         llm={"tls": "originate", "upstream_ca": str(up_ca), "api_key_file": str(key)})
        h = make_gateway(pol, srv.port)
        r = oai(h).chat.completions.create(model="gpt-4o", messages=MSG)
        assert r.model == "gpt-4o-served"
        sent = b"".join(b for conn in srv.connections.values() for d, _, b in conn if d.name == "REQUEST")
        assert b"Authorization: Bearer sk-provider-key-0123456789abcdef\r\n" in sent
        assert b"sk-workload-none" not in sent


def test_no_origin_connection_is_closed_and_counted(upstream, make_gateway):
    import socket
    h = make_gateway(policy_for(upstream.port, [{}]), upstream.port)
    for _ in range(2):
        s = socket.socket()
        s.settimeout(10)
        s.bind(("127.0.0.2", 0))       # not a peer the (test) kernel recorded
        s.connect((h.host, h.port))
        try:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            got = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        s.close()
        assert got == b""
    assert h.gw.counters.no_origin == 2 and upstream.connections == {}
    c = openai.OpenAI(base_url=h.url(), api_key="none", max_retries=0,
                      http_client=openai.DefaultHttpxClient(transport=_bound_transport("127.0.0.2")))
    with pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert upstream.connections == {}


def _bound_transport(ip: str) -> Any:
    import httpx2       # openai-python's HTTP client
    return httpx2.HTTPTransport(local_address=ip)


def _read_all(s: Any) -> bytes:
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not b:
            break
        out += b
    return out


def test_exact_peer_entry_is_read_once(upstream, make_gateway):
    import socket
    h = make_gateway(policy_for(upstream.port, [{}]), upstream.port)
    h.origins._by_peer.clear()
    s = socket.socket()
    s.settimeout(10)
    s.bind(("127.0.0.1", 0))
    h.origins.add("127.0.0.1", s.getsockname()[1], GatewayOrigin("127.0.0.1", upstream.port, "chat", "openai",
                                                                 False))
    s.connect((h.host, h.port))
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_all(s).startswith(b"HTTP/1.1 200")
    s.close()
    assert h.origins.lookup("127.0.0.1", 1) is None


def test_client_leaving_mid_stream_settles_and_records_incomplete(make_gateway):
    import socket
    with GatedUpstream() as up:
        h = make_gateway(policy_for(up.port, [{"models": ["gpt-4o"], "tokens_per_minute": 10_000}]), up.port)
        body = json.dumps({"model": "gpt-4o", "messages": MSG, "stream": True, "max_tokens": 50}).encode()
        s = socket.create_connection((h.host, h.port), timeout=15)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"first" not in got:
            b = s.recv(65536)
            assert b, got
            got += b
        assert h.gw.budgets.committed(("chat", "openai"))[1] > 0          # reserved while the stream is open
        s.close()
        up.release.set()
        rec = h.drain(1)[0]
        assert rec["decision"] == "served" and rec["incomplete"] is True
        settled, reserved = h.gw.budgets.committed(("chat", "openai"))
        assert reserved == 0 and settled > 0


def test_upstream_down_is_502_and_the_reservation_released(make_gateway):
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        dead = sk.getsockname()[1]            # bound, never listening: connections are refused
        h = make_gateway(policy_for(dead, [{"models": ["gpt-4o"], "tokens_per_minute": 10_000}]), dead)
        with pytest.raises(openai.InternalServerError) as e:
            oai(h).chat.completions.create(model="gpt-4o", messages=MSG)
        assert e.value.status_code == 502 and e.value.code == "upstream_error"
        assert h.gw.budgets.committed(("chat", "openai")) == (0, 0)
        rec = h.drain(1)[0]
        assert rec["status"] == 502 and rec["reason"].startswith("upstream:")


def test_audit_mode_over_budget_is_served_and_recorded(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"], "requests_per_minute": 1}], mode="audit"),
                     upstream.port)
    for _ in range(2):
        oai(h).chat.completions.create(model="gpt-4o", messages=MSG)
    assert len(upstream.wait_calls(2)) == 2
    assert [(r["decision"], r["reason"]) for r in h.drain(2)] == [("served", None),
                                                                 ("would_deny", "requests_per_minute")]


def test_upstream_cutting_a_stream_is_passed_on_and_settled(upstream, make_gateway):
    h = make_gateway(policy_for(upstream.port, [{"models": ["cut-stream", "error-*"],
                                                 "tokens_per_minute": 100_000}]), upstream.port)
    with pytest.raises(openai.APIConnectionError):
        for _ in oai(h).chat.completions.create(model="cut-stream", messages=MSG, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):            # the upstream's own error, passed through as it came
        oai(h).chat.completions.create(model="error-400", messages=MSG)
    recs = h.drain(2)
    assert recs[0]["incomplete"] is True and recs[0]["output_tokens"] is None
    assert (recs[1]["status"], recs[1]["error_type"]) == (400, "invalid_request_error")
    settled, reserved = h.gw.budgets.committed(("chat", "openai"))
    assert reserved == 0 and 0 < settled < 100                # the cut stream charged what it sent; the error nothing
