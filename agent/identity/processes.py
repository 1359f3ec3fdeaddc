"""Processes from /proc: their executable path and command line, for process selectors."""
from __future__ import annotations

import os
from typing import Iterator, Optional


def read_process(pid: int) -> Optional[tuple[str, str, tuple[int, int], tuple[int, int]]]:
    """(exe, cmdline joined by spaces, (real uid, effective uid), (dev, ino) of the executable), or None when the
    process is gone or not readable. /proc/PID/exe is a magic link: stat follows it to the file the process runs,
    even renamed, deleted or reached through a path another mount namespace sees."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        st = os.stat(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/status") as f:
            uid = next(line.split()[1:3] for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return None
    return exe, cmdline, (int(uid[0]), int(uid[1])), (st.st_dev, st.st_ino)


def all_pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)
