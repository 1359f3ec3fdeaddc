"""Gateway model-call records: one JSON object per request, one unix datagram each, gateway -> agent.

The gateway's `RecordSender` never blocks: when the agent's socket queue is full (Linux queues only
net.unix.max_dgram_qlen = 10 datagrams by default) records wait in a bounded backlog, flushed when the socket is
writable again (`attach(loop)`: asyncio's add_writer); a full backlog, or no agent listening, drops the record and
counts it. Each record carries `seq`, the sender's running number, so the agent's `GatewayRecordReceiver` also
counts what was lost on the way (gaps) — and restarts of the gateway (seq back to 0) are not counted as losses.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
from pathlib import Path
from typing import Any

MAX_DATAGRAM = 64 << 10
MAX_BACKLOG = 10_000


class RecordSender:
    """One per gateway, used from its event loop thread."""

    def __init__(self, path: str | Path | None, max_backlog: int = MAX_BACKLOG) -> None:
        self._path = str(path) if path else None
        self._sock: socket.socket | None = None
        self._connected = False
        self._backlog: collections.deque[bytes] = collections.deque()
        self._max_backlog = max_backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = False
        self.seq = 0
        self.sent = 0
        self.dropped = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush the backlog when the socket becomes writable (without a loop: at the next send)."""
        self._loop = loop

    def send(self, record: dict[str, Any]) -> None:
        rec = {**record, "seq": self.seq}
        self.seq += 1
        if self._path is None:
            return
        data = json.dumps(rec, separators=(",", ":"), default=str).encode()
        if len(data) > MAX_DATAGRAM or len(self._backlog) >= self._max_backlog:
            self.dropped += 1
            return
        self._backlog.append(data)
        self._flush()

    def _connect(self) -> socket.socket:
        """Connected, so that poll() says writable only when the agent's queue has room (unix_dgram_poll)."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        if not self._connected:
            self._sock.connect(self._path)
            self._connected = True
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._unwatch()
            self._sock.close()
        self._sock, self._connected = None, False

    def _unwatch(self) -> None:
        if self._writer and self._loop is not None and self._sock is not None and not self._loop.is_closed():
            self._loop.remove_writer(self._sock.fileno())
        self._writer = False

    def _flush(self) -> None:
        while self._backlog:
            try:
                sock = self._connect()
                sock.send(self._backlog[0])
            except (BlockingIOError, InterruptedError):      # the agent's queue is full: wait until writable
                if self._loop is not None and not self._writer and self._sock is not None:
                    self._loop.add_writer(self._sock.fileno(), self._flush)
                    self._writer = True
                return
            except OSError:          # ENOENT/ECONNREFUSED: no agent listening (or it restarted); drop, count
                self.dropped += 1
                self._reset()
            else:
                self.sent += 1
            self._backlog.popleft()
        self._unwatch()

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        self._reset()


class GatewayRecordReceiver:
    """The agent's end: binds `path` (replacing a stale socket); `drain()` returns what is queued, non-blocking."""

    def __init__(self, path: str | Path, max_per_drain: int = 4096) -> None:
        self.path = Path(path)
        self._max = max_per_drain
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._sock.setblocking(False)
        self._next_seq: int | None = None
        self.received = 0
        self.dropped = 0          # lost on the way (seq gaps) + malformed datagrams

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < self._max:
            try:
                data = self._sock.recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            try:
                rec = json.loads(data)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.dropped += 1
                continue
            seq = rec.get("seq")
            if isinstance(seq, int):
                if self._next_seq is not None and seq > self._next_seq:
                    self.dropped += seq - self._next_seq
                self._next_seq = seq + 1
            self.received += 1
            out.append(rec)
        return out

    def close(self) -> None:
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
