"""What the host is doing around a measurement: CPU busy fraction (to wait for a quiet machine) and TCP counters."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat: idle + iowait are idle, the rest busy (guest time is inside user)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]]
            idle = values[3] + values[4]
            return CpuTimes(busy=sum(values) - idle, total=sum(values))
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_proc_stat_cpu(text: str, cpu: int) -> CpuTimes:
    """The `cpuN` line of /proc/stat, as parse_proc_stat reads the aggregate one."""
    name = f"cpu{cpu}"
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            values = [int(v) for v in parts[1:9]]
            idle = values[3] + values[4]
            return CpuTimes(busy=sum(values) - idle, total=sum(values))
    raise ValueError(f"no {name} line in /proc/stat")


def cpu_times(cpu: int | None = None) -> CpuTimes:
    """Busy and total ticks of one CPU (or all, when cpu is None), now."""
    text = Path("/proc/stat").read_text()
    return parse_proc_stat(text) if cpu is None else parse_proc_stat_cpu(text, cpu)


def busy_fraction(before: CpuTimes, after: CpuTimes) -> float:
    total = after.total - before.total
    return 0.0 if total <= 0 else (after.busy - before.busy) / total


def sample_busy(window_s: float) -> float:
    """Fraction of all CPUs busy over the next window_s seconds."""
    before = parse_proc_stat(Path("/proc/stat").read_text())
    time.sleep(window_s)
    return busy_fraction(before, parse_proc_stat(Path("/proc/stat").read_text()))


def wait_quiet(threshold: float, max_wait_s: float, window_s: float = 0.2) -> tuple[float, float]:
    """Sample until the host is below threshold busy or max_wait_s passed: (last busy fraction, seconds waited)."""
    t0 = time.monotonic()
    busy = sample_busy(window_s)
    while busy > threshold and time.monotonic() - t0 < max_wait_s:
        busy = sample_busy(window_s)
    return busy, time.monotonic() - t0


def parse_netstat(text: str, names: tuple[str, ...]) -> dict[str, int]:
    """Named TcpExt counters from a /proc/net/netstat text (header line, then value line, per group)."""
    lines = text.splitlines()
    out: dict[str, int] = {}
    for header, values in zip(lines[::2], lines[1::2]):
        if header.startswith("TcpExt:"):
            row = dict(zip(header.split()[1:], values.split()[1:]))
            out = {n: int(row.get(n, 0)) for n in names}
    return out


LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops")


def listen_counters() -> dict[str, int]:
    """Host-wide accept-queue overflow counters: nonzero deltas mean a connect round paid a SYN retransmit."""
    try:
        return parse_netstat(Path("/proc/net/netstat").read_text(), LISTEN_COUNTERS)
    except OSError:
        return {}


def cpu_fields(cpu: int) -> dict[str, int]:
    """user, system, softirq, irq and steal ticks of one CPU, now (to see what, besides a process, kept it busy)."""
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == f"cpu{cpu}":
            v = [int(x) for x in parts[1:9]]
            return {"user": v[0] + v[1], "system": v[2], "irq": v[5], "softirq": v[6], "steal": v[7]}
    return {}


def kernel_thread_cpu_s(prefix: str = "kworker") -> float:
    """CPU seconds used so far by the kernel threads whose name starts with prefix (kworkers run deferred work,
    e.g. freeing sockets, on any CPU)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1:text.rfind(")")]
        if comm.startswith(prefix):
            f = text[text.rfind(")") + 2:].split()
            total += int(f[11]) + int(f[12])
    return total / hz
