"""The "TLS not visible" report: a captured connection speaking TLS aimesh cannot read. Pure: fed capture chunks.

A connection whose TLS goes through OpenSSL's libssl is joined to its SSL_* calls in the kernel (bpf/tls.c): its
handshake is never copied by the syscall path, and its plaintext arrives as chunks flagged TLS. A connection whose
first bytes sent are a TLS handshake record, copied by the syscall path, is one whose TLS library aimesh does not probe
(Go crypto/tls, rustls, a statically linked BoringSSL). If no TLS plaintext follows on it before it closes or within a
grace period (uprobes attached late still count), it is reported: once per connection (the per-source counter
aimesh_tls_not_visible_total) and once per process (a log line naming comm, pid and exe).

`on_handshake` takes the same fact from elsewhere (a kernel-side handshake detection that copies nothing).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.kernel import abi
from agent.l7.capture import CaptureChunk
from agent.l7.http1 import Direction

TLS_HANDSHAKE = 0x16            # TLS record content type
DEFAULT_GRACE_NS = 10 * 10**9   # a handshake with no plaintext after this long is reported
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_PROCESSES = 4096


def looks_like_tls_handshake(data: bytes) -> bool:
    """A TLS record header of a handshake (type 22, version 3.x with x <= 4), and a ClientHello when that byte is
    there."""
    if len(data) < 3 or data[0] != TLS_HANDSHAKE or data[1] != 3 or data[2] > 4:
        return False
    return len(data) < 6 or data[5] == 1


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    comm: str
    exe: str


def proc_info(pid: int, proc: Path = Path("/proc")) -> ProcessInfo:
    """comm and exe of a process from /proc (empty when it exited or cannot be read)."""
    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        comm = ""
    try:
        exe = str((proc / str(pid) / "exe").readlink())
    except OSError:
        exe = ""
    return ProcessInfo(pid, comm, exe)


@dataclass(frozen=True, slots=True)
class NotVisible:
    """A connection that started a TLS handshake and never showed plaintext."""
    cookie: int
    src_id: int
    process: ProcessInfo
    first_of_process: bool      # log this one: the process was not reported before


@dataclass(slots=True)
class _Pending:
    src_id: int
    process: ProcessInfo
    since_ns: int


class TlsVisibility:
    """Per connection (socket cookie): did it start TLS, did plaintext follow. `describe(pid)` names the process
    (read when the handshake is seen, while the process still runs)."""

    def __init__(self, describe: Callable[[int], ProcessInfo] = proc_info, grace_ns: int = DEFAULT_GRACE_NS,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, max_processes: int = DEFAULT_MAX_PROCESSES) -> None:
        self._describe = describe
        self._grace_ns = grace_ns
        self._max = max_connections
        self._max_processes = max_processes
        self._seen: OrderedDict[int, bool] = OrderedDict()       # cookie -> its first request bytes were looked at
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._visible: OrderedDict[int, bool] = OrderedDict()     # cookies that carried TLS plaintext
        self._reported: OrderedDict[tuple[int, str], bool] = OrderedDict()   # (pid, exe) logged once

    def on_chunk(self, c: CaptureChunk) -> list[NotVisible]:
        if c.kind is abi.CaptureKind.CLOSE:
            self._seen.pop(c.cookie, None)
            self._visible.pop(c.cookie, None)
            p = self._pending.pop(c.cookie, None)
            return [self._report(c.cookie, p)] if p is not None else []
        if c.tls:
            self._bounded_add(self._visible, c.cookie)
            self._pending.pop(c.cookie, None)
            return []
        if c.direction is Direction.REQUEST and c.offset == 0 and c.cookie not in self._seen:
            self._bounded_add(self._seen, c.cookie)
            if looks_like_tls_handshake(c.data):
                self.on_handshake(c.cookie, c.pid, c.src_id, c.ts_ns)
        return []

    def on_handshake(self, cookie: int, pid: int, src_id: int, ts_ns: int) -> None:
        """A TLS handshake started on a captured connection, seen outside the SSL_* probes."""
        if cookie in self._visible or cookie in self._pending:
            return
        while len(self._pending) >= self._max:
            self._pending.popitem(last=False)
        self._pending[cookie] = _Pending(src_id, self._describe(pid), ts_ns)

    def expire(self, now_ns: int) -> list[NotVisible]:
        """Report connections whose handshake is older than the grace period with no plaintext since."""
        late = [k for k, p in self._pending.items() if now_ns - p.since_ns >= self._grace_ns]
        return [self._report(k, self._pending.pop(k)) for k in late]

    def _report(self, cookie: int, p: _Pending) -> NotVisible:
        key = (p.process.pid, p.process.exe)
        first = key not in self._reported
        if first:
            self._bounded_add(self._reported, key, self._max_processes)
        return NotVisible(cookie, p.src_id, p.process, first)

    def _bounded_add(self, d: OrderedDict, key, cap: Optional[int] = None) -> None:
        d[key] = True
        d.move_to_end(key)
        while len(d) > (cap or self._max):
            d.popitem(last=False)


class TlsNotVisibleTally(Collector):
    """aimesh_tls_not_visible_total{source}: connections whose TLS aimesh could not read, per source identity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, source: str) -> None:
        with self._lock:
            self._counts[source] = self._counts.get(source, 0) + 1

    def collect(self) -> Iterable:
        with self._lock:
            counts = dict(self._counts)
        f = CounterMetricFamily("aimesh_tls_not_visible", "Captured connections that started TLS aimesh cannot read "
                                "(no OpenSSL libssl plaintext: Go crypto/tls, rustls, static BoringSSL)",
                                labels=["source"])
        for source, n in sorted(counts.items()):
            f.add_metric([source], n)
        yield f


def describe_not_visible(nv: NotVisible, source: str) -> str:
    """The one log line for a process (first_of_process)."""
    p = nv.process
    return (f"TLS not visible: {p.comm or '?'} (pid {p.pid}, exe {p.exe or '?'}) of {source} starts TLS that aimesh "
            "cannot read (not through a probed OpenSSL libssl: Go crypto/tls, rustls or a static TLS library); its "
            "model calls are not recorded")
