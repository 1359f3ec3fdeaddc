"""Run the aimesh agent as a child process: start, wait for /healthz, read its usage and metrics, stop it."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
from prometheus_client.parser import text_string_to_metric_families


class AgentStartError(RuntimeError):
    pass


@dataclass
class AgentProc:
    name: str
    argv: list[str]
    metrics_port: int
    log_path: Path
    popen: subprocess.Popen
    ps: psutil.Process

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"


@dataclass(frozen=True)
class Usage:
    cpu_s: float       # user + system, all threads, since start
    rss_bytes: int


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_argv(python: Path, config: Path, cgroup_root: Path, metrics_port: int, cpu: Optional[int],
               extra: tuple[str, ...] = ()) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return pin + [str(python), "-m", "agent", "agent", "--config", str(config), "--cgroup-root", str(cgroup_root),
                  "--metrics-addr", f"127.0.0.1:{metrics_port}", *extra]


def start_agent(name: str, argv: list[str], metrics_port: int, log_path: Path, cwd: Path) -> AgentProc:
    """Start in its own session, so a Ctrl-C reaches only the bench, which then stops the agent itself."""
    log = open(log_path, "wb")
    try:
        popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    finally:
        log.close()
    return AgentProc(name=name, argv=argv, metrics_port=metrics_port, log_path=log_path, popen=popen,
                     ps=psutil.Process(popen.pid))


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def healthy(agent: AgentProc) -> bool:
    try:
        with urllib.request.urlopen(agent.url("/healthz"), timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(agent: AgentProc, timeout_s: float) -> float:
    """Seconds until /healthz said 200; AgentStartError (with the log's tail) if it exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if agent.popen.poll() is not None:
            raise AgentStartError(f"agent {agent.name} exited with {agent.popen.returncode}:\n"
                                  f"{_log_tail(agent.log_path)}")
        if healthy(agent):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AgentStartError(f"agent {agent.name} not ready after {timeout_s:.0f}s:\n{_log_tail(agent.log_path)}")


def usage(agent: AgentProc) -> Optional[Usage]:
    return usage_of(agent.ps)


def usage_of(ps: psutil.Process) -> Optional[Usage]:
    """CPU (user + system, all threads) and RSS of any process we started; None once it is gone."""
    try:
        with ps.oneshot():
            t = ps.cpu_times()
            return Usage(cpu_s=t.user + t.system, rss_bytes=ps.memory_info().rss)
    except psutil.Error:
        return None


def scrape(agent: AgentProc) -> dict[str, float]:
    """Every sample of /metrics as 'name{label="v",...}' -> value; empty when the agent does not answer."""
    try:
        with urllib.request.urlopen(agent.url("/metrics"), timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def stop_agent(agent: AgentProc, timeout_s: float = 15.0) -> Optional[int]:
    """SIGTERM (the agent detaches and exits), SIGKILL if it does not within timeout_s; the exit status."""
    if agent.popen.poll() is None:
        agent.popen.send_signal(signal.SIGTERM)
        try:
            agent.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            agent.popen.kill()
            agent.popen.wait()
    return agent.popen.returncode
