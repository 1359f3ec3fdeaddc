"""Model-call spans into a real OTLP receiver: Arize Phoenix, started here on loopback, read back through its REST API.

Phoenix pins anthropic<2, which the project's dev tools need newer, so it lives in a venv of its own: the test runs
the `phoenix` command from $AIMESH_PHOENIX, else from PATH or beside this Python, else from <repo>/.venv-phoenix
(`python3 -m venv .venv-phoenix && .venv-phoenix/bin/pip install arize-phoenix`), and is skipped when none is found.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from agent.export.otlp import OtlpCallSink, OtlpConfig
from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol
from tests.unit.test_otlp import LLAMA, WEB, make_call

REPO = Path(__file__).resolve().parents[2]
READY_WAIT_S = 180     # a readiness wait, not an assertion: Phoenix migrates its database at start


def _phoenix() -> str | None:
    for cand in (os.environ.get("AIMESH_PHOENIX"), shutil.which("phoenix"), str(Path(sys.executable).parent / "phoenix"),
                 str(REPO / ".venv-phoenix" / "bin" / "phoenix")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def phoenix(tmp_path: Path):
    exe = _phoenix()
    if exe is None:
        pytest.skip("Arize Phoenix is not installed (set AIMESH_PHOENIX or pip install arize-phoenix into "
                    ".venv-phoenix)")
    port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(grpc_port),
           "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"), "PHOENIX_TELEMETRY_ENABLED": "false"}
    log = open(tmp_path / "phoenix.log", "wb")
    proc = subprocess.Popen([exe, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"phoenix exited with {proc.returncode}: {(tmp_path / 'phoenix.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"phoenix not ready on {base}: {(tmp_path / 'phoenix.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


def _spans(base: str, want: int) -> list[dict]:
    """The default project's spans, once `want` of them have been ingested (Phoenix inserts in the background)."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(f"{base}/v1/projects/default/spans", params={"limit": 100}, timeout=10)
        if r.status_code == 200:
            data = r.json()["data"]
            if len(data) >= want or time.monotonic() > deadline:
                return data
        elif time.monotonic() > deadline:
            r.raise_for_status()
        time.sleep(0.5)


def _unix_ns(iso: str) -> int:
    dt = datetime.fromisoformat(iso)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def test_spans_reach_phoenix_with_genai_attributes(phoenix: str) -> None:
    offset = time.time_ns() - 10_000_000_000    # the record's kernel time (5 s) lands 5 s ago
    sink = OtlpCallSink(OtlpConfig(endpoint=f"{phoenix}/v1/traces", schedule_delay_ms=100), offset)
    sink.emit_call(make_call(), WEB, LLAMA, 4242, "python3", server_address="127.0.0.1", server_port=8000)
    sink.emit_call(make_call(protocol=Protocol.ANTHROPIC, operation=Operation.MESSAGES, request_model="claude-haiku",
                             response_model="claude-haiku-20250101", finish_reasons=("end_turn",), stream=False),
                   IdentityData("batch-job", "workload", ""), IdentityData("anthropic", "external", ""), 77, "node")
    sink.emit_call(make_call(status=429, error_type="rate_limit_exceeded", input_tokens=None, output_tokens=None,
                             finish_reasons=()), WEB, LLAMA, 4242, "python3")
    sink.shutdown()
    assert (sink.stats().exported, sink.stats().failed, sink.stats().dropped_queue_full) == (3, 0, 0)

    got = _spans(phoenix, 3)
    assert sorted(s["name"] for s in got) == ["chat claude-haiku", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    spans = {s["name"]: s for s in got}
    ok = [s for s in got if s["name"] == "chat gpt-4o-mini" and s["status_code"] != "ERROR"][0]
    a = ok["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 300)
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"]) == (512, 0.2)
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", 8000)
    assert (a["aimesh.source.identity"], a["aimesh.destination.identity"], a["aimesh.source.pid"]) == \
        ("chat-frontend", "llama", 4242)
    assert ok["span_kind"] == "LLM"            # Phoenix recognised it as a model call from the gen_ai attributes
    start = offset + make_call().start_ns
    assert abs(_unix_ns(ok["start_time"]) - start) < 1000          # Phoenix keeps microseconds
    assert abs(_unix_ns(ok["end_time"]) - (start + make_call().duration_ns)) < 1000  # type: ignore[operator]
    claude = spans["chat claude-haiku"]["attributes"]
    assert claude["gen_ai.provider.name"] == "anthropic" and claude["aimesh.l7.api"] == "messages"
    assert claude["aimesh.source.identity"] == "batch-job" and claude["aimesh.destination.identity"] == "anthropic"
    failed = [s for s in got if s["status_code"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["attributes"]["error.type"] == "rate_limit_exceeded"
    assert "gen_ai.usage.input_tokens" not in failed[0]["attributes"]
