"""cgroup v2: where it is mounted, and the cgroups below a root with their ids (id = the directory's inode)."""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

from agent.errors import AgentError


def cgroup2_mount_from(mounts_text: str) -> Optional[Path]:
    """The first cgroup2 mount point in a /proc/mounts text (octal escapes decoded)."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1].encode().decode("unicode_escape"))
    return None


def cgroup2_mount() -> Path:
    try:
        text = Path("/proc/mounts").read_text()
    except OSError as e:
        raise AgentError(f"cannot read /proc/mounts: {e.strerror}") from None
    mount = cgroup2_mount_from(text)
    if mount is None:
        raise AgentError("cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts); aimesh needs the unified hierarchy")
    return mount


def cgroup_id(path: Path) -> int:
    return os.stat(path).st_ino


def relative(mount: Path, path: Path) -> str:
    rel = "/" + str(Path(path).relative_to(mount)).strip(".")
    return "/" if rel in ("/", "/.") else rel.rstrip("/")


def walk(mount: Path, root: Path) -> Iterator[tuple[str, int]]:
    """(path relative to mount, cgroup id) for root and every cgroup below it."""
    for dirpath, dirnames, _ in os.walk(root):
        try:
            yield relative(mount, Path(dirpath)), cgroup_id(Path(dirpath))
        except FileNotFoundError:
            dirnames[:] = []  # removed while walking


def member_pids(path: Path) -> list[int]:
    """The processes in one cgroup (not its descendants)."""
    try:
        text = (path / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split() if x.isdigit()]


def kill_members(path: Path) -> None:
    """SIGKILL whatever is still in one of our cgroups: `cgroup.kill` where the kernel has it (5.14+), else each pid."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1")
            return
        except OSError:
            pass
    for pid in member_pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_cgroup(path: Path, timeout_s: float) -> str | None:
    """rmdir one of our cgroups, SIGKILLing what is still inside; None when gone, else why not.

    An aimesh datapath pinned for this cgroup (an agent governed it) is uninstalled first: its links and maps would
    otherwise stay pinned in bpffs after the cgroup is gone."""
    deadline = time.monotonic() + timeout_s
    uninstall_datapath(path)
    while True:
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                return f"{path}: {e.strerror} (still in it: {member_pids(path) or 'nothing'})"
        if member_pids(path):
            kill_members(path)
        time.sleep(0.05)


def uninstall_datapath(path: Path) -> list[str]:
    """Remove the aimesh datapath pinned for the cgroup at path, if any; returns what was removed."""
    from agent.kernel.install import uninstall
    from agent.kernel.pins import DatapathDir
    try:
        d = DatapathDir.for_root(cgroup_id(path))
    except OSError:
        return []
    return uninstall(d, path) if d.path.exists() else []
