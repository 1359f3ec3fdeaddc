"""The flow log: one JSON object per line, to a file (appended) or stdout ('-').

Flow records name workloads, peers and byte counts, so a log file is private to the agent's user: created 0600
whatever the umask, and an existing regular file readable by group or others is narrowed to 0600 (with a warning).
A directory created for it is 0700. Devices, FIFOs and sockets (`/dev/stderr`, a pipe to a shipper) are written
as they are, never chmod'ed. The last path component must not be a symlink (a root process appending to a link
someone else planted writes wherever it points).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Optional, TextIO

from agent.errors import AgentError

log = logging.getLogger("aimesh.flowlog")

FILE_MODE = 0o600
DIR_MODE = 0o700


def open_private(path: Path, what: str) -> TextIO:
    """Open `path` for appending, line-buffered, as a file only its owner can read. Raises AgentError."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            path.parent.chmod(DIR_MODE)   # umask-independent
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        reason = "it is a symlink" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise AgentError(f"{what} {path}: cannot open for writing ({reason})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != FILE_MODE:
            if stat.S_IMODE(st.st_mode) & 0o077:
                log.warning("%s %s had mode %04o: narrowed to %04o (flow records name workloads and peers)",
                            what, path, stat.S_IMODE(st.st_mode), FILE_MODE)
            os.fchmod(fd, FILE_MODE)   # also undoes a umask that took the owner's own bits
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    except OSError as e:
        os.close(fd)
        raise AgentError(f"{what} {path}: cannot make it private ({e.strerror or e})") from None


class FlowLog:
    def __init__(self, target: Optional[str], what: str = "flow log") -> None:
        self._out: Optional[TextIO]
        if target is None:
            self._out = None
        elif target == "-":
            self._out = sys.stdout
        else:
            self._out = open_private(Path(target), what)
        self.written = 0

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def write(self, record: dict) -> None:
        if self._out is None:
            return
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.written += 1

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out not in (None, sys.stdout):
            self._out.close()
