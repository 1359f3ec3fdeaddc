"""cgroup v2: where it is mounted, and the cgroups below a root with their ids (id = the directory's inode)."""
from __future__ import annotations

import os
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
