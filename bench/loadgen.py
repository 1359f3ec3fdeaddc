"""The load generator: bench/loadgen.c compiled with the machine's cc, or bench/pyloadgen.py when there is no cc.

Every client and server runs as one shell line that moves itself into its cgroup, enters a network namespace when
its path has one (nsenter, after the cgroup: `ip netns exec` would remount /sys), pins itself to a CPU and execs the
generator; the same line is recorded in results.json so it can be rerun by hand.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "loadgen.c"
PY_SOURCE = HERE / "pyloadgen.py"
HOST = "127.0.0.1"


class LoadGenError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadGen:
    kind: str                 # "c" or "python"
    argv: list[str]           # the generator, before its mode arguments
    build: Optional[list[str]] = None   # the compile command, when kind == "c"
    note: str = ""


@dataclass(frozen=True)
class Workload:
    rr_n: int
    rr_size: int
    rr_warmup: int
    crr_n: int
    crr_warmup: int
    bulk_bytes: int = 256 * 2**20


def build(tmpdir: Path, force_python: bool = False) -> LoadGen:
    """Compile loadgen.c into tmpdir; fall back to the Python generator (and say why) without cc or on failure."""
    python = LoadGen(kind="python", argv=[sys.executable, str(PY_SOURCE)])
    if force_python:
        return LoadGen(kind="python", argv=python.argv, note="--python-loadgen given")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return LoadGen(kind="python", argv=python.argv, note="no C compiler found: Python jitter hides ~2% effects")
    out = tmpdir / "aimesh-lg"
    cmd = [cc, "-O2", "-Wall", "-o", str(out), str(C_SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return LoadGen(kind="python", argv=python.argv, note=f"cc failed: {res.stderr.strip()[:300]}")
    return LoadGen(kind="c", argv=[str(out)], build=cmd)


def netns_path(netns: str) -> str:
    return f"/run/netns/{netns}"


def shell_line(cgroup: Path, cpu: Optional[int], argv: list[str], netns: Optional[str] = None) -> str:
    """`echo $$ > CG/cgroup.procs && exec [nsenter --net=NS] [taskset -c CPU] ARGV...`: join the cgroup, then
    become the program (same pid all along, so the caller's Popen.pid is the program's)."""
    pin = f"taskset -c {cpu} " if cpu is not None else ""
    ns = f"nsenter --net={shlex.quote(netns_path(netns))} " if netns else ""
    return f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && exec {ns}{pin}{shlex.join(argv)}"


def server_argv(lg: LoadGen, port: int) -> list[str]:
    return lg.argv + ["server", HOST, str(port)]


def rr_argv(lg: LoadGen, port: int, w: Workload) -> list[str]:
    return lg.argv + ["rr", HOST, str(port), str(w.rr_n), str(w.rr_size), str(w.rr_warmup)]


def crr_argv(lg: LoadGen, port: int, w: Workload) -> list[str]:
    return lg.argv + ["crr", HOST, str(port), str(w.crr_n), str(w.crr_warmup)]


def bulk_argv(lg: LoadGen, port: int, w: Workload) -> list[str]:
    return lg.argv + ["bulk", HOST, str(port), str(w.bulk_bytes)]


def crate_argv(lg: LoadGen, port: int, n: int, rate: float) -> list[str]:
    return lg.argv + ["crate", HOST, str(port), str(n), f"{rate:g}"]


def start_server(line: str) -> subprocess.Popen:
    """Start a server shell line; returns once it printed 'ready' (it is listening)."""
    p = subprocess.Popen(["sh", "-c", line], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = p.stdout.readline() if p.stdout else ""
    if first.strip() != "ready":
        stop_server(p)
        err = p.stderr.read() if p.stderr else ""
        raise LoadGenError(f"server did not start: {(first + err).strip() or 'no output'}\n  {line}")
    return p


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()
    for f in (p.stdout, p.stderr):
        if f:
            f.close()


def run_client(line: str, timeout_s: float) -> dict:
    """Run a client shell line to completion; its one JSON line as a dict."""
    p = subprocess.Popen(["sh", "-c", line], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise LoadGenError(f"client timed out after {timeout_s:.0f}s:\n  {line}") from None
    if p.returncode != 0:
        raise LoadGenError(f"client failed ({p.returncode}): {err.strip()}\n  {line}")
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise LoadGenError(f"client printed no JSON: {out.strip()!r}\n  {line}") from None
