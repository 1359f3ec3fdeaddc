"""Agent + collector + real workloads: flows reach the collector with the right identities, bytes and verdicts;
`aimesh flows` prints them; a collector killed during a steady stream and restarted loses and duplicates nothing."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.harness import REPO, _enter_cgroup, free_port, run_client
from tests.kernel.test_enforce import base_config

FLOWLOAD = Path(__file__).resolve().parent / "flowload.py"


class Collector:
    def __init__(self, tmp: Path, port: int) -> None:
        self.port, self.db, self.log = port, tmp / "flows.db", tmp / "collector.log"
        self.token_file = tmp / "collector.token"     # created by the collector (0600), read by the agent and flows
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "collector", "--listen", f"127.0.0.1:{self.port}",
                                      "--db", str(self.db), "--token-file", str(self.token_file)],
                                     cwd=REPO, stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = flows_cli(self.port, "--limit", "1", "-o", "json", token_file=self.token_file)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"collector did not come up:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self) -> list:
        """Every stored FlowRecord, decoded (read-only access to the collector's SQLite file)."""
        from agent._gen.aimesh.v1 import flow_pb2
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return [flow_pb2.FlowRecord.FromString(b) for (b,) in con.execute("SELECT record FROM flows")]
        finally:
            con.close()


def flows_cli(port: int, *args: str, token_file: Path | None) -> subprocess.CompletedProcess:
    auth = ["--token-file", str(token_file)] if token_file else []
    return subprocess.run([sys.executable, "-m", "agent", "flows", "--collector", f"127.0.0.1:{port}", *auth, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture
def collector(tmp_path):
    c = Collector(tmp_path, free_port())
    c.start()
    yield c
    c.stop()


def _agent_config(cgroups, port, tmp_path, collector):
    return base_config(cgroups, port, collector={"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.2,
                                                 "batch_size": 50, "token_file": str(collector.token_file)},
                       telemetry={"interim_interval": 0, "udp_window": 1})


def _send(cg, port, nbytes):
    p = subprocess.run([sys.executable, str(FLOWLOAD), "send", "--port", str(port), "--bytes", str(nbytes)],
                       capture_output=True, text=True, timeout=60, preexec_fn=_enter_cgroup(cg))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _json_flows(collector, *args):
    r = flows_cli(collector.port, "-o", "json", *args, token_file=collector.token_file)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def test_flows_reach_the_collector(cgroups, agents, collector, tmp_path):
    port = free_port()
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    agents(_agent_config(cgroups, port, tmp_path, collector),
           ["--collector", f"127.0.0.1:{collector.port}", "--agent-id", "node-a"])
    srv = subprocess.Popen([sys.executable, str(FLOWLOAD), "serve", "--port", str(port), "--reply", "4096",
                            "--connections", "3"], stdout=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(llama))
    assert srv.stdout.readline()
    assert run_client(rogue, port)["errors"] == {"EPERM": 1}   # while llama holds the port (it exits after 3)
    for n in (1000, 20000, 300000):
        assert _send(chat, port, n)["received"] == 4096
    srv.wait(30)

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        recs = _json_flows(collector, "--to", "llama", "--limit", "100")
        if len(recs) >= 7:
            break
        time.sleep(0.3)
    conns = [r for r in recs if r.get("kind") == "connection" and not r.get("interim")]
    denied = [r for r in recs if r.get("verdict") == "denied"]
    assert len(conns) == 6, recs          # 3 connections x 2 sides
    assert {(r["source"]["name"], r["destination"]["name"], r["destination"]["version"]) for r in conns} == \
        {("chat", "llama", "3.1-8b")}
    client_side = sorted(int(r.get("bytesSent", r.get("bytes_sent", 0))) for r in conns
                         if r.get("hook") == "connect")
    assert client_side == [1000, 20000, 300000]
    assert all(r.get("agentId", r.get("agent_id")) == "node-a" for r in recs)
    assert len(denied) == 1 and denied[0]["source"]["name"] == "unmanaged"

    only_denied = _json_flows(collector, "--verdict", "denied", "--limit", "100")
    assert [r["source"]["name"] for r in only_denied] == ["unmanaged"]
    table = flows_cli(collector.port, "--from", "chat", "--limit", "10", token_file=collector.token_file)
    assert table.returncode == 0 and "chat" in table.stdout and "llama" in table.stdout, table.stdout + table.stderr
    anonymous = flows_cli(collector.port, "--limit", "1", token_file=None)    # authentication is on by default
    assert anonymous.returncode == 1 and "missing bearer token" in anonymous.stderr, anonymous.stderr
    assert collector.token_file.stat().st_mode & 0o777 == 0o600


def test_collector_restart_loses_nothing(cgroups, agents, collector, tmp_path):
    port = free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    agent = agents(_agent_config(cgroups, port, tmp_path, collector), ["--collector", f"127.0.0.1:{collector.port}"])
    n = 120
    srv = subprocess.Popen([sys.executable, str(FLOWLOAD), "serve", "--port", str(port), "--reply", "10",
                            "--connections", str(n)], stdout=subprocess.PIPE, text=True,
                           preexec_fn=_enter_cgroup(llama))
    assert srv.stdout.readline()
    # a steady stream of connections, one every ~25 ms, from a loop in the chat cgroup
    loop = subprocess.Popen([sys.executable, "-c", f"""
import socket, time
for i in range({n}):
    s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
    s.sendall(b"x" * 100); s.shutdown(socket.SHUT_WR)
    while s.recv(65536): pass
    s.close(); time.sleep(0.025)
"""], preexec_fn=_enter_cgroup(chat))
    time.sleep(1.0)
    collector.kill()                 # mid-stream
    time.sleep(2.5)
    collector.start()                # same database
    assert loop.wait(60) == 0
    srv.wait(30)
    expected = 2 * n                 # one record per connection side
    deadline = time.monotonic() + 30
    got = 0
    mine = []
    while time.monotonic() < deadline:
        mine = [r for r in collector.records() if r.destination_port == port and not r.interim]
        if len(mine) >= expected:
            break
        time.sleep(0.3)
    assert len(mine) == expected, f"{len(mine)} records for {expected} connection sides\n{agent.log()[-3000:]}"
    assert len({(r.cookie, r.hook) for r in mine}) == expected, "a record was stored twice"
    _, metrics = agent.get("/metrics")
    assert 'aimesh_export_records_total{outcome="dropped_spool_full"} 0.0' in metrics
