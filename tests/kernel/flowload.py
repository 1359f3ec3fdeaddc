"""Workloads with known byte counts for the flow-record tests. Prints one JSON line.

    serve  --port P --reply N [--hold S]        accept one connection, read to EOF, send N bytes, close
    send   --port P --bytes N [--hold S]        connect, send N bytes (streamed over S seconds if given), shut
                                                down writing, read to EOF
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def serve(a) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", a.port))
    s.listen(16)
    s.settimeout(30)
    print(json.dumps({"listening": a.port}), flush=True)
    for _ in range(a.connections):
        c, _ = s.accept()
        got = 0
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += len(d)
        c.sendall(b"r" * a.reply)
        c.close()
    print(json.dumps({"received": got}), flush=True)


def send(a) -> None:
    s = socket.create_connection(("127.0.0.1", a.port), timeout=30)
    if a.hold <= 0:
        s.sendall(b"s" * a.bytes)
    else:  # stream: the bytes in 20 equal chunks spread over `hold` seconds
        chunk = a.bytes // 20
        for i in range(20):
            s.sendall(b"s" * (chunk if i < 19 else a.bytes - 19 * chunk))
            time.sleep(a.hold / 20)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += len(d)
    s.close()
    print(json.dumps({"received": got, "local_port": None}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["serve", "send"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--reply", type=int, default=0)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--hold", type=float, default=0)
    p.add_argument("--connections", type=int, default=1)
    a = p.parse_args()
    (serve if a.role == "serve" else send)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
