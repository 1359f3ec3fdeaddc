"""Pure matching of local workloads to identities: the first identity (in config order) whose selector matches."""
from __future__ import annotations

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


def process_match(exe: str, cmdline: str, identities: Sequence[Identity],
                  uids: Optional[tuple[int, int]] = None) -> Optional[str]:
    """uids: the process's (real, effective) uid; a selector with uids: matches only when both are listed."""
    for ident in identities:
        for sel in ident.select.processes:
            if sel.uids is not None and (uids is None or not all(u in sel.uids for u in uids)):
                continue
            if sel.exe is not None and not fnmatchcase(exe, sel.exe):
                continue
            if sel.cmdline is not None and not fnmatchcase(cmdline, sel.cmdline):
                continue
            return ident.name
    return None
