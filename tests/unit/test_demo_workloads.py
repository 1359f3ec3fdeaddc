"""The demo workloads (servers and client on loopback, no root) and the runner's command lines."""
from __future__ import annotations

import argparse
import json
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from agent.demo import runner, workloads
from agent.demo.plan import DemoPlan


def test_chat_completion_is_a_valid_object_naming_model_and_version():
    model = workloads.ModelInfo("llama", "3.1-8b", 18001)
    resp = workloads.chat_completion(model, {"messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": "hello there"}]}, 7, 1700000000)
    assert resp["object"] == "chat.completion" and resp["model"] == "llama-3.1-8b" and resp["created"] == 1700000000
    assert resp["id"] == "chatcmpl-llama-3.1-8b-7"
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert "llama 3.1-8b" in choice["message"]["content"] and "hello there" in choice["message"]["content"]
    usage = resp["usage"]
    assert usage["prompt_tokens"] == 4 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert workloads.chat_completion(model, {"messages": [{"role": "user", "content": "hello there"}]}, 7, 1700000000)[
        "choices"] == resp["choices"]                       # deterministic


@pytest.mark.parametrize("request_body", [{}, {"messages": []}, {"messages": [{"role": "system", "content": "x"}]}])
def test_chat_completion_needs_a_user_message(request_body):
    with pytest.raises(ValueError, match="messages"):
        workloads.chat_completion(workloads.ModelInfo("m", "1", 1), request_body, 1, 0)


def test_model_routes():
    route = workloads.model_routes(workloads.ModelInfo("llama-next", "4.0", 18002))
    status, body = route("GET", "/v1/models", b"")
    assert status == 200 and body["data"][0]["id"] == "llama-next-4.0"
    status, body = route("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode())
    assert status == 200 and body["id"].endswith("-1")
    assert route("POST", "/v1/chat/completions", b"{not json")[0] == 400
    assert route("POST", "/v1/chat/completions", b"[1]")[0] == 400
    assert route("GET", "/v1/chat/completions", b"")[0] == 405
    status, body = route("GET", "/nope", b"")
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_dataset_routes():
    route = workloads.dataset_routes("eval-corpus", "2026-10")
    status, body = route("GET", "/v1/datasets/eval-corpus/rows?offset=4&limit=3", b"")
    assert status == 200 and [r["id"] for r in body["rows"]] == [4, 5, 6] and body["version"] == "2026-10"
    assert route("GET", "/v1/datasets/eval-corpus/rows?limit=0", b"")[0] == 400
    assert route("GET", "/v1/datasets/eval-corpus/rows?offset=x", b"")[0] == 400
    assert route("GET", "/v1/datasets", b"")[1]["data"][0]["id"] == "eval-corpus"
    assert route("POST", "/v1/datasets", b"")[0] == 405


def test_parse_target_is_loopback_http_only():
    assert workloads.parse_target("http://127.0.0.1:18001") == workloads.Target("127.0.0.1", 18001)
    assert workloads.parse_target("http://[::1]:18001") == workloads.Target("::1", 18001)
    for bad in ("http://10.0.0.1:80", "https://127.0.0.1:1", "http://localhost:80", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="--url"):
            workloads.parse_target(bad)


def test_describe_error_names_errno():
    assert workloads.describe_error(PermissionError(1, "Operation not permitted")) == "EPERM Operation not permitted"
    assert workloads.describe_error(ValueError("bad")) == "ValueError: bad"


@pytest.fixture
def server() -> Iterator[int]:
    route = workloads.model_routes(workloads.ModelInfo("llama", "3.1-8b", 0))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), workloads.make_handler(route, "llama@3.1-8b"))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_client_call_against_a_real_server(server, capsys):
    line = workloads.call_once(workloads.Target("127.0.0.1", server), "chat", "llama", "chat-frontend", 3, 2.0)
    assert line.startswith("#3 200 answered by llama-3.1-8b (")
    assert "200 POST /v1/chat/completions <- 127.0.0.1:" in capsys.readouterr().out   # the server's request line


def test_client_reports_connect_errors():
    with socket.socket() as s:              # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    line = workloads.call_once(workloads.Target("127.0.0.1", free), "chat", "llama", "x", 1, 1.0)
    assert line == f"#1 connect 127.0.0.1:{free} failed: ECONNREFUSED Connection refused"


def test_run_client_is_bounded(server, capsys):
    assert workloads.run_client(workloads.Target("127.0.0.1", server), "chat", "llama", "c", 0.2, 2) == 0
    out = capsys.readouterr().out
    assert "#1 200" in out and "#2 200" in out and "#3" not in out


def test_workloads_main_rejects_bad_input(capsys):
    assert workloads.main(["client", "--name", "c", "--url", "http://8.8.8.8:80"]) == 2
    assert workloads.main(["client", "--name", "c", "--url", "http://127.0.0.1:1", "--interval", "0.01"]) == 2


# ---- runner helpers --------------------------------------------------------------------------------------------

PLAN = DemoPlan.model_validate({
    "servers": [{"name": "llama", "kind": "model", "version": "3.1-8b", "port": 18001, "cgroup": "llama"},
                {"name": "eval-corpus", "kind": "dataset", "version": "2026-10", "port": 18004, "cgroup": "eval"}],
    "clients": [{"name": "chat-frontend", "target": "llama", "interval": 0.5, "cgroup": "chat"},
                {"name": "batch-eval", "target": "eval-corpus", "cgroup": "batch"}],
})


def test_command_lines():
    assert runner.server_argv("py", PLAN.servers[1]) == [
        "py", "-m", "agent.demo.workloads", "dataset-server", "--name", "eval-corpus", "--version", "2026-10",
        "--port", "18004"]
    assert runner.client_argv("py", PLAN.clients[0], PLAN) == [
        "py", "-m", "agent.demo.workloads", "client", "--name", "chat-frontend", "--url", "http://127.0.0.1:18001",
        "--interval", "0.5", "--api", "chat", "--model", "llama"]
    assert runner.client_argv("py", PLAN.clients[1], PLAN)[-4:] == ["--api", "dataset", "--model", "eval-corpus"]
    assert runner.agent_argv("py", "agent", Path("/c.yaml"), Path("/sys/fs/cgroup/aimesh-demo-1"), Path("/f.jsonl"),
                             "127.0.0.1:9464") == [
        "py", "-m", "agent", "agent", "--config", "/c.yaml", "--cgroup-root", "/sys/fs/cgroup/aimesh-demo-1",
        "--flow-log", "/f.jsonl", "--metrics-addr", "127.0.0.1:9464"]
    assert PLAN.cgroups() == ["llama", "eval", "chat", "batch"]


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
