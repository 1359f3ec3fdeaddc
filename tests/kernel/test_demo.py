"""Smoke test of `aimesh demo`: the shipped config, for a few seconds, shows all four verdicts and leaves nothing."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.demo import view
from agent.demo.plan import split_config
from agent.demo.runner import tcp_accepts
from tests.kernel.harness import REPO, free_port

CONFIG = REPO / "deploy/examples/demo.yaml"


def test_demo_shows_all_four_verdicts_and_cleans_up(tmp_path):
    plan = split_config(yaml.safe_load(CONFIG.read_text())).plan
    busy = [s.port for s in plan.servers if tcp_accepts("127.0.0.1", s.port)]
    if busy:
        pytest.skip(f"demo ports in use (a demo running?): {busy}")
    flow_log = tmp_path / "flows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--config", str(CONFIG), "--duration", "6", "--plain",
         "--metrics-addr", f"127.0.0.1:{free_port()}", "--flow-log", str(flow_log)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    records = [view.parse_flow_line(x) for x in flow_log.read_text().splitlines() if x.strip()]
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
