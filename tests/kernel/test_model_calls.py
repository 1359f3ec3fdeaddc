"""Model calls seen from the kernel, plaintext: real clients in a governed cgroup call tests/llm_server.py in another;
bpf/capture.c copies the socket's bytes, the agent decodes them, and every record in the agent's records log must say
what the server says it sent (the server reports its calls; nothing here hard-codes the answers).

One agent and two servers for the whole module: `llama` (capture on, content off) and `scribe` (capture_content on).
Every request in the module has its own model name, so a record is matched to the server's call by request model, and
a request/response mix-up shows as a wrong response model or token count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from tests.kernel.harness import REPO, AgentProc, CgroupTree, _enter_cgroup, metric_value, start_agent

KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"
MAIL = "alice@example.com"
SECRET_PROMPT = f"my key is {KEY} and my mail is {MAIL}, please answer"

CLIENT = r'''
import asyncio, json, subprocess, sys
import httpx, openai     # anthropic and requests are imported where used: the imports are most of a client's time

url, case = sys.argv[1], sys.argv[2]
MSG = [{"role": "user", "content": "say hello to the kernel"}]
seen = []

def note(model, **kw):
    seen.append({"model": model, **kw})

def oa_sync(prefix, msg=MSG):
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    r = c.chat.completions.create(model=prefix, messages=msg)
    note(prefix, served=r.model)
    r = c.chat.completions.create(model=prefix + "-len", messages=msg, max_tokens=3)
    note(prefix + "-len", served=r.model)
    for name, so in ((prefix + "-s-usage", {"include_usage": True}), (prefix + "-s", None)):
        kw = {"stream_options": so} if so else {}
        for ch in c.chat.completions.create(model=name, messages=msg, stream=True, **kw):
            pass
        note(name)
    c.close()

def oa_more(prefix):
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    c.embeddings.create(model=prefix + "-emb", input="some text to embed")
    c.completions.create(model=prefix + "-cmpl", prompt="once upon a time")
    c.responses.create(model=prefix + "-resp", input="hello there")
    for _ in c.responses.create(model=prefix + "-resp-s", input="hello there", stream=True):
        pass
    c.close()

async def oa_async(prefix):
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    r = await c.chat.completions.create(model=prefix, messages=MSG)
    note(prefix, served=r.model)
    for name, iu in ((prefix + "-s-usage", True), (prefix + "-s-nousage", False)):
        s = await c.chat.completions.create(model=name, messages=MSG, stream=True,
                                            stream_options={"include_usage": iu})
        async for ch in s:
            pass
        note(name)
    await c.close()

def anth_sync():
    import anthropic
    c = anthropic.Anthropic(base_url=url, api_key="sk-ant-test", max_retries=0)
    c.messages.create(model="an-sync", max_tokens=64, messages=MSG)
    c.messages.create(model="an-sync-len", max_tokens=4, messages=MSG)
    with c.messages.stream(model="an-sync-s", max_tokens=64, messages=MSG) as s:
        for _ in s.text_stream:
            pass
    note("an-sync")
    c.close()

async def anth_async():
    import anthropic
    c = anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-test", max_retries=0)
    await c.messages.create(model="an-async", max_tokens=64, messages=MSG)
    s = await c.messages.create(model="an-async-s", max_tokens=64, messages=MSG, stream=True)
    async for _ in s:
        pass
    await c.close()

def others():
    import requests
    with httpx.Client(base_url=url) as h:     # Ollama /api/chat: NDJSON stream by default
        with h.stream("POST", "/api/chat", json={"model": "ol-chat-s", "messages": MSG}) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x]
        assert lines[-1]["done"] is True, lines
        r = h.post("/api/chat", json={"model": "ol-chat", "messages": MSG, "stream": False})
        assert r.json()["done"] is True
    with requests.Session() as s:
        r = s.post(url + "/v1/chat/completions", json={"model": "rq-chat", "messages": MSG})
        assert r.status_code == 200
        r = s.post(url + "/v1/chat/completions", json={"model": "rq-chat-s", "messages": MSG, "stream": True},
                   stream=True)
        assert any(b"[DONE]" in x for x in r.iter_lines())
    for model, extra in (("curl-chat", {}), ("curl-chat-s", {"stream": True})):
        body = json.dumps({"model": model, "messages": MSG, **extra})
        out = subprocess.run(["curl", "-sS", "-N", "-H", "Content-Type: application/json", "--data-binary", body,
                              url + "/v1/chat/completions"], capture_output=True, text=True, check=True)
        assert "local" in out.stdout, out

async def fifty():
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0,
                           http_client=httpx.AsyncClient(limits=limits))
    async def one(i):
        s = await c.chat.completions.create(model=f"c50-{i}", messages=MSG, max_tokens=1 + i % 7, stream=True,
                                            stream_options={"include_usage": True})
        n = 0
        async for ch in s:
            if ch.choices and ch.choices[0].delta.content:
                n += 1
        note(f"c50-{i}", chunks=n)
    await asyncio.gather(*(one(i) for i in range(50)))
    await c.close()

def big():
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    msg = [{"role": "user", "content": "lorem ipsum " * (200_000 // 12)}]
    c.chat.completions.create(model="big-prompt", messages=msg)
    c.close()

def errors():
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    for m in ("error-400", "error-404", "error-500"):
        try:
            c.chat.completions.create(model=m, messages=MSG)
            raise SystemExit(f"{m} did not fail")
        except openai.APIStatusError as e:
            note(m, status=e.status_code)
    try:
        for _ in c.chat.completions.create(model="cut-stream", messages=MSG, stream=True):
            pass
        raise SystemExit("cut-stream was not cut")
    except Exception as e:      # the SDKs raise httpx2 errors from inside a stream
        note("cut-stream", error=type(e).__name__)
    c.close()
    import anthropic     # the server's magic names are fixed: Anthropic's errors go to the other server
    a = anthropic.Anthropic(base_url=sys.argv[3], api_key="sk-ant-test", max_retries=0)
    try:
        a.messages.create(model="error-500", max_tokens=64, messages=MSG)
        raise SystemExit("anthropic error-500 did not fail")
    except anthropic.APIStatusError as e:
        note("anthropic error-500", status=e.status_code)
    try:
        with a.messages.stream(model="cut-stream", max_tokens=64, messages=MSG) as s:
            for _ in s.text_stream:
                pass
        raise SystemExit("anthropic cut-stream was not cut")
    except Exception as e:
        note("anthropic cut-stream", error=type(e).__name__)
    a.close()

def content():
    msg = [{"role": "user", "content": sys.argv[3]}]
    for target in sys.argv[4:]:       # url=model-prefix
        base, p = target.split("=", 1)
        c = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        c.chat.completions.create(model=p, messages=msg)
        for _ in c.chat.completions.create(model=p + "-s", messages=msg, stream=True):
            pass
        c.close()

if case == "openai":
    oa_sync("oa-sync")
    oa_more("oa")
    asyncio.run(oa_async("oa-async"))
elif case == "ungoverned":
    oa_sync("ungov")
elif case == "anthropic":
    anth_sync()
    asyncio.run(anth_async())
elif case == "others":
    others()
elif case == "fifty":
    asyncio.run(fifty())
elif case == "big":
    big()
elif case == "errors":
    errors()
elif case == "content":
    content()
elif case == "barrier":
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    c.chat.completions.create(model=sys.argv[3], messages=MSG)
    c.close()
else:
    raise SystemExit(f"unknown case {case}")
print(json.dumps(seen))
'''


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def sent(self) -> dict[str, dict[str, Any]]:
        """What the server answered so far, by request model."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("calls\n")
        self.proc.stdin.flush()
        return {c["request_model"]: c for c in json.loads(self.proc.stdout.readline())}


@dataclass
class Mesh:
    tree: CgroupTree
    agent: AgentProc
    records: Path
    chat: Path
    llama: Server
    scribe: Server      # capture_content: true

    def run(self, case: str, *args: str, url: Optional[str] = None, governed: bool = True) -> list[dict]:
        """Run one CLIENT case in the chat cgroup (or, not governed, outside the governed root); what it saw."""
        cg = self.chat if governed else None
        p = subprocess.run([sys.executable, "-c", CLIENT, url or self.llama.url, case, *args], capture_output=True,
                           text=True, timeout=120, preexec_fn=_enter_cgroup(cg), cwd=REPO)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    def calls(self) -> list[dict]:
        recs = [json.loads(x) for x in self.records.read_text().splitlines() if x.strip()] \
            if self.records.exists() else []
        return [r for r in recs if r.get("kind") == "model_call"]

    def wait(self, models: set[str], timeout: float = 10.0, to: str = "llama") -> dict[str, dict]:
        """The records of these request models to `to`, by model; waits until all are in (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            got = {c["request_model"]: c for c in self.calls()
                   if c["request_model"] in models and c["destination"]["name"] == to}
            if set(got) == models or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def barrier(self, name: str) -> None:
        """A captured call, waited for: records of anything captured before it are in the log (ring order)."""
        self.run("barrier", name)
        assert name in self.wait({name}), f"barrier call {name} not recorded"

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.agent.get("/metrics")[1], name, **labels)


def _start_server(cgroup: Path) -> Server:
    p = subprocess.Popen([sys.executable, "-m", "tests.llm_server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=_enter_cgroup(cgroup))
    assert p.stdout is not None and p.stderr is not None
    url = p.stdout.readline().strip()
    if not url:
        p.kill()
        raise AssertionError(f"llm server did not start: {p.stderr.read()}")
    return Server(p, url)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests load BPF programs: run as root")
    tmp = tmp_path_factory.mktemp("model_calls")
    tree = CgroupTree()
    servers: list[Server] = []
    agent: Optional[AgentProc] = None
    try:
        chat, llama, scribe = tree.child("chat"), tree.child("llama"), tree.child("scribe")
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "select": {"cgroups": [tree.rel(chat)]}},
                {"name": "llama", "kind": "model", "select": {"cgroups": [tree.rel(llama)]}},
                {"name": "scribe", "kind": "model", "select": {"cgroups": [tree.rel(scribe)]},
                 "llm": {"capture_content": True}},
            ],
            "policies": [{"from": "chat", "to": ["llama", "scribe"]}],
        }
        records = tmp / "records.jsonl"
        agent = start_agent(tmp, tree.root, cfg, ["--records-log", str(records)])
        servers.append(_start_server(llama))
        servers.append(_start_server(scribe))
        yield Mesh(tree, agent, records, chat, servers[0], servers[1])
    finally:
        if agent is not None:
            agent.stop()
        for s in servers:
            s.proc.kill()
            s.proc.wait()
        tree.cleanup()


def check(rec: dict, sent: dict) -> None:
    """A record says what the server sent."""
    m = sent["request_model"]
    assert rec["request_model"] == m
    assert rec["status"] == sent["status"], m
    assert rec["stream"] == sent["stream"], m
    assert rec["source"]["name"] == "chat", m
    assert rec["cookie"] > 0 and rec["source"]["pid"] > 0, m
    assert rec["duration_ns"] is not None and rec["duration_ns"] > 0, m
    if sent["cut"]:
        assert rec["incomplete"], m
        assert rec["output_tokens"] is None, m      # unknown, not zero
        assert rec["input_tokens"] == sent["input_tokens"], m
        return
    assert not rec["incomplete"], m
    assert rec["error_type"] == sent["error_type"], m
    if sent["status"] >= 400:
        return
    assert rec["response_model"] == sent["response_model"], m
    assert rec["input_tokens"] == sent["input_tokens"], m
    assert rec["output_tokens"] == sent["output_tokens"], m
    assert rec["finish_reasons"] == ([sent["finish_reason"]] if sent["finish_reason"] else []), m
    assert not rec["truncated"], m
    ttfc = rec["time_to_first_chunk_ns"]
    assert ttfc is not None and 0 < ttfc <= rec["duration_ns"], m
    if rec["stream"]:
        assert rec["output_chunks"] > 1 and rec["time_per_output_chunk_ns"] is not None, m


def check_all(mesh: Mesh, models: set[str], server: Optional[Server] = None) -> dict[str, dict]:
    server = server or mesh.llama
    sent = server.sent()
    assert models <= set(sent), sorted(models - set(sent))
    got = mesh.wait(models, to="scribe" if server is mesh.scribe else "llama")
    assert set(got) == models, f"not recorded: {sorted(models - set(got))}"
    for m in sorted(models):
        check(got[m], sent[m])
    return got


def test_openai_sdk_sync_async_streams_and_usage(mesh: Mesh) -> None:
    mesh.run("openai")
    names = {"oa-sync", "oa-sync-len", "oa-sync-s-usage", "oa-sync-s",
             "oa-async", "oa-async-s-usage", "oa-async-s-nousage"}
    got = check_all(mesh, names)
    assert got["oa-sync-len"]["finish_reasons"] == ["length"] and got["oa-sync-len"]["max_tokens"] == 3
    for m in ("oa-sync-s-usage", "oa-async-s-usage"):
        assert got[m]["include_usage"] is True and got[m]["output_tokens"] is not None
    assert got["oa-async-s-nousage"]["include_usage"] is False
    for m in ("oa-sync-s", "oa-async-s-nousage"):    # no usage asked for: none invented
        assert got[m]["input_tokens"] is None and got[m]["output_tokens"] is None
    assert all(r["protocol"] == "openai" and r["operation"] == "chat" for r in got.values())
    more = check_all(mesh, {"oa-emb", "oa-cmpl", "oa-resp", "oa-resp-s"})
    assert {m: r["operation"] for m, r in more.items()} == {
        "oa-emb": "embeddings", "oa-cmpl": "completion", "oa-resp": "responses", "oa-resp-s": "responses"}
    # one keep-alive connection, requests in order (openai-python may drop it after a stream: it closes the response
    # at [DONE], before the last chunk's terminator, so the next request may open another)
    keep = [got[m] for m in ("oa-sync", "oa-sync-len", "oa-sync-s-usage")]
    assert len({r["cookie"] for r in keep}) == 1 and [r["sequence"] for r in keep] == [0, 1, 2]


def test_anthropic_sdk_messages(mesh: Mesh) -> None:
    mesh.run("anthropic")
    got = check_all(mesh, {"an-sync", "an-sync-len", "an-sync-s", "an-async", "an-async-s"})
    assert all(r["protocol"] == "anthropic" and r["operation"] == "messages" for r in got.values())
    assert got["an-sync-len"]["finish_reasons"] == ["max_tokens"]
    assert got["an-sync"]["cached_tokens"] == 2


def test_ollama_httpx_requests_and_curl(mesh: Mesh) -> None:
    mesh.run("others")
    got = check_all(mesh, {"ol-chat-s", "ol-chat", "rq-chat", "rq-chat-s", "curl-chat", "curl-chat-s"})
    assert got["ol-chat-s"]["protocol"] == "ollama" and got["ol-chat-s"]["stream"] is True
    assert got["ol-chat"]["stream"] is False
    assert got["rq-chat"]["cookie"] == got["rq-chat-s"]["cookie"]     # requests.Session keeps the connection


def test_fifty_concurrent_streams_over_keep_alive(mesh: Mesh) -> None:
    seen = mesh.run("fifty")
    assert len(seen) == 50
    names = {f"c50-{i}" for i in range(50)}
    got = check_all(mesh, names)
    cookies: dict[int, int] = {}
    for r in got.values():
        cookies[r["cookie"]] = cookies.get(r["cookie"], 0) + 1
    assert len(cookies) <= 10 and max(cookies.values()) > 1, cookies    # connections were reused
    for s in seen:
        assert got[s["model"]]["output_tokens"] == s["chunks"], s       # what the client counted, too


def test_large_prompt_still_yields_the_model(mesh: Mesh) -> None:
    cut_before = mesh.metric("aimesh_capture_truncated_calls_total")
    mesh.run("big")
    sent = mesh.llama.sent()["big-prompt"]
    got = {c["response_model"]: c for c in mesh.calls()}.get("big-prompt-served")   # the request model may be lost
    assert got is not None, "a 200 KB prompt gave no record"
    assert got["status"] == 200 and got["input_tokens"] == sent["input_tokens"] and not got["incomplete"]
    if mesh.metric("aimesh_capture_truncated_calls_total") > cut_before:
        # the decoder reads through the hole (the record is there, marked truncated); the kernel is what cuts
        assert got["truncated"]
        pytest.xfail(f"the kernel copied {got['request_bytes']} of the request's bytes (at most "
                     "CAPTURE_CHUNKS_PER_CALL x capture_chunk per send); openai-python's model after a 200 KB messages "
                     f"array was {'still seen' if got['request_model'] else 'lost'} (per-request caps: kcap)")
    check(got, sent)
    assert got["request_bytes"] > 200_000


def test_errors_and_cut_streams(mesh: Mesh) -> None:
    seen = mesh.run("errors", mesh.scribe.url)
    assert {s["model"]: s.get("status") for s in seen if "status" in s} == {
        "error-400": 400, "error-404": 404, "error-500": 500, "anthropic error-500": 500}
    oa = check_all(mesh, {"error-400", "error-404", "error-500", "cut-stream"})
    an = check_all(mesh, {"error-500", "cut-stream"}, mesh.scribe)
    assert all(r["protocol"] == "openai" for r in oa.values()) and all(r["protocol"] == "anthropic"
                                                                        for r in an.values())
    assert oa["error-400"]["error_type"] == "invalid_request_error" and oa["error-404"]["status"] == 404
    assert an["error-500"]["error_type"] == "server_error"
    assert oa["cut-stream"]["input_tokens"] is None                # no usage was sent before the cut
    assert an["cut-stream"]["input_tokens"] is not None            # message_start said it before the cut


def test_ungoverned_process_is_not_captured(mesh: Mesh) -> None:
    chunks = mesh.metric("aimesh_capture_chunks_total")
    mesh.run("ungoverned", governed=False)
    assert "ungov" in mesh.llama.sent()
    assert mesh.metric("aimesh_capture_chunks_total") == chunks    # counted in the syscall itself: no waiting
    mesh.barrier("after-ungoverned")
    assert not [c for c in mesh.calls() if c["request_model"].startswith("ungov")]


def test_content_capture_on_and_off_with_redaction(mesh: Mesh) -> None:
    mesh.run("content", SECRET_PROMPT, f"{mesh.scribe.url}=text-on", f"{mesh.llama.url}=text-off")
    on = check_all(mesh, {"text-on", "text-on-s"}, mesh.scribe)
    off = check_all(mesh, {"text-off", "text-off-s"})
    for r in on.values():
        assert r["destination"]["name"] == "scribe"
        p = r["prompt_text"]
        assert p is not None and "please answer" in p and "[REDACTED]" in p, p
        assert KEY not in p and MAIL not in p and "abcdefghij" not in p, p
        assert r["completion_text"] == "Hello from the local test server.", r["completion_text"]
    for r in off.values():
        assert r["destination"]["name"] == "llama"
        assert r["prompt_text"] is None and r["completion_text"] is None
    for r in (*on.values(), *off.values()):    # the digest is kept either way
        assert len(r["request_digest"]) == 64 and int(r["request_digest"], 16) >= 0


RAW = r'''
import socket, sys
port = int(sys.argv[1])
H2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
cases = [
    [b"\x80\x01\x00\x00" + bytes(range(256)) * 4],                                           # binary
    [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)) * 4],              # a TLS hello, in the clear
    [b"GARBAGE \x00\xff not http\r\n\r\n" * 3],                                               # garbage
    [H2],                                                                                      # HTTP/2 preface
    [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"messages\": ["],  # cut body
    [b"POST /v1/chat/comp"],                                                                   # cut head
]
for payloads in cases:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for p in payloads:
            s.sendall(p)
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
print("[]")
'''


def test_garbage_binary_and_truncated_traffic_is_counted_not_decoded(mesh: Mesh) -> None:
    before = {r: mesh.metric("aimesh_capture_undecoded_connections_total", reason=r)
              for r in ("protocol_error", "http2", "truncated")}
    tls_before = mesh.metric("aimesh_capture_tls_sockets_total")
    p = subprocess.run([sys.executable, "-c", RAW, str(mesh.llama.port)], capture_output=True, text=True, timeout=60,
                       preexec_fn=_enter_cgroup(mesh.chat))
    assert p.returncode == 0, p.stderr
    mesh.barrier("after-garbage")
    assert mesh.agent.popen.poll() is None and mesh.agent.get("/healthz")[0] == 200
    after = {r: mesh.metric("aimesh_capture_undecoded_connections_total", reason=r) for r in before}
    assert after["protocol_error"] - before["protocol_error"] == 2, (before, after)    # binary, garbage
    assert after["http2"] - before["http2"] == 1, (before, after)
    assert after["truncated"] - before["truncated"] == 2, (before, after)              # cut body, cut head
    assert mesh.metric("aimesh_capture_tls_sockets_total") - tls_before == 1       # flagged in the kernel, not copied
    assert "decode error" not in mesh.agent.log().lower() and "Traceback" not in mesh.agent.log()
