"""Least exposure, checked as an unprivileged user against a real agent and a real collector: the flow log, the
records log, the spool, the collector's database and its token are unreadable to others; `aimesh flows` without
the token is refused; the agent's metrics answer on loopback only unless an address is given."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.kernel.harness import REPO, AgentProc, free_port, run_client, start_server
from tests.kernel.test_collector_e2e import Collector
from tests.kernel.test_enforce import base_config

NOBODY = 65534
DEFAULT_METRICS_PORT = 9464   # the CLI's default --metrics-addr is 127.0.0.1:9464


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot run commands as an unprivileged user")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"})


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory others may traverse (0711) but not list: what keeps them out is then each file's own mode.
    Not under pytest's basetemp, which is 0700 (that alone would make every check below pass)."""
    d = Path(tempfile.mkdtemp(prefix="aimesh-security-"))
    try:
        d.chmod(0o711)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def listener_pids(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.fixture
def default_agent(cgroups, workdir):
    """start(cfg, extra) -> AgentProc: an agent started WITHOUT --metrics-addr (the harness always gives one),
    stopped at teardown; the cgroups fixture then uninstalls its datapath."""
    started: list[AgentProc] = []

    def start(cfg: dict, extra: list[str]) -> AgentProc:
        busy = listener_pids(DEFAULT_METRICS_PORT)
        assert not busy, f"port {DEFAULT_METRICS_PORT} is already taken by pid {busy}: cannot test the default"
        ap = AgentProc(workdir / "aimesh.yaml", workdir / "flows.jsonl", DEFAULT_METRICS_PORT, None,  # type: ignore
                       workdir / "agent.log")
        ap.write_config(cfg)
        with open(ap.log_path, "w") as logf:
            ap.popen = subprocess.Popen(
                [sys.executable, "-m", "agent", "agent", "--config", str(ap.config_path), "--cgroup-root",
                 str(cgroups.root), "--flow-log", str(ap.flow_log), *extra],
                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        started.append(ap)
        deadline = time.monotonic() + 90
        while True:
            if ap.popen.poll() is not None:
                raise AssertionError(f"agent exited with {ap.popen.returncode}:\n{ap.log()}")
            try:
                if ap.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not healthy after 90 s:\n{ap.log()}")
            time.sleep(0.1)
        assert listener_pids(DEFAULT_METRICS_PORT) == {ap.popen.pid}, "someone else answers on the default port"
        return ap

    yield start
    for ap in started:
        ap.stop()


@pytest.fixture
def collector(workdir) -> Iterator[Collector]:
    c = Collector(workdir, free_port())
    c.start()
    yield c
    c.stop()


def non_loopback_address() -> tuple[int, str]:
    """(family, address) of one of this host's addresses that is not loopback (IPv4 first, then global IPv6)."""
    v4, v6 = [], []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                v4.append(a.address)
            elif a.family == socket.AF_INET6 and a.address != "::1" and not a.address.lower().startswith("fe80"):
                v6.append(a.address.split("%")[0])
    if v4:
        return socket.AF_INET, v4[0]
    assert v6, "this host has no non-loopback address to check the metrics listener against"
    return socket.AF_INET6, v6[0]


def assert_unreadable(path: Path, expect_mode: int) -> None:
    assert path.exists(), path
    assert mode(path) == expect_mode, f"{path} has mode {mode(path):04o}, want {expect_mode:04o}"
    r = as_nobody("cat", str(path))
    assert r.returncode != 0 and "Permission denied" in r.stderr and not r.stdout, (path, r.stdout[:200], r.stderr)


def test_nothing_aimesh_writes_is_readable_by_others(cgroups, default_agent, collector, workdir):
    sentinel = workdir / "sentinel"
    sentinel.write_text("readable\n")
    sentinel.chmod(0o644)
    r = as_nobody("cat", str(sentinel))
    assert r.returncode == 0 and r.stdout == "readable\n", f"the unprivileged user cannot reach {workdir}: {r.stderr}"

    port = free_port()
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    spool = workdir / "spool"
    records_log = workdir / "records.jsonl"
    cfg = base_config(cgroups, port, collector={"spool_dir": str(spool), "flush_interval": 0.2, "batch_size": 50,
                                                "token_file": str(collector.token_file)},
                      telemetry={"interim_interval": 0, "udp_window": 1})
    agent = default_agent(cfg, ["--collector", f"127.0.0.1:{collector.port}", "--records-log", str(records_log)])

    collector.stop()   # what the agent exports now stays in its spool
    srv = start_server(llama, port, name="llama", count=3)
    assert run_client(rogue, port)["errors"] == {"EPERM": 1}   # while llama holds the port (it exits after 3)
    for _ in range(3):
        assert run_client(chat, port)["ok"] == 1
    srv.result()
    assert agent.records_where(lambda r: r.get("verdict") == "denied"), agent.log()[-2000:]
    deadline = time.monotonic() + 15
    while not (list(spool.glob("*.batch")) and records_log.exists() and records_log.stat().st_size):
        assert time.monotonic() < deadline, f"no spooled batch or flow record:\n{agent.log()[-2000:]}"
        time.sleep(0.1)

    assert_unreadable(agent.flow_log, 0o600)
    assert_unreadable(records_log, 0o600)
    assert mode(spool) == 0o700
    batches = sorted(spool.glob("*.batch"))
    for b in batches:
        assert_unreadable(b, 0o600)
    ls = as_nobody("ls", str(spool))
    assert ls.returncode != 0 and "Permission denied" in ls.stderr
    assert_unreadable(collector.db, 0o600)
    for side in (Path(f"{collector.db}-wal"), Path(f"{collector.db}-shm")):
        if side.exists():
            assert_unreadable(side, 0o600)
    assert_unreadable(collector.token_file, 0o600)

    collector.start()   # same database and token
    flows = [sys.executable, "-m", "agent", "flows", "--collector", f"127.0.0.1:{collector.port}", "--limit", "1"]
    anonymous = as_nobody(*flows)
    assert anonymous.returncode == 1 and "missing bearer token" in anonymous.stderr, anonymous.stderr
    assert "Traceback" not in anonymous.stderr
    guessed = as_nobody(*flows, "--token", "not-the-token")
    assert guessed.returncode == 1 and "invalid bearer token" in guessed.stderr, guessed.stderr
    stolen = as_nobody(*flows, "--token-file", str(collector.token_file))
    assert stolen.returncode != 0 and "Permission denied" in stolen.stderr, stolen.stderr


def test_metrics_listen_on_loopback_only_by_default(default_agent, cgroups):
    agent = default_agent(base_config(cgroups, free_port()), [])
    assert agent.get("/readyz")[0] == 200
    code, body = agent.get("/metrics")
    assert code == 200 and "aimesh_" in body
    family, addr = non_loopback_address()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            s.connect((addr, DEFAULT_METRICS_PORT))
    assert agent.popen.poll() is None
    agent.popen.send_signal(signal.SIGTERM)
    assert agent.popen.wait(15) == 0
