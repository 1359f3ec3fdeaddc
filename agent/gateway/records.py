"""Gateway model-call records: one JSON object per request, one unix datagram each, gateway -> agent.

The gateway's `RecordSender` never blocks: a full socket buffer (or no agent listening) drops the record and counts
it. Each record carries `seq`, the sender's running number, so the agent's `GatewayRecordReceiver` also counts what
was lost on the way (gaps) — and restarts of the gateway (seq back to 0) are not counted as losses.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

MAX_DATAGRAM = 64 << 10


class RecordSender:
    def __init__(self, path: str | Path | None) -> None:
        self._path = str(path) if path else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if path else None
        if self._sock is not None:
            self._sock.setblocking(False)
        self.seq = 0
        self.sent = 0
        self.dropped = 0

    def send(self, record: dict[str, Any]) -> None:
        rec = {**record, "seq": self.seq}
        self.seq += 1
        if self._sock is None:
            return
        data = json.dumps(rec, separators=(",", ":"), default=str).encode()
        if len(data) > MAX_DATAGRAM:
            self.dropped += 1
            return
        try:
            self._sock.sendto(data, self._path)
            self.sent += 1
        except OSError:          # EAGAIN (agent behind), ENOENT/ECONNREFUSED (no agent): drop, count
            self.dropped += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


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
