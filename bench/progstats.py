"""Optional diagnostic: the kernel's own run time per BPF program run, for the programs attached to one cgroup.

BPF_ENABLE_STATS turns run-time accounting on for as long as the returned fd stays open (closing it turns it off
again), so nothing global is left changed. Accounting adds two clock reads per program run, which is why the
bench uses it only in a separate phase after the measured rounds. Program ids and counters come from bpftool.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


@dataclass(frozen=True)
class ProgCounters:
    name: str
    attach_type: str
    run_cnt: int
    run_time_ns: int


def enable_stats() -> Optional[int]:
    """An fd that keeps run-time stats on until closed, or None when the kernel or arch does not offer it."""
    nr = SYS_BPF.get(platform.machine())
    if nr is None or shutil.which("bpftool") is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 30)()     # union bpf_attr, zeroed; enable_stats.type is its first field
    attr[0] = BPF_STATS_RUN_TIME
    fd = libc.syscall(nr, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd if fd >= 0 else None


def disable_stats(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def _bpftool(args: list[str]) -> object:
    out = subprocess.run(["bpftool", "-j"] + args, capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def counters(cgroup: Path) -> dict[str, ProgCounters]:
    """attach type -> counters of the programs attached directly at cgroup (ours: one per attach type)."""
    out: dict[str, ProgCounters] = {}
    for p in _bpftool(["cgroup", "show", str(cgroup)]) or []:
        info = _bpftool(["prog", "show", "id", str(p["id"])])
        if isinstance(info, dict):
            out[p["attach_type"]] = ProgCounters(name=p.get("name", ""), attach_type=p["attach_type"],
                                                 run_cnt=int(info.get("run_cnt", 0)),
                                                 run_time_ns=int(info.get("run_time_ns", 0)))
    return out


def per_run(before: dict[str, ProgCounters], after: dict[str, ProgCounters]) -> dict[str, dict]:
    """attach type -> {runs, ns_per_run} over the interval, for the programs that ran in it."""
    out: dict[str, dict] = {}
    for t, a in after.items():
        b = before.get(t)
        runs = a.run_cnt - (b.run_cnt if b else 0)
        if runs > 0:
            ns = a.run_time_ns - (b.run_time_ns if b else 0)
            out[t] = {"program": a.name, "runs": runs, "ns_per_run": ns / runs}
    return out
