"""Keeps the gateway process running beside the agent: its own process, so gateway load never stalls the agent's
ring draining. Spawned into the gateway cgroup (the child writes its own pid into `cgroup.procs` before it execs the
gateway, so not one of its connections is made from the agent's cgroup: a `/bin/sh` step rather than a Python
`preexec_fn`, which is unsafe after fork in the multi-threaded agent), restarted with exponential back-off when it
exits (counted), sent SIGHUP when the policy file changes, stopped (SIGTERM, then SIGKILL) on close. Health: the
process being alive (`alive()`).

`poll()` does one round of the checks; `start()` runs it in a thread every `interval_s`.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("aimesh.gateway")


def gateway_argv(python: str, policy: Path, origin_pin: Path, listen: str, records: Path,
                 ca_dir: Path | None) -> list[str]:
    """The command line of the gateway process (agent/gateway/__main__.py)."""
    argv = [python, "-m", "agent.gateway", "--policy", str(policy), "--origin-pin", str(origin_pin),
            "--listen", listen, "--records", str(records)]
    return argv + (["--ca-dir", str(ca_dir)] if ca_dir is not None else [])


@dataclass(frozen=True, slots=True)
class SupervisorCounters:
    starts: int
    restarts: int
    reloads: int
    pid: int | None


_JOIN = 'echo $$ > "$0" && exec "$@"'     # sh: join the cgroup (cgroup.procs is $0), then become the gateway


class GatewaySupervisor:
    def __init__(self, argv: Sequence[str], policy_path: Path, cgroup_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 interval_s: float = 0.5, env: dict[str, str] | None = None) -> None:
        self._argv = list(argv)
        self._policy = Path(policy_path)
        self._cgroup = cgroup_dir
        self._clock = clock
        self._min, self._max = min_backoff_s, max_backoff_s
        self._backoff = min_backoff_s
        self._interval = interval_s
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._next_start = 0.0
        self._started_at = 0.0
        self._policy_mtime = self._mtime()
        self._starts = self._restarts = self._reloads = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mtime(self) -> tuple[int, int] | None:
        try:
            st = self._policy.stat()
            return st.st_mtime_ns, st.st_ino
        except FileNotFoundError:
            return None

    def _spawn(self) -> None:
        argv = (["/bin/sh", "-c", _JOIN, str(self._cgroup / "cgroup.procs"), *self._argv]
                if self._cgroup is not None else self._argv)
        self._proc = subprocess.Popen(argv, env=self._env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._started_at = self._clock()
        self._starts += 1
        log.info("gateway started (pid %d)", self._proc.pid)

    def poll(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            now = self._clock()
            if self._proc is not None and self._proc.poll() is not None:
                rc = self._proc.returncode
                ran = now - self._started_at
                if ran > 60:                     # it ran a while: a fresh failure, not a crash loop
                    self._backoff = self._min
                self._next_start = now + self._backoff
                log.warning("gateway exited (code %s) after %.1fs; restarting in %.1fs", rc, ran, self._backoff)
                self._backoff = min(self._backoff * 2, self._max)
                self._proc = None
                self._restarts += 1
            if self._proc is None and now >= self._next_start:
                try:
                    self._spawn()
                except OSError as e:
                    log.error("gateway could not start: %s", e)
                    self._next_start = now + self._backoff
            m = self._mtime()
            if m != self._policy_mtime:
                self._policy_mtime = m
                if self._proc is not None and m is not None:
                    self._proc.send_signal(signal.SIGHUP)
                    self._reloads += 1

    def start(self) -> None:
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="gateway-supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def alive(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    @property
    def counters(self) -> SupervisorCounters:
        with self._lock:
            return SupervisorCounters(self._starts, self._restarts, self._reloads,
                                      self._proc.pid if self._proc is not None else None)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        with self._lock:
            p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
