"""Byte-stream workloads for the fast-path tests. Each side prints one JSON line with digests of what it sent and
received, so a test compares streams end to end.

    server --host H --port P [--connections N] [--reply BYTES] [--exit-after BYTES]
        per connection: read to EOF (digesting), then send BYTES of seeded data, then close.
        --exit-after: the process dies (os._exit) once it has read that many bytes: a peer exiting mid-stream.
    client --host H --port P --bytes N [--connections C] [--parallel]
        per connection: send N seeded bytes, shut down writing (half-close), read to EOF.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import threading


def stream(seed: int, n: int, chunk: int = 65536):
    rng = random.Random(seed)
    left = n
    while left > 0:
        k = min(chunk, left)
        yield rng.randbytes(k)
        left -= k


def digest(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for b in stream(seed, n):
        h.update(b)
    return h.hexdigest()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(a) -> None:
    s = socket.socket(_family(a.host))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.host, a.port))
    s.listen(256)
    s.settimeout(60)
    print(json.dumps({"listening": a.port}), flush=True)
    results = []
    lock = threading.Lock()

    def handle(c: socket.socket) -> None:
        h, got = hashlib.sha256(), 0
        while True:
            d = c.recv(65536)
            if not d:
                break
            h.update(d)
            got += len(d)
            if a.exit_after and got >= a.exit_after:
                os._exit(3)
        for b in stream(7, a.reply):
            c.sendall(b)
        c.close()
        with lock:
            results.append({"received": got, "sha256": h.hexdigest()})

    threads = []
    for _ in range(a.connections):
        c, _ = s.accept()
        t = threading.Thread(target=handle, args=(c,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print(json.dumps({"connections": results}), flush=True)


def client(a) -> None:
    out = []

    def one(i: int) -> None:
        res: dict = {"i": i}
        try:
            s = socket.create_connection((a.host, a.port), timeout=60)
            res["peer"] = list(s.getpeername()[:2])
            try:
                for b in stream(1000 + i, a.bytes):
                    s.sendall(b)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                res["send_error"] = type(e).__name__
            h, got = hashlib.sha256(), 0
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    h.update(d)
                    got += len(d)
            except OSError as e:
                res["recv_error"] = type(e).__name__
            s.close()
            res.update(received=got, sha256=h.hexdigest(), sent_sha256=digest(1000 + i, a.bytes))
        except OSError as e:
            res["connect_error"] = type(e).__name__
        out.append(res)

    if a.parallel:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(a.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(a.connections):
            one(i)
    print(json.dumps({"connections": sorted(out, key=lambda r: r["i"])}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--reply", type=int, default=0)
    p.add_argument("--exit-after", type=int, default=0)
    p.add_argument("--parallel", action="store_true")
    a = p.parse_args()
    (serve if a.role == "server" else client)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
