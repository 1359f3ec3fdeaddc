"""The demo workloads (servers and clients on loopback, no root: the openai SDK against the demo's model server, plain
and over TLS with the demo CA) and the runner's command lines."""
from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import stat
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import openai
import pytest
from pydantic import ValidationError

from agent.demo import runner, workloads
from agent.demo.llm_server import LLMServer, ModelPersona, SentCall
from agent.demo.plan import DemoPlan, ServerSpec
from agent.demo.tls import DemoTls, make_demo_tls
from agent.l7.http1 import Direction


PERSONA = ModelPersona("llama", "3.1-8b", 18001)


@pytest.fixture
def llama() -> Iterator[LLMServer]:
    """The demo's model server on an ephemeral port, keeping its bytes (record=True) so the wire can be checked."""
    with LLMServer(persona=PERSONA) as srv:
        yield srv


def sdk(url: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, **kw)   # type: ignore[arg-type]


def response_bytes(srv: LLMServer) -> bytes:
    return b"".join(b for log in srv.connections.values() for d, _, b in log if d is Direction.RESPONSE)


def test_model_server_answers_naming_model_and_version(llama):
    r = sdk(llama.url).chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "llama-3.1-8b" and r.object == "chat.completion"
    assert r.choices[0].message.content == "Hello from llama 3.1-8b on port 18001."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert sdk(llama.url).models.list().data[0].id == "llama-3.1-8b"


def test_model_server_serves_its_model_whatever_was_asked(llama):
    r = sdk(llama.url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "llama-3.1-8b"
    assert llama.wait_calls(1)[0] == SentCall(0, "/v1/chat/completions", "gpt-4o", "llama-3.1-8b", 200, False,
                                             llama.calls[0].input_tokens, 7, "stop", None, False)


def test_model_server_streams_sse_with_a_usage_chunk_and_done(llama):
    chunks = list(sdk(llama.url).chat.completions.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from llama 3.1-8b on port 18001."
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.model == "llama-3.1-8b" for c in chunks)
    wire = response_bytes(llama)
    assert b"text/event-stream" in wire and b"Transfer-Encoding: chunked" in wire and wire.count(b"data: [DONE]") == 1


def test_model_server_stream_without_include_usage_sends_none(llama):
    chunks = list(sdk(llama.url).chat.completions.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


def test_model_server_logprobs_when_asked_and_max_tokens(llama):
    r = sdk(llama.url).chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "x"}],
                                               logprobs=True, max_tokens=3)
    assert [t.token for t in r.choices[0].logprobs.content] == ["Hello", " from", " llama"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_model_server_error_model_is_an_openai_error(llama):
    with pytest.raises(openai.NotFoundError) as e:
        sdk(llama.url).chat.completions.create(model="error-404", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "not_found_error"


def test_call_lines_follow_the_cycle(llama):
    client = workloads.openai_client(workloads.parse_target(llama.url), None, 2.0)
    try:
        lines = [workloads.call_chat(client, "llama-3.1-8b", "chat-frontend", n, 4) for n in range(1, 5)]
    finally:
        client.close()
    assert lines[0].startswith("#1 200 answered by llama-3.1-8b (stream, ") and "first chunk" in lines[0]
    assert lines[1].startswith("#2 200 answered by llama-3.1-8b (") and "confidence 0.80" in lines[1]
    assert lines[2].startswith("#3 200 answered by llama-3.1-8b (") and "confidence" not in lines[2]
    assert lines[3] == "#4 HTTP 404 model error-404"
    calls = llama.wait_calls(4)
    assert [c.stream for c in calls] == [True, False, False, False]
    assert [c.request_model for c in calls] == ["llama-3.1-8b"] * 3 + ["error-404"]
    assert len(llama.connections) == 4          # a new connection per call: one connect decision each


def test_chat_style():
    assert [workloads.chat_style(n, 0) for n in range(1, 5)] == ["stream", "logprobs", "plain", "stream"]
    assert [workloads.chat_style(n, 2) for n in range(1, 5)] == ["stream", "error", "plain", "error"]


def test_server_line():
    call = SentCall(0, "/v1/chat/completions", "llama-3.1-8b", "llama-next-4.0", 200, True, 3, 7, "stop", None, False)
    assert workloads.call_line(call) == "200 /v1/chat/completions llama-3.1-8b -> llama-next-4.0 stream 7 tokens"


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


@pytest.fixture
def demo_tls(tmp_path) -> DemoTls:
    return make_demo_tls(tmp_path / "tls")


@needs_openssl
def test_demo_ca_files_are_private(demo_tls):
    d = demo_tls.ca_cert.parent
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert {f.name for f in d.iterdir()} >= {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in d.iterdir())


@needs_openssl
def test_tls_endpoint_with_the_demo_ca(demo_tls, monkeypatch):
    tls = workloads.server_tls(str(demo_tls.server_cert), str(demo_tls.server_key))
    with LLMServer(persona=ModelPersona("gpt-oss", "20b", 0), tls=tls) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        target = workloads.parse_target(srv.url)
        client = workloads.openai_client(target, str(demo_tls.ca_cert), 5.0)
        try:
            assert workloads.call_chat(client, "gpt-oss-20b", "c", 1, 0).startswith("#1 200 answered by gpt-oss-20b")
        finally:
            client.close()
        untrusting = workloads.openai_client(target, None, 5.0)      # the system CAs only
        try:
            line = workloads.call_chat(untrusting, "gpt-oss-20b", "c", 2, 0)
        finally:
            untrusting.close()
        assert line.startswith(f"#2 TLS with 127.0.0.1:{target.port} failed: CERTIFICATE_VERIFY_FAILED"), line
        monkeypatch.setenv("SSL_CERT_FILE", str(demo_tls.ca_cert))     # the SDK's other way to trust the CA
        r = sdk(srv.url).chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "x"}])
        assert r.model == "gpt-oss-20b"
        assert len(srv.wait_calls(2)) == 2


def test_server_tls_needs_both_files(tmp_path):
    assert workloads.server_tls(None, None) is None
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        workloads.server_tls("cert.pem", None)
    with pytest.raises(ValueError, match="--tls-cert"):
        workloads.server_tls(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))

def test_dataset_routes():
    route = workloads.dataset_routes("eval-corpus", "2026-10")
    status, body = route("GET", "/v1/datasets/eval-corpus/rows?offset=4&limit=3", b"")
    assert status == 200 and [r["id"] for r in body["rows"]] == [4, 5, 6] and body["version"] == "2026-10"
    assert route("GET", "/v1/datasets/eval-corpus/rows?limit=0", b"")[0] == 400
    assert route("GET", "/v1/datasets/eval-corpus/rows?offset=x", b"")[0] == 400
    assert route("GET", "/v1/datasets", b"")[1]["data"][0]["id"] == "eval-corpus"
    assert route("POST", "/v1/datasets", b"")[0] == 405


def test_parse_target_is_loopback_http_or_https_only():
    assert workloads.parse_target("http://127.0.0.1:18001") == workloads.Target("127.0.0.1", 18001)
    assert workloads.parse_target("http://[::1]:18001") == workloads.Target("::1", 18001)
    assert workloads.parse_target("https://127.0.0.1:18005") == workloads.Target("127.0.0.1", 18005, "https")
    assert workloads.Target("::1", 1, "https").url == "https://[::1]:1"
    for bad in ("http://10.0.0.1:80", "ftp://127.0.0.1:1", "http://localhost:80", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="--url"):
            workloads.parse_target(bad)


def test_describe_error_names_errno():
    assert workloads.describe_error(PermissionError(1, "Operation not permitted")) == "EPERM Operation not permitted"
    assert workloads.describe_error(ValueError("bad")) == "ValueError: bad"


def test_the_os_error_under_an_sdk_error_but_never_a_tls_one():
    try:
        try:
            raise PermissionError(1, "Operation not permitted")
        except OSError as inner:
            raise RuntimeError("connect failed") from inner
    except RuntimeError as outer:
        assert workloads.describe_error(workloads.os_error_in(outer)) == "EPERM Operation not permitted"
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")     # errno 1, not EPERM
    wrapped = RuntimeError("x")
    wrapped.__cause__ = verify
    assert workloads.os_error_in(wrapped) is None and workloads.tls_error_in(wrapped) is verify


def free_port() -> int:
    with socket.socket() as s:              # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_reports_connect_errors():
    port = free_port()
    client = workloads.openai_client(workloads.Target("127.0.0.1", port), None, 1.0)
    try:
        line = workloads.call_chat(client, "llama-3.1-8b", "x", 1, 0)
    finally:
        client.close()
    assert line == f"#1 connect 127.0.0.1:{port} failed: ECONNREFUSED Connection refused"
    assert workloads.call_dataset(workloads.Target("127.0.0.1", port), "d", 1, 1.0) == \
        f"#1 connect 127.0.0.1:{port} failed: ECONNREFUSED Connection refused"


def test_run_client_is_bounded(llama, capsys):
    assert workloads.run_client(workloads.parse_target(llama.url), "chat", "llama-3.1-8b", "c", 0.2, 2) == 0
    out = capsys.readouterr().out
    assert "#1 200 answered by llama-3.1-8b" in out and "#2 200" in out and "#3" not in out


@pytest.fixture
def corpus() -> Iterator[int]:
    route = workloads.dataset_routes("eval-corpus", "2026-10")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), workloads.make_handler(route, "eval-corpus@2026-10"))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_dataset_client_against_a_real_server(corpus, capsys):
    line = workloads.call_dataset(workloads.Target("127.0.0.1", corpus), "eval-corpus", 3, 2.0)
    assert line.startswith("#3 200 rows 4-5 from eval-corpus@2026-10 (")
    assert "200 GET /v1/datasets/eval-corpus/rows <- 127.0.0.1:" in capsys.readouterr().out   # the server's line


def test_workloads_main_rejects_bad_input(capsys):
    assert workloads.main(["client", "--name", "c", "--url", "http://8.8.8.8:80"]) == 2
    assert workloads.main(["client", "--name", "c", "--url", "http://127.0.0.1:1", "--interval", "0.01"]) == 2
    assert workloads.main(["client", "--name", "c", "--url", "http://127.0.0.1:1", "--error-every", "-1"]) == 2
    assert workloads.main(["model-server", "--name", "m", "--version", "1", "--port", "1", "--tls-cert", "x"]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and "--interval" in err and "--error-every" in err and "--tls-key" in err

# ---- runner helpers --------------------------------------------------------------------------------------------

PLAN = DemoPlan.model_validate({
    "servers": [{"name": "llama", "kind": "model", "version": "3.1-8b", "port": 18001, "cgroup": "llama"},
                {"name": "eval-corpus", "kind": "dataset", "version": "2026-10", "port": 18004, "cgroup": "eval"}],
    "clients": [{"name": "chat-frontend", "target": "llama", "interval": 0.5, "cgroup": "chat"},
                {"name": "batch-eval", "target": "eval-corpus", "cgroup": "batch"}],
})


PLAN = DemoPlan.model_validate({
    "servers": [{"name": "llama", "kind": "model", "version": "3.1-8b", "port": 18001, "cgroup": "llama"},
                {"name": "eval-corpus", "kind": "dataset", "version": "2026-10", "port": 18004, "cgroup": "eval"},
                {"name": "gpt-oss", "kind": "model", "version": "20b", "port": 18005, "cgroup": "gpt", "tls": True}],
    "clients": [{"name": "chat-frontend", "target": "llama", "interval": 0.5, "cgroup": "chat"},
                {"name": "batch-eval", "target": "eval-corpus", "cgroup": "batch"},
                {"name": "support-bot", "target": "gpt-oss", "cgroup": "support", "error_every": 5}],
})
TLS = DemoTls(Path("/w/tls/ca.pem"), Path("/w/tls/server.pem"), Path("/w/tls/server.key"))


def test_command_lines():
    assert runner.server_argv("py", PLAN.servers[1]) == [
        "py", "-m", "agent.demo.workloads", "dataset-server", "--name", "eval-corpus", "--version", "2026-10",
        "--port", "18004"]
    assert runner.server_argv("py", PLAN.servers[2], TLS)[-4:] == [
        "--tls-cert", "/w/tls/server.pem", "--tls-key", "/w/tls/server.key"]
    with pytest.raises(ValueError, match="gpt-oss"):
        runner.server_argv("py", PLAN.servers[2])
    assert runner.client_argv("py", PLAN.clients[0], PLAN) == [
        "py", "-m", "agent.demo.workloads", "client", "--name", "chat-frontend", "--url", "http://127.0.0.1:18001",
        "--interval", "0.5", "--api", "chat", "--model", "llama-3.1-8b"]
    assert runner.client_argv("py", PLAN.clients[1], PLAN)[-4:] == ["--api", "dataset", "--model", "eval-corpus"]
    tls_client = runner.client_argv("py", PLAN.clients[2], PLAN, TLS)
    assert tls_client[tls_client.index("--url") + 1] == "https://127.0.0.1:18005"
    assert tls_client[-4:] == ["--ca-file", "/w/tls/ca.pem", "--error-every", "5"]
    assert runner.agent_argv("py", "agent", Path("/c.yaml"), Path("/sys/fs/cgroup/aimesh-demo-1"), Path("/f.jsonl"),
                             "127.0.0.1:9464") == [
        "py", "-m", "agent", "agent", "--config", "/c.yaml", "--cgroup-root", "/sys/fs/cgroup/aimesh-demo-1",
        "--flow-log", "/f.jsonl", "--metrics-addr", "127.0.0.1:9464"]
    assert runner.calls_argv("py", "127.0.0.1:4790", Path("/w/t"), follow=True, limit=5) == [
        "py", "-m", "agent", "calls", "--collector", "127.0.0.1:4790", "--token-file", "/w/t", "-o", "json",
        "--limit", "5", "--follow"]
    assert "--follow" not in runner.calls_argv("py", "127.0.0.1:4790", Path("/w/t"), follow=False)
    assert PLAN.cgroups() == ["llama", "eval", "gpt", "chat", "batch", "support"] and PLAN.uses_tls


def test_calls_argv_is_a_valid_calls_command():
    from agent.cli import build_parser

    args = build_parser().parse_args(runner.calls_argv("py", "127.0.0.1:4790", Path("/w/t"), follow=True)[3:])
    assert args.follow and args.output == "json" and args.limit == runner.CALLS_BACKLOG


def test_only_model_servers_serve_tls():
    with pytest.raises(ValidationError, match="only model servers"):
        ServerSpec(name="d", kind="dataset", version="1", port=18004, cgroup="d", tls=True)

def test_parse_hostport():
    assert runner.parse_hostport("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert runner.parse_hostport("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:0", "host:x", ":80"):
        with pytest.raises(ValueError, match="--metrics-addr"):
            runner.parse_hostport(bad)


def test_arguments_and_bad_input_exit_codes(tmp_path, capsys):
    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    args = p.parse_args(["--config", str(tmp_path / "missing.yaml"), "--duration", "5"])
    assert (args.duration, args.metrics_addr) == (5.0, "127.0.0.1:9464")
    assert runner.run(args) == 2                     # unreadable config: nothing made, nothing started
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: enforce\n")
    assert runner.run(p.parse_args(["--config", str(bad)])) == 2
    agent_bad = tmp_path / "agent-bad.yaml"
    agent_bad.write_text("mode: sometimes\ndemo: {servers: [{name: a, version: '1', port: 18001, cgroup: a}]}\n")
    assert runner.run(p.parse_args(["--config", str(agent_bad)])) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "demo: missing" in err and "mode" in err
