"""The demo's cgroup v2 subtree: find the cgroup2 mount, make `<mount>/aimesh-demo-<pid>/<child>`, empty and remove it.

Only paths this module created are ever removed, children first; processes are only killed inside those cgroups.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path


class CgroupError(RuntimeError):
    pass


def _unescape_mount_field(text: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as three octal digits (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def find_cgroup2_mount(mounts_text: str) -> str | None:
    """The mount point of the first cgroup2 filesystem in a /proc/mounts text, or None."""
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return _unescape_mount_field(fields[1])
    return None


def relative_path(mount: Path, path: Path) -> str:
    """A cgroup's path as the agent's globs see it: relative to the mount, with a leading `/`."""
    return "/" if path == mount else "/" + path.relative_to(mount).as_posix()


@dataclass
class CgroupTree:
    """The demo subtree: `root` under `mount`, and the children made in it (name -> path)."""

    mount: Path
    root: Path
    children: dict[str, Path] = field(default_factory=dict)

    def procs_file(self, child: str) -> Path:
        return self.children[child] / "cgroup.procs"

    def relative(self, child: str | None = None) -> str:
        return relative_path(self.mount, self.root if child is None else self.children[child])


def create_tree(mount: Path, name: str, children: list[str]) -> CgroupTree:
    """mkdir `<mount>/<name>` (which must not exist) and its children. On failure, removes what it made."""
    root = mount / name
    try:
        root.mkdir(mode=0o755)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {root}: {e.strerror}") from None
    tree = CgroupTree(mount=mount, root=root)
    try:
        for child in children:
            path = root / child
            path.mkdir(mode=0o755)
            tree.children[child] = path
    except OSError as e:
        remove_tree(tree)
        raise CgroupError(f"cannot create cgroup {root / child}: {e.strerror}") from None
    return tree


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


def _rmdir(path: Path, timeout_s: float) -> str | None:
    """rmdir a cgroup, emptying it first; None when gone, else why not."""
    deadline = time.monotonic() + timeout_s
    killed = False
    while True:
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                return f"{path}: {e.strerror} (still in it: {member_pids(path) or 'nothing'})"
            if not killed and member_pids(path):
                kill_members(path)
                killed = True
            time.sleep(0.05)


def remove_tree(tree: CgroupTree, timeout_s: float = 5.0) -> list[str]:
    """Remove the children, then the root; returns the problems (empty when all went)."""
    problems = [p for p in (_rmdir(path, timeout_s) for path in reversed(list(tree.children.values()))) if p]
    tree.children.clear()
    root_problem = _rmdir(tree.root, timeout_s)
    if root_problem:
        problems.append(root_problem)
    return problems
