"""Test harness for the kernel tests: real cgroups, a real agent process, real workloads. Everything made is
removed by path or pid at teardown."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from agent.identity.cgroups import cgroup2_mount

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = Path(__file__).resolve().parent / "workloads.py"


def free_port(kind=socket.SOCK_STREAM, family=socket.AF_INET) -> int:
    with socket.socket(family, kind) as s:
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return s.getsockname()[1]


class CgroupTree:
    """A private cgroup subtree: <mount>/aimesh-test-<id>/..."""

    def __init__(self) -> None:
        self.mount = cgroup2_mount()
        self.name = f"aimesh-test-{uuid.uuid4().hex[:8]}"
        self.root = self.mount / self.name
        self.root.mkdir()
        self.children: list[Path] = []

    def child(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        self.children.append(p)
        return p

    def rel(self, p: Path) -> str:
        return "/" + str(p.relative_to(self.mount))

    def cleanup(self) -> None:
        from agent.identity.cgroups import uninstall_datapath
        uninstall_datapath(self.root)   # the agents left their datapath in force: remove it by the root's id
        for d in sorted(self.root.rglob("*"), key=lambda p: -len(p.parts)) + [self.root]:
            if not d.is_dir():
                continue
            kill = d / "cgroup.kill"
            if kill.exists():
                try:
                    kill.write_text("1")
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for d in sorted([p for p in self.root.rglob("*") if p.is_dir()], key=lambda p: -len(p.parts)) + [self.root]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include all of `labels` (Prometheus text, any label order)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line.split("}")[0] for w in want):
                total += float(line.split()[-1])
    return total


def _enter_cgroup(cgroup: Optional[Path]):
    def fn():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    return fn


@dataclass
class Proc:
    popen: subprocess.Popen
    first: Optional[dict] = None

    def result(self, timeout: float = 30) -> dict:
        out, err = self.popen.communicate(timeout=timeout)
        lines = [json.loads(x) for x in out.splitlines() if x.strip().startswith("{")]
        if not lines:
            raise AssertionError(f"workload printed nothing; stderr: {err}")
        return lines[-1]


def start_server(cgroup: Optional[Path], port: int, name: str = "server", host: str = "127.0.0.1",
                 udp: bool = False, count: int = 0, timeout: float = 20, netns: Optional[str] = None,
                 reuseport: bool = False) -> Proc:
    cmd = [sys.executable, str(WORKLOADS), "server", "--host", host, "--port", str(port), "--name", name,
           "--count", str(count), "--timeout", str(timeout)] + (["--udp"] if udp else []) + \
        (["--reuseport"] if reuseport else [])
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_enter_cgroup(cgroup))
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"server did not start: {p.stderr.read()}")
    return Proc(p, json.loads(line))


def run_client(cgroup: Optional[Path], port: int, host: str = "127.0.0.1", udp: bool = False, count: int = 1,
               timeout: float = 3.0, bind: Optional[str] = None, netns: Optional[str] = None) -> dict:
    cmd = [sys.executable, str(WORKLOADS), "client", "--host", host, "--port", str(port), "--count", str(count),
           "--timeout", str(timeout)] + (["--udp"] if udp else []) + (["--bind", bind] if bind else [])
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_enter_cgroup(cgroup))
    return Proc(p).result(timeout=timeout * count + 30)


@dataclass
class AgentProc:
    config_path: Path
    flow_log: Path
    metrics_port: int
    popen: subprocess.Popen
    log_path: Path
    _read: int = field(default=0)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def flows(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict]:
        """All flow-log records so far; waits until at least wait_for exist."""
        deadline = time.monotonic() + timeout
        while True:
            recs = [json.loads(x) for x in self.flow_log.read_text().splitlines() if x.strip()] \
                if self.flow_log.exists() else []
            if len(recs) >= wait_for or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def records_where(self, pred, timeout: float = 5.0) -> list[dict]:
        """Flow-log records matching pred; waits until there is at least one (the agent drains every 25 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = [r for r in self.flows() if pred(r)]
            if recs or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def write_config(self, cfg: dict | str) -> None:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def reload(self, cfg: dict | str, expect: str = "config reloaded", timeout: float = 10) -> None:
        before = self.log().count(expect)
        self.write_config(cfg)
        self.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log().count(expect) <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not log {expect!r} after SIGHUP:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start_agent(tmp: Path, cgroup_root: Path, cfg: dict | str, extra: list[str] = (),
                timeout: float = 90, degraded_ok: bool = False, flow_log: bool = True,
                env: Optional[dict] = None) -> AgentProc:
    """Start an agent and wait until it is ready (/healthz 200), or, with degraded_ok, until it is running (a
    degraded agent answers /healthz 503 by design). free_port() can race another process (a parallel test worker)
    for the metrics port: an agent that could not listen on it is started again on another one."""
    for _ in range(2):
        try:
            return _start_agent(tmp, cgroup_root, cfg, extra, timeout, degraded_ok, flow_log, env)
        except _PortTaken:
            continue
    return _start_agent(tmp, cgroup_root, cfg, extra, timeout, degraded_ok, flow_log, env)


class _PortTaken(AssertionError):
    pass


def _start_agent(tmp: Path, cgroup_root: Path, cfg: dict | str, extra: list[str], timeout: float, degraded_ok: bool,
                 flow_log: bool, env: Optional[dict]) -> AgentProc:
    port = free_port()
    ap = AgentProc(tmp / "aimesh.yaml", tmp / "flows.jsonl", port, None, tmp / "agent.log")  # type: ignore[arg-type]
    ap.write_config(cfg)
    logf = open(ap.log_path, "w")
    ap.popen = subprocess.Popen(
        [sys.executable, "-m", "agent", "agent", "--config", str(ap.config_path), "--cgroup-root", str(cgroup_root),
         "--metrics-addr", f"127.0.0.1:{port}", *(["--flow-log", str(ap.flow_log)] if flow_log else []), *extra],
        stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while True:
        if ap.popen.poll() is not None:
            err = _PortTaken if f"cannot listen on 127.0.0.1:{port}" in ap.log() else AssertionError
            raise err(f"agent exited with {ap.popen.returncode}:\n{ap.log()}")
        try:
            if ap.get("/healthz")[0] == 200 or (degraded_ok and "agent ready" in ap.log()):
                return ap
        except (OSError, http.client.HTTPException):   # not listening yet, or another process's port
            pass
        if time.monotonic() > deadline:
            ap.stop()
            raise AssertionError(f"agent not healthy after {timeout}s:\n{ap.log()}")
        time.sleep(0.1)


def attached_programs(cgroup: Path) -> list[str]:
    """Names of programs attached directly to this cgroup, from bpftool."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"bpftool cgroup show failed: {out.stderr}")
    return [p.get("name", "") for p in json.loads(out.stdout.strip() or "[]")]
