"""Pure matching of local workloads to identities: the first identity (in config order) whose selector matches."""
from __future__ import annotations

import os
from fnmatch import fnmatchcase
from typing import Optional, Sequence

from agent.config import Identity


def cgroup_match(path: str, identities: Sequence[Identity]) -> Optional[str]:
    """path is relative to the cgroup2 mount and starts with '/'; globs' '*' also crosses '/'."""
    for ident in identities:
        for glob in ident.select.cgroups:
            if fnmatchcase(path, glob):
                return ident.name
    return None


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _literal_prefix(glob: str) -> str:
    for i, c in enumerate(glob):
        if c in "*?[":
            return glob[:i]
    return glob


def _may_match_below(path: str, glob: str) -> bool:
    """Whether glob can match some cgroup below path (conservative: True when it cannot be ruled out)."""
    below = path.rstrip("/") + "/"
    if not is_glob(glob):
        return glob.startswith(below)
    lit = _literal_prefix(glob)
    return lit.startswith(below) or below.startswith(lit)


def _matches_all_below(path: str, glob: str) -> bool:
    """Whether glob matches every cgroup below path: it is H* with H matching a prefix of path/ (fnmatch's * crosses
    '/', so it takes the rest, whatever the child is named)."""
    if not glob.endswith("*"):
        return False
    below = path.rstrip("/") + "/"
    return any(fnmatchcase(below[:i], glob[:-1]) for i in range(len(below) + 1))


def descendants_identity(path: str, identities: Sequence[Identity]) -> Optional[str]:
    """The identity cgroup_match gives every cgroup below path, whatever its name, or None when that is not certain.
    The kernel judges a cgroup the agent has not classified yet by this (cgroup_inherit), so it must never name an
    identity some descendant would not get: an earlier identity that might match below path rules it out."""
    for ident in identities:
        if any(_matches_all_below(path, g) for g in ident.select.cgroups):
            return ident.name
        if any(_may_match_below(path, g) for g in ident.select.cgroups):
            return None
    return None


def file_id(path: str) -> Optional[tuple[int, int]]:
    """(st_dev, st_ino) of the file a path names now (symlinks followed), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def process_match(exe: str, cmdline: str, identities: Sequence[Identity],
                  uids: Optional[tuple[int, int]] = None,
                  exe_id: Optional[tuple[int, int]] = None) -> Optional[str]:
    """uids: the process's (real, effective) uid; a selector with uids: matches only when both are listed.
    exe_id: (dev, ino) of the process's executable (os.stat of /proc/PID/exe). An exe without glob characters names
    one file: it matches by that file's (dev, ino) as the path resolves now (a symlink to it matches; a copy, a bind
    mount over the path in another mount namespace, or the old file after a replacement does not); a glob matches the
    path /proc shows."""
    for ident in identities:
        for sel in ident.select.processes:
            if sel.uids is not None and (uids is None or not all(u in sel.uids for u in uids)):
                continue
            if sel.exe is not None:
                if is_glob(sel.exe):
                    if not fnmatchcase(exe, sel.exe):
                        continue
                elif exe_id is None or file_id(sel.exe) != exe_id:
                    continue
            if sel.cmdline is not None and not fnmatchcase(cmdline, sel.cmdline):
                continue
            return ident.name
    return None
