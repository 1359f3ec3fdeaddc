"""What is pinned and in force, and removing it: `aimesh status` and `aimesh uninstall`. No bcc."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from agent.kernel import bpfsys, registry, uprobes
from agent.kernel.pins import DatapathDir, PinError, agent_attached, read_manifest, remove_tree

_ATTACH_NAMES = {p.attach_type: p.link for p in registry.CGROUP_PROGRAMS}


@dataclass
class LinkStatus:
    name: str
    link_id: int
    prog_id: int
    prog_name: str
    target: str          # "cgroup <id> <attach>" or "tracepoint"


@dataclass
class DatapathStatus:
    path: Path
    manifest: Optional[dict[str, Any]]
    agent_attached: bool
    links: list[LinkStatus] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    builds: list[str] = field(default_factory=list)
    error: str = ""


def status(d: DatapathDir) -> DatapathStatus:
    st = DatapathStatus(d.path, None, agent_attached(d))
    try:
        st.manifest = read_manifest(d)
    except PinError as e:
        st.error = str(e)
    if d.links.is_dir():
        for p in sorted(d.links.iterdir()):
            try:
                fd = bpfsys.obj_get(str(p))
            except bpfsys.BpfError as e:
                st.links.append(LinkStatus(p.name, 0, 0, f"unreadable: {e.strerror}", ""))
                continue
            try:
                li = bpfsys.link_info(fd)
                name = ""
                try:
                    pfd = bpfsys.prog_fd_by_id(li.prog_id)
                    name = bpfsys.prog_info(pfd).name
                    os.close(pfd)
                except bpfsys.BpfError:
                    pass
                target = (f"cgroup {li.cgroup_id} {_ATTACH_NAMES.get(li.attach_type, li.attach_type)}"
                          if li.type == bpfsys.LINK_TYPE_CGROUP else
                          "raw tracepoint" if li.type == bpfsys.LINK_TYPE_RAW_TRACEPOINT else
                          "uprobe" if p.name.startswith(uprobes.LINK_PREFIX) else "tracepoint")
                st.links.append(LinkStatus(p.name, li.id, li.prog_id, name, target))
            finally:
                os.close(fd)
    st.maps = sorted(p.name for p in d.maps.iterdir()) if d.maps.is_dir() else []
    st.builds = sorted(p.name for p in d.progs.iterdir()) if d.progs.is_dir() else []
    return st


def uninstall(d: DatapathDir, root: Optional[Path] = None) -> list[str]:
    """Detach and unpin exactly what aimesh pinned in d (unpinning a link detaches it: the TLS uprobe links under
    links/ too), then detach aimesh programs
    attached to root outside any link (left by an agent from before pinning). Returns what was removed."""
    removed: list[str] = []
    # links first: enforcement ends the moment the last link goes, maps after
    if d.links.is_dir():
        for p in sorted(d.links.iterdir()):
            os.unlink(p)
            removed.append(str(p))
    removed += remove_tree(d.path)
    if root is not None and root.is_dir():
        from agent.kernel.datapath import detach_orphans
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            removed += [f"{root}: {name}" for name in detach_orphans(root, fd, set())]
        finally:
            os.close(fd)
    base = d.path.parent
    try:
        base.rmdir()   # the aimesh directory itself, once the last datapath is gone
    except OSError:
        pass
    return removed
