"""Socket conformance beside the speed figures (issue 23): the workloads of tests/kernel/conformance.py run between a
path's client and server cgroups, and what the application saw on an agent path is compared with what it saw with
no agent. A fast path that is quicker but changes what applications see is reported as such, next to its gains.

  run(python, client_cg, server_cg, ports)  what the application saw, scenario -> result (one client run)
  compare(seen, baseline)                    per path: identical scenarios, and the names of those that differ
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

WORKLOAD = Path(__file__).resolve().parent.parent / "tests" / "kernel" / "conformance.py"


def scenarios() -> list[str]:
    """The scenario names, in the workload's order."""
    from tests.kernel.conformance import SERVERS
    return list(SERVERS)


def _enter(cgroup: Path):
    def fn() -> None:
        (cgroup / "cgroup.procs").write_text("0")
    return fn


def run(python: Path, client_cg: Path, server_cg: Path, ports: dict[str, int], timeout_s: float = 300) -> dict:
    """One server and one client run, each in its cgroup; the client's JSON object (scenario -> what it saw)."""
    srv = subprocess.Popen([str(python), str(WORKLOAD), "server", json.dumps(ports)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, preexec_fn=_enter(server_cg))
    try:
        ready = srv.stdout.readline() if srv.stdout else ""
        if json.loads(ready or "null") != {"ready": True}:
            raise RuntimeError("conformance server did not start")
        cli = subprocess.run([str(python), str(WORKLOAD), "client", json.dumps(ports)], capture_output=True,
                             text=True, timeout=timeout_s, preexec_fn=_enter(client_cg))
        if cli.returncode != 0 or not cli.stdout.strip():
            raise RuntimeError(f"conformance client failed: {cli.stderr.strip()[-300:]}")
        return json.loads(cli.stdout.splitlines()[-1])
    finally:
        srv.kill()
        srv.wait()


def compare(seen: dict[str, dict], baseline: str) -> dict[str, dict]:
    """For each path but the baseline: how many scenarios saw exactly what the baseline saw, and which differ."""
    base: Optional[dict] = seen.get(baseline)
    out = {}
    for name, res in seen.items():
        if name == baseline or base is None:
            continue
        differ = sorted(k for k in base if res.get(k) != base[k])
        out[name] = {"identical": len(base) - len(differ), "scenarios": len(base), "differ": differ}
    return out


def line(label: str, c: dict) -> str:
    tail = f" (differ: {', '.join(c['differ'])})" if c["differ"] else ""
    return f"  conformance, {label}: {c['identical']}/{c['scenarios']} scenarios identical to no agent{tail}"
