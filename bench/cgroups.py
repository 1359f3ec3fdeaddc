"""The benchmark's private cgroup v2 subtree: `<mount>/aimesh-bench-<pid>/<group>/{client,server}`.

Only directories this module created are ever emptied or removed (children first); processes are only killed when
they sit inside one of them. mkdir never reuses an existing directory.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("client", "server")


class CgroupError(RuntimeError):
    pass


@dataclass
class BenchTree:
    """`root` under `mount`, and every directory made below it, in creation order."""
    mount: Path
    root: Path
    made: list[Path] = field(default_factory=list)

    def group(self, name: str) -> Path:
        return self.root / name

    def leaf(self, group: str, role: str) -> Path:
        return self.root / group / role

    def relative(self, path: Path) -> str:
        """A cgroup path as the agent's selectors see it: relative to the mount, leading '/'."""
        return "/" + path.relative_to(self.mount).as_posix()


def _mkdir(tree: BenchTree, path: Path) -> None:
    try:
        path.mkdir(mode=0o755)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
    tree.made.append(path)


def create_tree(mount: Path, name: str, groups: list[str]) -> BenchTree:
    """mkdir `<mount>/<name>/<group>/{client,server}` for every group. On failure, removes what it made."""
    tree = BenchTree(mount=mount, root=mount / name)
    try:
        _mkdir(tree, tree.root)
        for g in groups:
            _mkdir(tree, tree.group(g))
            for role in ROLES:
                _mkdir(tree, tree.leaf(g, role))
    except CgroupError:
        remove_tree(tree)
        raise
    return tree


def member_pids(path: Path) -> list[int]:
    try:
        text = (path / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split() if x.isdigit()]


def _rmdir(path: Path, timeout_s: float) -> str | None:
    """rmdir one of our cgroups, SIGKILLing (by pid) what is still inside; None when gone, else why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                return f"{path}: {e.strerror} (still in it: {member_pids(path) or 'nothing'})"
        for pid in member_pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_tree(tree: BenchTree, timeout_s: float = 5.0) -> list[str]:
    """Remove every directory we made, deepest first; returns the problems (empty when all went)."""
    problems = [p for p in (_rmdir(path, timeout_s) for path in reversed(tree.made)) if p]
    tree.made.clear()
    return problems
