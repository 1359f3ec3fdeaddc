"""Tiny real workloads the kernel tests run inside cgroups. Each prints one JSON line and exits.

    server  --port P [--host H] [--udp] [--name N] [--count K] [--timeout S] [--reuseport]
        answers each TCP connection (or UDP datagram) with N, K times, then exits.
    client  --host H --port P [--udp] [--count K] [--timeout S] [--bind H]
        connects K times; prints {"ok": n, "errors": {errno_name: n}, "peers": [...], "answers": {...}}.
"""
from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
from collections import Counter


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _sockaddr(host: str, port: int, fam: int) -> tuple:
    """(host, port) for the socket calls; with a zone id (fe80::1%eth0) the 4-tuple that carries its scope id
    (a 2-tuple drops it)."""
    if "%" not in host:
        return (host, port)
    return socket.getaddrinfo(host, port, fam, 0, 0, socket.AI_NUMERICHOST)[0][4]


def server(a) -> None:
    fam = _family(a.host)
    kind = socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if a.reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(_sockaddr(a.host, a.port, fam))
    if not a.udp:
        s.listen(128)
    s.settimeout(a.timeout)
    print(json.dumps({"listening": s.getsockname()[1]}), flush=True)
    served = 0
    try:
        while a.count <= 0 or served < a.count:
            if a.udp:
                data, peer = s.recvfrom(2048)
                s.sendto(a.name.encode(), peer)
            else:
                c, _ = s.accept()
                c.sendall(a.name.encode())
                c.close()
            served += 1
    except socket.timeout:
        pass
    print(json.dumps({"served": served}), flush=True)


def client(a) -> None:
    fam = _family(a.host)
    ok, errors, peers, answers = 0, Counter(), [], Counter()
    for _ in range(a.count):
        kind = socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM
        s = socket.socket(fam, kind)
        s.settimeout(a.timeout)
        try:
            if a.bind:
                s.bind((a.bind, 0))
            if a.udp:
                s.sendto(b"ping", _sockaddr(a.host, a.port, fam))
                data, peer = s.recvfrom(2048)
            else:
                s.connect(_sockaddr(a.host, a.port, fam))
                peer = s.getpeername()
                data = s.recv(2048)
            ok += 1
            peers.append(list(peer[:2]))
            answers[data.decode()] += 1
        except OSError as e:
            name = errno.errorcode.get(e.errno, "timeout" if isinstance(e, socket.timeout) else str(e))
            errors[name] += 1
        finally:
            s.close()
    print(json.dumps({"ok": ok, "errors": dict(errors), "peers": peers[:5], "answers": dict(answers)}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--name", default="server")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--bind", default=None)
    p.add_argument("--reuseport", action="store_true")
    a = p.parse_args(argv)
    (server if a.role == "server" else client)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
