"""One private cgroup subtree with one agent in it, for the benches that start and stop the agent themselves
(bench.restart, bench.flood): make groups, spawn workloads in them, start/stop the agent, clean up by id."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBench:
    def __init__(self, tmp: Path, name: str) -> None:
        import os

        from agent.identity.cgroups import cgroup2_mount
        self.tmp = tmp
        self.mount = cgroup2_mount()
        self.root = self.mount / f"aimesh-bench-{name}-{os.getpid()}"
        self.root.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.agent: Optional[subprocess.Popen] = None
        self.metrics_port = free_port()
        self.config_path = tmp / "aimesh.yaml"
        self.log_path = tmp / "agent.log"

    def group(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def rel(self, p: Path) -> str:
        return "/" + str(p.relative_to(self.mount))

    def spawn(self, argv: list[str], cgroup: Optional[Path] = None, **kw) -> subprocess.Popen:
        def enter() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0")
        p = subprocess.Popen(argv, preexec_fn=enter, **kw)
        self.procs.append(p)
        return p

    def write_config(self, cfg: dict) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tmp.replace(self.config_path)

    def start_agent(self, cfg: dict, extra: tuple[str, ...] = ()) -> float:
        """Start the agent on the subtree; seconds until /healthz answered 200."""
        self.write_config(cfg)
        t0 = time.monotonic()
        self.agent = subprocess.Popen([PY, "-m", "agent", "agent", "--config", str(self.config_path), "--cgroup-root",
                                       str(self.root), "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *extra],
                                      cwd=REPO, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT)
        while True:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log_path.read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.01)

    def stop_agent(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()

    def rss(self) -> int:
        urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        return psutil.Process(self.agent.pid).memory_info().rss

    def cleanup(self) -> None:
        """Stop everything started here, uninstall the subtree's datapath, remove its cgroups."""
        from agent.identity.cgroups import remove_cgroup, uninstall_datapath
        self.stop_agent()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        uninstall_datapath(self.root)
        for d in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            remove_cgroup(d, 5)
        remove_cgroup(self.root, 5)
