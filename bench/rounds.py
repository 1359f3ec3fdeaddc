"""Interleaved rounds over a set of paths (the columns of a section's table).

A path is where a client and its server run (cgroup leaves, maybe a network namespace), the port the client dials
and, when something mesh-like sits on it, the process whose CPU counts for it (an agent or a proxy). Each round
starts every path's server, runs every path's RR back to back, then every connect+close, then every bulk transfer,
in an order rotated per round, and stops the servers. Between two runs the bench waits until the processes of the
run just finished are idle, so that leftover work (a proxy draining its backlog, the agent reading its ring buffer)
is not charged to the next path, which shares the CPU.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

from bench import agents, cgroups, host, loadgen, stats
from bench.configs import AgentConfigSpec
from bench.made import Made

KINDS = ("rr", "crr", "bulk")


@dataclass(frozen=True)
class Route:
    name: str                   # short key: "none", "enforce", "r100k", ...
    label: str                  # the table's row label
    group: str                  # cgroup group below the bench root, with client/ and server/ leaves
    server_port: int
    dial_port: int              # what the client connects to (a proxy's port on the sidecar path)
    netns: Optional[str] = None
    agent: Optional[AgentConfigSpec] = None
    meter: Optional[str] = None  # name of the process (agent or proxy) whose CPU counts for this path


@dataclass(frozen=True)
class RoundSettings:
    workload: loadgen.Workload
    workload_cpu: Optional[int]
    quiet_threshold: float
    quiet_max_wait_s: float
    client_timeout_s: float
    kinds: tuple[str, ...] = KINDS


def lines_for(p: Route, tree: cgroups.BenchTree, lg: loadgen.LoadGen, s: RoundSettings) -> dict[str, str]:
    cpu, w = s.workload_cpu, s.workload
    client = tree.leaf(p.group, "client")
    out = {"server": loadgen.shell_line(tree.leaf(p.group, "server"), cpu, loadgen.server_argv(lg, p.server_port),
                                        p.netns)}
    argv = {"rr": loadgen.rr_argv(lg, p.dial_port, w), "crr": loadgen.crr_argv(lg, p.dial_port, w),
            "bulk": loadgen.bulk_argv(lg, p.dial_port, w)}
    for kind in s.kinds:
        out[kind] = loadgen.shell_line(client, cpu, argv[kind], p.netns)
    return out


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])     # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(pids: list[int], max_wait_s: float = 1.0, step_s: float = 0.01) -> float:
    """Wait until these processes used no CPU for three consecutive steps (or max_wait_s); seconds waited."""
    t0 = time.monotonic()
    last, quiet = _cpu_ticks(pids), 0
    while quiet < 3 and time.monotonic() - t0 < max_wait_s:
        time.sleep(step_s)
        now = _cpu_ticks(pids)
        quiet = quiet + 1 if now == last else 0
        last = now
    return time.monotonic() - t0


@dataclass
class Meters:
    """Processes whose CPU is charged to a path: name -> psutil.Process."""
    procs: dict[str, psutil.Process]

    def cpu(self, name: Optional[str]) -> Optional[float]:
        if name is None or name not in self.procs:
            return None
        u = agents.usage_of(self.procs[name])
        return u.cpu_s if u else None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]


def run_one(line: str, timeout: float, meter: Optional[str], meters: Meters, settle_pids: list[int]) -> tuple[dict, float]:
    """Run one client to completion, then let the path's processes go idle: (its JSON, meter CPU used meanwhile)."""
    before = meters.cpu(meter)
    out = loadgen.run_client(line, timeout)
    settle(settle_pids)
    after = meters.cpu(meter)
    return out, (after - before) if (before is not None and after is not None) else 0.0


def measure_round(order: list[Route], lines: dict[str, dict[str, str]], round_no: int, s: RoundSettings,
                  made: Made, meters: Meters) -> list[stats.RoundResult]:
    busy, waited = host.wait_quiet(s.quiet_threshold, s.quiet_max_wait_s)
    servers: dict[str, subprocess.Popen] = {}
    res: dict[str, dict[str, Optional[dict]]] = {p.name: {k: None for k in KINDS} for p in order}
    cpu: dict[str, float] = {p.name: 0.0 for p in order}
    overflows: dict[str, int] = {p.name: 0 for p in order}
    try:
        for p in order:
            servers[p.name] = loadgen.start_server(lines[p.name]["server"])
            made.servers.append(servers[p.name])
        for kind in s.kinds:
            for p in order:
                pids = [servers[p.name].pid] + ([meters.procs[p.meter].pid] if p.meter in meters.procs else [])
                before = host.listen_counters() if kind == "crr" else {}
                out, used = run_one(lines[p.name][kind], s.client_timeout_s, p.meter, meters, pids)
                if kind == "crr":
                    after = host.listen_counters()
                    overflows[p.name] = after.get("ListenOverflows", 0) - before.get("ListenOverflows", 0)
                res[p.name][kind] = out
                cpu[p.name] += used
    finally:
        for srv in servers.values():
            loadgen.stop_server(srv)
            made.servers.remove(srv)
    return [stats.RoundResult(round=round_no, position=pos, config=p.name, busy_before=round(busy, 4),
                              quiet_wait_s=round(waited, 3), rr=res[p.name]["rr"], crr=res[p.name]["crr"],
                              bulk=res[p.name]["bulk"], listen_overflows=overflows[p.name],
                              mesh_cpu_s=round(cpu[p.name], 4) if p.meter else None)
            for pos, p in enumerate(order)]


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def progress_line(round_no: int, rounds: int, results: list[stats.RoundResult]) -> str:
    mine = sorted((r for r in results if r.round == round_no), key=lambda r: r.position)
    cells = []
    for r in mine:
        c = r.config
        if r.rr:
            c += f" {r.rr['median_us']:.1f}µs"
        if r.crr:
            c += f" {r.crr['rate_per_s'] / 1000:.1f}k/s"
        if r.bulk:
            c += f" {r.bulk['mb_per_s']:,.0f}MB/s"
        cells.append(c)
    busy = max(r.busy_before for r in mine)
    return f"  round {round_no + 1:>2}/{rounds}: " + " | ".join(cells) + f"  (busy before ≤{busy:.0%})"


def run_rounds(paths: list[Route], lines: dict[str, dict[str, str]], rounds: int, s: RoundSettings, made: Made,
               meters: Meters, progress: Callable[[str], None]) -> tuple[list[stats.RoundResult], float]:
    results: list[stats.RoundResult] = []
    t0 = time.monotonic()
    for r in range(rounds):
        results += measure_round(rotated(paths, r), lines, r, s, made, meters)
        progress(progress_line(r, rounds, results))
    return results, time.monotonic() - t0
