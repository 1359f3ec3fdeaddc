"""Real clients through the fast path (issue 23): requests (keep-alive and a connection per call), httpx and the openai
SDK, N calls each, from a governed client (chat) to a governed server (llama) on this node, with the fast path on,
off and without an agent. Every call must be answered right in every mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import CgroupTree, _enter_cgroup, free_port, metric_value, start_agent
from tests.kernel.test_enforce import base_config

WORKLOAD = Path(__file__).resolve().parent / "fastpath_clients.py"
MODES = ("fastpath", "normal", "no_agent")
CALLS = 500        # per client per mode: 4 clients x 3 modes x 500 = 6,000 calls


def _run_mode(tree: CgroupTree, tmp: Path, mode: str) -> dict:
    port = free_port()
    agent = None
    if mode != "no_agent":
        tmp.mkdir(parents=True, exist_ok=True)
        agent = start_agent(tmp, tree.root, base_config(tree, port, fast_path=mode == "fastpath"))
    srv = subprocess.Popen([sys.executable, str(WORKLOAD), "server", str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(tree.child("llama")))
    try:
        assert json.loads(srv.stdout.readline()) == {"ready": True}
        cli = subprocess.run([sys.executable, str(WORKLOAD), "client", str(port), str(CALLS)], capture_output=True,
                             text=True, timeout=240, preexec_fn=_enter_cgroup(tree.child("chat")))
        assert cli.returncode == 0, cli.stderr
        out = json.loads(cli.stdout.splitlines()[-1])
        if agent is not None:
            out["_fastpath_messages"] = metric_value(agent.get("/metrics")[1], "aimesh_fastpath_messages_total")
        return out
    finally:
        srv.kill()
        srv.wait()
        if agent is not None:
            agent.stop()


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = {}
    for m in MODES:     # a tree per mode: a stopped agent leaves its programs on its tree (fail closed)
        tree = CgroupTree()
        try:
            out[m] = _run_mode(tree, tmp_path_factory.mktemp(m), m)
        finally:
            tree.cleanup()
    return out


def test_the_fast_path_carried_the_calls(seen):
    assert seen["fastpath"]["_fastpath_messages"] >= 2 * 4 * CALLS     # a request and an answer per call, at least
    assert seen["normal"]["_fastpath_messages"] == 0


@pytest.mark.parametrize("client", ["requests_session", "requests_new_connection", "httpx", "openai"])
@pytest.mark.parametrize("mode", MODES)
def test_every_call_answered(seen, mode, client):
    assert seen[mode][client] == {"ok": CALLS, "errors": {}}, seen[mode][client]
