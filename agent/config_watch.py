"""Noticing that the agent's config file changed, so the daemon re-reads it as on SIGHUP (a bad one is rejected and
the policy in force stays).

kubelet updates a ConfigMap volume by writing a new `..<timestamp>` directory and renaming a symlink onto `..data`:
every file changes at once and is never seen half-written, so a kubelet-mounted config is watched by default.
"""
from __future__ import annotations

import os
from pathlib import Path


def kubelet_mounted(path: Path) -> bool:
    """Is path a file of a kubelet-mounted ConfigMap or Secret volume (its directory has the `..data` symlink)?"""
    return (path.parent / "..data").is_symlink()


class ConfigWatch:
    """Notices that the config file changed, by polling (one stat per call, no inotify, no dependency).

    The signature is the resolved path (kubelet's `..data` swap changes it, even for identical bytes) and the file's
    device, inode, size and mtime (an editor's rename or an in-place write changes one of them). A file that is
    missing for a moment (mid-swap, or removed) is no change: the policy in force stays and the next call looks again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._signature()

    def _signature(self) -> tuple[str, int, int, int, int] | None:
        try:
            real = os.path.realpath(self.path)
            st = os.stat(real)
        except OSError:
            return None
        return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def changed(self) -> bool:
        """True once per change since the last call (or the last seen_now())."""
        sig = self._signature()
        if sig is None or sig == self._seen:
            return False
        self._seen = sig
        return True

    def seen_now(self) -> None:
        """The file as it is now is the one being loaded (a SIGHUP reload): no second reload for it."""
        self._seen = self._signature() or self._seen
