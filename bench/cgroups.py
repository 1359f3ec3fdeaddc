"""The benchmark's private cgroup v2 subtree: `<mount>/aimesh-bench-<pid>/<section>/<group>/{client,server}` and
the extra directories a section asks for (a proxy's leaf, thousands of empty watched cgroups, workload cgroups).

Only directories this module created are ever emptied or removed (children first); processes are only killed when
they sit inside one of them. mkdir never reuses an existing directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.identity.cgroups import remove_cgroup

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
    """mkdir `<mount>/<name>/<group>/{client,server}` for every group (a group may be nested: "paths/none").
    On failure, removes what it made."""
    tree = BenchTree(mount=mount, root=mount / name)
    try:
        _mkdir(tree, tree.root)
        add_groups(tree, groups)
    except CgroupError:
        remove_tree(tree)
        raise
    return tree


def add_groups(tree: BenchTree, groups: list[str]) -> None:
    """mkdir `<root>/<group>/{client,server}` for every group, and the group's parents that do not exist yet."""
    for g in groups:
        parts = Path(g).parts
        for i in range(1, len(parts) + 1):
            d = tree.root.joinpath(*parts[:i])
            if d not in tree.made:
                _mkdir(tree, d)
        for role in ROLES:
            _mkdir(tree, tree.leaf(g, role))


def add_dir(tree: BenchTree, path: Path) -> Path:
    """mkdir one directory below a directory this tree made."""
    _mkdir(tree, path)
    return path


def add_many(tree: BenchTree, parent: Path, names: list[str], chunk: int = 250, pause_s: float = 0.1) -> list[Path]:
    """mkdir parent/<name> for every name, `chunk` at a time with a pause between chunks: every agent on the host
    (other tenants' too) is told of each new cgroup through its ring buffer, and a burst of thousands could overflow
    theirs."""
    out = []
    for i, name in enumerate(names):
        if i and i % chunk == 0:
            time.sleep(pause_s)
        out.append(add_dir(tree, parent / name))
    return out


def remove_tree(tree: BenchTree, timeout_s: float = 5.0) -> list[str]:
    """Remove every directory we made, deepest first; returns the problems (empty when all went)."""
    problems = [p for p in (remove_cgroup(path, timeout_s) for path in reversed(tree.made)) if p]
    tree.made.clear()
    return problems


def remove_below(tree: BenchTree, top: Path, timeout_s: float = 5.0) -> list[str]:
    """Remove `top` and every directory we made below it, deepest first (a section's cgroups, when it ends)."""
    mine = [p for p in tree.made if p == top or top in p.parents]
    problems = [p for p in (remove_cgroup(path, timeout_s) for path in reversed(mine)) if p]
    gone = set(mine)
    tree.made[:] = [p for p in tree.made if p not in gone]
    return problems
