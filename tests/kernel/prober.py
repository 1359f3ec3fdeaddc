"""A client that connects in a tight loop for a while and reports every change of outcome.

    prober.py --host H --port P --duration S [--timeout T]
prints one JSON line: {"counts": {outcome: n}, "changes": [[t_ns, outcome], ...], "first_ns": t, "last_ns": t}
where outcome is "ok" (connected and read the server's answer) or the errno name; t_ns is CLOCK_MONOTONIC.
Used to check that no connection is wrongly allowed or denied at any instant of an agent restart.
"""
from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import time
from collections import Counter


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=0, help="connections per second at most (0: as fast as it can)")
    a = p.parse_args(argv)
    fam = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    counts: Counter[str] = Counter()
    changes: list[list] = []
    last = None
    first_ns = time.monotonic_ns()
    end = time.monotonic() + a.duration
    print(json.dumps({"started": first_ns}), flush=True)
    gap = 1.0 / a.rate if a.rate else 0.0
    nxt = time.monotonic()
    while time.monotonic() < end:
        if gap:
            nxt += gap
            pause = nxt - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        t = time.monotonic_ns()
        try:
            s.connect((a.host, a.port))
            s.recv(64)
            outcome = "ok"
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, "timeout" if isinstance(e, socket.timeout) else "error")
        finally:
            s.close()
        counts[outcome] += 1
        if outcome != last:
            changes.append([t, outcome])
            last = outcome
    print(json.dumps({"counts": dict(counts), "changes": changes, "first_ns": first_ns,
                      "last_ns": time.monotonic_ns()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
