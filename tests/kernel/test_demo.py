"""Smoke test of `aimesh demo`: the shipped config, for a few seconds, shows all four verdicts and leaves nothing; the
closing MODEL CALLS table holds exactly the calls the collector stored (none until the agent exports model calls)."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.demo import view
from agent.demo.plan import split_config
from agent.demo.runner import tcp_accepts
from tests.kernel.harness import REPO, free_port

CONFIG = REPO / "deploy/examples/demo.yaml"
STORED = re.compile(r"^aimesh demo: (\d+) model calls in the collector; MODEL CALLS", re.M)


@dataclass(frozen=True)
class DemoRun:
    proc: subprocess.CompletedProcess[str]
    flow_log: Path


@dataclass(frozen=True)
class CallsRow:
    source: str
    requested: str
    served: str
    calls: int
    tokens_in: int
    tokens_out: int
    p50_latency: str
    p50_ttfc: str
    errors: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One run of the demo for every test of this file (it compiles and loads the BPF programs: seconds)."""
    plan = split_config(yaml.safe_load(CONFIG.read_text())).plan
    busy = [s.port for s in plan.servers if tcp_accepts("127.0.0.1", s.port)]
    if busy:
        pytest.skip(f"demo ports in use (a demo running?): {busy}")
    flow_log = tmp_path_factory.mktemp("demo") / "flows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--config", str(CONFIG), "--duration", "6", "--plain",
         "--metrics-addr", f"127.0.0.1:{free_port()}", "--collector-addr", f"127.0.0.1:{free_port()}",
         "--flow-log", str(flow_log)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    return DemoRun(proc, flow_log)


def closing_calls_table(stdout: str) -> tuple[int, list[CallsRow], list[str]]:
    """What the demo printed at the end: the collector's call count, the MODEL CALLS rows, and the table's lines."""
    m = STORED.search(stdout)
    assert m, stdout[-3000:]
    lines: list[str] = []
    for line in stdout[m.end():].splitlines()[1:]:
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    assert lines and lines[0].split()[:3] == ["SOURCE", "REQUESTED", "SERVED"], lines
    rows = []
    for line in lines[1:]:
        f = line.split()
        if len(f) >= 9 and f[1] == "->":
            tin, tout = f[5].split("/")
            rows.append(CallsRow(f[0], f[2], f[3], int(f[4]), int(tin), int(tout), f[6], f[7], int(f[8])))
    return int(m.group(1)), rows, lines


def test_demo_shows_all_four_verdicts_and_cleans_up(demo: DemoRun):
    proc = demo.proc
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    records = [view.parse_flow_line(x) for x in demo.flow_log.read_text().splitlines() if x.strip()]
    seen = {(r.source.name, r.destination.name, r.verdict) for r in records}
    assert ("chat-frontend", "llama", "redirected") in seen
    assert ("unmanaged", "llama", "denied") in seen
    assert ("batch-eval", "eval-corpus", "audit") in seen
    assert ("legacy-app", "llama-legacy", "allowed") in seen
    assert all(r.deprecated for r in records if r.destination.name == "llama-legacy")
    assert "EPERM Operation not permitted" in proc.stdout           # the rogue client saw the kernel's deny
    assert re.search(r"\[chat-frontend\] #\d+ 200 answered by llama", proc.stdout)

    m = re.search(r"removed (/\S+/aimesh-demo-\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert not Path(m.group(1)).exists()        # rmdir succeeded, so every process the demo put in it is gone


def test_demo_model_servers_speak_openai_through_the_sdk_plain_and_tls(demo: DemoRun):
    out = demo.proc.stdout
    assert re.search(r"\[chat-frontend\] #\d+ 200 answered by llama-3\.1-8b \(stream, \d+/\d+ tokens, first chunk", out)
    assert re.search(r"\[chat-frontend\] #\d+ 200 answered by llama-3\.1-8b \(\d+/\d+ tokens, confidence 0\.\d\d", out)
    assert re.search(r"\[support-bot\] #\d+ 200 answered by gpt-oss-20b", out)          # https, the demo CA
    assert re.search(r"\[gpt-oss\] gpt-oss@20b listening on https://127\.0\.0\.1:18005", out)
    legacy = [int(n) for n in re.findall(r"^\[legacy-app\] #(\d+) ", out, re.M)]
    assert legacy
    if max(legacy) >= 4:                                        # error_every: 4 in the demo config
        assert re.search(r"^\[legacy-app\] #4 HTTP 404 model error-404$", out, re.M)
    assert re.search(r"\[llama\] 200 /v1/chat/completions llama-3\.1-8b -> llama-3\.1-8b stream 7 tokens", out)


def test_demo_model_calls_table_holds_exactly_what_the_collector_stored(demo: DemoRun):
    """The table fills only from the collector: its calls add up to the collector's count, empty when that is 0."""
    stored, rows, lines = closing_calls_table(demo.proc.stdout)
    assert sum(r.calls for r in rows) == stored
    if stored == 0:
        assert lines[1:] == ["(none: no model call reached the collector)"]


def test_demo_model_calls_table_fills_from_the_collector(demo: DemoRun):
    """With the agent pushing model calls to the collector: the plaintext clients' calls are in the closing table,
    requested and served models, tokens, p50 latency and time to first chunk, and the error calls counted."""
    stored, rows, _ = closing_calls_table(demo.proc.stdout)
    assert stored > 0
    by = {(r.source, r.requested, r.served): r for r in rows}
    chat = by[("chat-frontend", "llama-3.1-8b", "llama-3.1-8b")]
    assert chat.calls > 0 and chat.tokens_in > 0 and chat.errors == 0
    assert 7 <= chat.tokens_out <= 7 * chat.calls             # 7 per answer; a call cut at the stop may have none
    assert chat.p50_latency != "-" and chat.p50_ttfc != "-"
    answered = len(re.findall(r"\[chat-frontend\] #\d+ 200 answered by", demo.proc.stdout))
    assert sum(r.calls for r in rows if r.source == "chat-frontend") <= answered
    legacy = by[("legacy-app", "llama-legacy-2.0", "llama-legacy-2.0")]
    assert legacy.calls > 0 and legacy.errors == 0
    if re.search(r"^\[legacy-app\] #4 HTTP 404", demo.proc.stdout, re.M):
        assert by[("legacy-app", "error-404", "-")].errors >= 1
    assert re.search(r"^model call chat-frontend -> llama@3\.1-8b", demo.proc.stdout, re.M)   # printed as read
