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
