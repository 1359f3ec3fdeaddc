"""Fallback load generator when there is no C compiler: the same command line and output as loadgen.c.

    pyloadgen.py server HOST PORT | rr HOST PORT N SIZE WARMUP | crr HOST PORT N WARMUP | crate HOST PORT N RATE
                 | bulk HOST PORT BYTES

Standalone on purpose (no bench imports): it runs as a plain script inside the bench cgroups. Its own interpreter
overhead is several microseconds per call, so it cannot resolve the ~2% differences the C generator can.
"""
from __future__ import annotations

import json
import socket
import struct
import sys
import time


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def _pct(sorted_ns: list[int], p: float) -> float:
    i = min(len(sorted_ns) - 1, max(0, int(p / 100 * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[i] / 1000


BULK_MAGIC = b"AIMESHB1"
BULK_CHUNK = 128 * 1024


def _sink(c: socket.socket, head: bytes) -> None:
    """A bulk connection (loadgen.c's sink): count the announced bytes, answer the count, wait for the close."""
    want = struct.unpack("=Q", head[8:16])[0]
    got = len(head) - 16
    while got < want:
        data = c.recv(65536)
        if not data:
            return
        got += len(data)
    c.sendall(struct.pack("=Q", got))
    while c.recv(65536):
        pass


def serve(host: str, port: int) -> int:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            have = b""
            while True:
                data = c.recv(65536)
                if not data:
                    break
                have += data
                if len(have) < 16 and BULK_MAGIC.startswith(have[:8]):
                    continue
                if have.startswith(BULK_MAGIC):
                    _sink(c, have)
                    break
                c.sendall(have)
                have = b""
        except OSError:
            pass
        c.close()


def rr(host: str, port: int, n: int, size: int, warmup: int) -> int:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    for _ in range(warmup):
        s.sendall(msg)
        _recv_exact(s, size)
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(n):
        t0 = clock()
        s.sendall(msg)
        _recv_exact(s, size)
        samples.append(clock() - t0)
    elapsed = (clock() - start) / 1e9
    s.close()
    mean = sum(samples) / n / 1000
    samples.sort()
    print(json.dumps({"mode": "rr", "n": n, "size": size, "median_us": _pct(samples, 50), "p99_us": _pct(samples, 99),
                      "mean_us": mean, "min_us": samples[0] / 1000, "elapsed_s": elapsed}))
    return 0


def _connect_close(host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def crr(host: str, port: int, n: int, warmup: int) -> int:
    for _ in range(warmup):
        _connect_close(host, port)
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(n):
        t0 = clock()
        _connect_close(host, port)
        samples.append(clock() - t0)
    elapsed = (clock() - start) / 1e9
    mean = sum(samples) / n / 1000
    samples.sort()
    print(json.dumps({"mode": "crr", "n": n, "rate_per_s": n / elapsed, "median_us": _pct(samples, 50),
                      "p99_us": _pct(samples, 99), "mean_us": mean, "elapsed_s": elapsed}))
    return 0


def crate(host: str, port: int, n: int, rate: float) -> int:
    clock = time.monotonic_ns
    start, late = clock(), 0
    for i in range(n):
        if rate > 0:
            due = start + int(i * 1e9 / rate)
            now = clock()
            if now < due:
                time.sleep((due - now) / 1e9)
            elif now - due > 1_000_000:
                late += 1
        _connect_close(host, port)
    elapsed = (clock() - start) / 1e9
    print(json.dumps({"mode": "crate", "n": n, "target_per_s": rate, "rate_per_s": n / elapsed, "late_1ms": late,
                      "elapsed_s": elapsed}))
    return 0


def bulk(host: str, port: int, total: int) -> int:
    s = socket.create_connection((host, port))
    chunk = b"b" * BULK_CHUNK
    start = time.perf_counter_ns()
    s.sendall(BULK_MAGIC + struct.pack("=Q", total))
    sent = 0
    while sent < total:
        n = min(BULK_CHUNK, total - sent)
        s.sendall(chunk[:n] if n < BULK_CHUNK else chunk)
        sent += n
    ack = struct.unpack("=Q", _recv_exact(s, 8))[0]
    elapsed = (time.perf_counter_ns() - start) / 1e9
    s.close()
    if ack != total:
        print(f"pyloadgen: server counted {ack} of {total} bytes", file=sys.stderr)
        return 1
    print(json.dumps({"mode": "bulk", "bytes": total, "mb_per_s": total / elapsed / 1e6, "elapsed_s": elapsed}))
    return 0


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "server":
            return serve(argv[1], int(argv[2]))
        if len(argv) == 6 and argv[0] == "rr":
            return rr(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]))
        if len(argv) == 5 and argv[0] == "crr":
            return crr(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        if len(argv) == 5 and argv[0] == "crate":
            return crate(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
        if len(argv) == 4 and argv[0] == "bulk":
            return bulk(argv[1], int(argv[2]), int(argv[3]))
    except OSError as e:
        print(f"pyloadgen: {e}", file=sys.stderr)
        return 1
    print("usage: pyloadgen.py server HOST PORT | rr HOST PORT N SIZE WARMUP | crr HOST PORT N WARMUP | "
          "crate HOST PORT N RATE | bulk HOST PORT BYTES", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
