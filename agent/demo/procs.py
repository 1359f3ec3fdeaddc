"""Child processes of the demo: start one (optionally inside a cgroup), follow its output file, stop it by pid.

Children run in their own session (a terminal's Ctrl-C reaches the demo only, which then stops them in order) and get
SIGTERM from the kernel if the demo itself dies (PR_SET_PDEATHSIG), so nothing outlives it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

PR_SET_PDEATHSIG = 1


class SpawnError(RuntimeError):
    pass


def split_lines(pending: bytes, data: bytes) -> tuple[list[str], bytes]:
    """Complete lines of `pending + data` (decoded, without line ends) and the unfinished rest."""
    *lines, rest = (pending + data).split(b"\n")
    return [line.decode("utf-8", "replace").rstrip("\r") for line in lines], rest


@dataclass
class FileTail:
    """The new complete lines of a file that another process appends to (it may not exist yet)."""

    path: Path
    offset: int = 0
    pending: bytes = b""

    def skip_existing(self) -> None:
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0

    def read_lines(self, max_bytes: int = 1 << 20) -> list[str]:
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:          # truncated or replaced: start over
                    self.offset, self.pending = 0, b""
                f.seek(self.offset)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines, self.pending = split_lines(self.pending, data)
        return lines


def _libc_prctl() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def _child_setup(procs_file: str | None, parent_pid: int, prctl: Callable[[int, int], int] | None) -> Callable[[], None]:
    """The preexec_fn: join the cgroup (so the child is in it before it execs) and die with the demo.

    Runs between fork and exec: raw syscalls only, no imports, no locks.
    """
    def setup() -> None:
        if procs_file is not None:
            fd = os.open(procs_file, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:     # the demo died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


@dataclass
class Child:
    """A process the demo started, its output file and the last line it wrote."""

    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: FileTail
    cgroup: str = ""                 # child cgroup name in the demo subtree, '' when not in one
    last_line: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def state(self) -> str:
        rc = self.popen.poll()
        if rc is None:
            return "running"
        if rc < 0:
            try:
                return f"killed {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed {-rc}"
        return f"exited {rc}"


@dataclass
class Spawner:
    """Starts children with a common working directory and environment."""

    cwd: Path
    env: Mapping[str, str]
    prctl: Callable[[int, int], int] | None = field(default_factory=_libc_prctl)

    def start(self, name: str, role: str, argv: Sequence[str], log_path: Path,
              procs_file: Path | None = None, cgroup: str = "") -> Child:
        """Start `argv` with stdout+stderr to `log_path`; inside the cgroup whose `cgroup.procs` is `procs_file`."""
        setup = _child_setup(str(procs_file) if procs_file else None, os.getpid(), self.prctl)
        with log_path.open("wb") as out:
            try:
                popen = subprocess.Popen(
                    list(argv), cwd=self.cwd, env=dict(self.env), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=setup, close_fds=True,
                )
            except subprocess.SubprocessError as e:
                where = f" in cgroup {procs_file.parent}" if procs_file else ""
                raise SpawnError(f"cannot start {name}{where}: {e}") from None
            except OSError as e:
                raise SpawnError(f"cannot start {name}: {e.strerror}") from None
        return Child(name=name, role=role, popen=popen, log=FileTail(log_path), cgroup=cgroup)


def stop_children(children: Sequence[Child], grace_s: float) -> list[str]:
    """SIGTERM each running child (by pid), SIGKILL what is left after `grace_s`, reap all. Returns what was killed."""
    for child in children:
        if child.running():
            try:
                child.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    killed: list[str] = []
    for child in children:
        try:
            child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.popen.kill()
            killed.append(f"{child.name} (pid {child.pid})")
            child.popen.wait()
    return killed
