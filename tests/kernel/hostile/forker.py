"""A workload that makes new processes and threads without exec, for tests/kernel/hostile/test_processes.py.

    forker.py --role R --port P --mode fork|fork-exec|thread|connect [--tries N]

Each connect to 127.0.0.1:P prints one JSON line {"who": ..., "ok": bool, "error": errno name or null}:
  fork       the parent connects, forks; the child (no exec) connects
  fork-exec  the parent connects, forks; the child execs `forker.py --role plain --mode connect`
  thread     a second thread connects after the main thread has ended (pthread_exit; the process lives on)
  connect    connect once (`who` is the role)
--tries: the first connect (parent, or connect) is tried up to N times, 0.1 s apart, until it succeeds (the agent
assigns an exec'd process its identity from the exec event, a few milliseconds after the exec).
--role only tags the command line, so a process selector can pick this process by it.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import socket
import sys
import threading
import time


def connect(who: str, port: int, tries: int = 1) -> None:
    for n in range(tries):
        err = None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3):
                pass
            break
        except OSError as e:
            err = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
        if n + 1 < tries:
            time.sleep(0.1)
    print(json.dumps({"who": who, "pid": os.getpid(), "ok": err is None, "error": err}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("fork", "fork-exec", "thread", "connect"), required=True)
    p.add_argument("--tries", type=int, default=1)
    a = p.parse_args()
    if a.mode == "connect":
        connect(a.role, a.port, a.tries)
        return
    if a.mode == "thread":
        leader = f"/proc/self/task/{os.getpid()}/stat"

        def worker() -> None:
            for _ in range(1000):   # until the main thread is gone (a zombie leader), at most ~10 s
                with open(leader) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
                time.sleep(0.01)
            connect("thread", a.port)
            os._exit(0)

        threading.Thread(target=worker).start()
        ctypes.CDLL(None).pthread_exit(None)   # ctypes drops the GIL: the worker runs on
    connect("parent", a.port, a.tries)
    pid = os.fork()
    if pid == 0:
        if a.mode == "fork-exec":
            os.execv(sys.executable, [sys.executable, __file__, "--role", "plain", "--port", str(a.port),
                                      "--mode", "connect"])
        connect("child", a.port)
        os._exit(0)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
