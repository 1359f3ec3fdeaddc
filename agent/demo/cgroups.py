"""The demo's cgroup v2 subtree: find the cgroup2 mount, make `<mount>/aimesh-demo-<pid>/<child>`, empty and remove it.

Only paths this module created are ever removed, children first; processes are only killed inside those cgroups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.identity.cgroups import cgroup2_mount_from, remove_cgroup


class CgroupError(RuntimeError):
    pass


def find_cgroup2_mount(mounts_text: str) -> str | None:
    """The mount point of the first cgroup2 filesystem in a /proc/mounts text, or None."""
    mount = cgroup2_mount_from(mounts_text)
    return None if mount is None else str(mount)


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


def remove_tree(tree: CgroupTree, timeout_s: float = 5.0) -> list[str]:
    """Remove the children, then the root; returns the problems (empty when all went)."""
    problems = [p for p in (remove_cgroup(path, timeout_s) for path in reversed(list(tree.children.values()))) if p]
    tree.children.clear()
    root_problem = remove_cgroup(tree.root, timeout_s)
    if root_problem:
        problems.append(root_problem)
    return problems
