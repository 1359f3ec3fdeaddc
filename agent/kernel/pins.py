"""Where a datapath lives in bpffs, and its manifest.

One directory per governed cgroup root, named by the root's cgroup id:

    /sys/fs/bpf/aimesh/<root cgroup id>/
        state                 array map: the manifest (JSON), so it lives and dies with the pinned objects
        maps/<name>-<digest>  every map (registry.py); the digest is the map's layout
        progs/<digest>/<fn>   the loaded programs of one build (the loader pins them; links point at them)
        links/<name>          one bpf link per attachment (cgroup hooks, tracepoints); sk_msg is held by its sockhash

An agent holds an exclusive flock on the directory while it runs: a second agent on the same root is refused, and
`aimesh status` tells whether an agent is attached.
"""
from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from agent.kernel import bpfsys

BPFFS = Path("/sys/fs/bpf")
BASE = BPFFS / "aimesh"
FORMAT = 1                   # manifest format; a higher one on disk is from a future aimesh: refuse to touch it
STATE_CHUNK = 4096
STATE_CHUNKS = 64            # 256 KiB of manifest


class PinError(Exception):
    pass


@dataclass(frozen=True)
class DatapathDir:
    path: Path

    @classmethod
    def for_root(cls, root_cgroup_id: int, base: Path = BASE) -> "DatapathDir":
        return cls(base / str(root_cgroup_id))

    @property
    def maps(self) -> Path:
        return self.path / "maps"

    @property
    def progs(self) -> Path:
        return self.path / "progs"

    @property
    def links(self) -> Path:
        return self.path / "links"

    @property
    def state(self) -> Path:
        return self.path / "state"

    def exists(self) -> bool:
        return self.state.exists()

    def make(self) -> None:
        for d in (self.path, self.maps, self.progs, self.links):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


class _Chunk(ct.Structure):
    _fields_ = [("data", ct.c_char * STATE_CHUNK)]


def read_manifest(d: DatapathDir) -> Optional[dict[str, Any]]:
    """The manifest, or None when nothing is pinned there. Raises PinError when it cannot be read."""
    try:
        fd = bpfsys.obj_get(str(d.state))
    except bpfsys.BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise PinError(f"{d.state}: {e}") from None
    try:
        raw = bytearray()
        need = 8
        i = 0
        while len(raw) < need:
            if i >= STATE_CHUNKS:
                raise PinError(f"{d.state}: the manifest length {need - 8} exceeds the state map")
            c = _Chunk()
            if not bpfsys.map_lookup(fd, ct.c_uint32(i), c):
                raise PinError(f"{d.state}: cannot read entry {i}")
            raw += bytes(c)
            if i == 0:
                need = 8 + int.from_bytes(raw[:8], "little")
                if need == 8:
                    return None
            i += 1
        try:
            return json.loads(bytes(raw[8:need]))
        except ValueError as e:
            raise PinError(f"{d.state}: the manifest is not valid JSON ({e}); `aimesh uninstall` removes this datapath") from None
    finally:
        os.close(fd)


def write_manifest(d: DatapathDir, manifest: dict[str, Any]) -> None:
    """Write the manifest into the state map (created and pinned on first use)."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    blob = len(body).to_bytes(8, "little") + body
    if len(blob) > STATE_CHUNK * STATE_CHUNKS:
        raise PinError(f"manifest of {len(blob)} bytes exceeds the state map ({STATE_CHUNK * STATE_CHUNKS} bytes)")
    try:
        fd = bpfsys.obj_get(str(d.state))
    except bpfsys.BpfError:
        fd = bpfsys.map_create_array("aimesh_state", STATE_CHUNK, STATE_CHUNKS)
        bpfsys.obj_pin(fd, str(d.state))
    try:
        # Tail chunks first, the length word (chunk 0) last: a reader never sees a length longer than what is written.
        chunks = [blob[i:i + STATE_CHUNK] for i in range(0, len(blob), STATE_CHUNK)]
        for i in reversed(range(len(chunks))):
            c = _Chunk()
            ct.memmove(ct.addressof(c), chunks[i], len(chunks[i]))   # not `c.data = ...`: that stops at a NUL
            if bpfsys.map_update(fd, ct.c_uint32(i), c) < 0:
                raise PinError(f"{d.state}: cannot write entry {i}")
    finally:
        os.close(fd)


def check_format(d: DatapathDir, manifest: dict[str, Any]) -> None:
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise PinError(f"the datapath pinned at {d.path} has manifest format {fmt!r} (from aimesh "
                       f"{manifest.get('aimesh_version', '?')}); this aimesh understands format {FORMAT}: upgrade "
                       f"aimesh, or remove it with `aimesh uninstall`. Nothing was changed.")


class RootLock:
    """An exclusive, non-blocking flock on the datapath directory for the life of the agent."""

    def __init__(self, d: DatapathDir) -> None:
        self.d = d
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        self.d.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.d.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PinError(f"another aimesh agent is running on this cgroup root (it holds {self.d.path}); "
                           "stop it first") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def agent_attached(d: DatapathDir) -> bool:
    """True when a running agent holds the directory's lock."""
    try:
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def all_datapaths(base: Path = BASE) -> list[DatapathDir]:
    if not base.is_dir():
        return []
    return [DatapathDir(p) for p in sorted(base.iterdir()) if p.is_dir()]


def remove_tree(path: Path) -> list[str]:
    """Unpin everything under path (deepest first) and remove the directories; returns what was removed."""
    removed: list[str] = []
    if not path.exists():
        return removed
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.unlink(p)
            removed.append(p)
        os.rmdir(dirpath)
    return removed


def prune_dir(path: Path, keep: set[str]) -> list[str]:
    """Unpin the entries of one directory that are not in keep (old maps, old program builds)."""
    removed: list[str] = []
    if not path.is_dir():
        return removed
    for p in path.iterdir():
        if p.name in keep:
            continue
        if p.is_dir():
            removed += remove_tree(p)
        else:
            os.unlink(p)
            removed.append(str(p))
    return removed



class _CheckpointValue(ct.Structure):
    _fields_ = [("sequence", ct.c_uint64), ("position", ct.c_uint64)]


RING_INDEX = {"decision_events": 1, "flow_events": 2, "agent_events": 3}


class Checkpoint:
    """Per ring: the last spool batch the agent wrote records of that ring into, and the ring position after them.

    Written before the batch goes to disk, in a pinned array map (one slot per ring): it lives exactly as long as
    the rings do (a reboot clears both). A restarted agent whose ring is still behind that position, while the spool
    holds that batch, knows the records were saved but the ring not yet told: it moves the ring on instead of
    reading them again (exactly once across a crash between the two)."""

    def __init__(self, d: DatapathDir) -> None:
        path = d.path / "checkpoint"
        try:
            self.fd = bpfsys.obj_get(str(path))
            if bpfsys.map_info(self.fd).value_size != ct.sizeof(_CheckpointValue):
                os.close(self.fd)
                os.unlink(path)
                raise bpfsys.BpfError(2, "old checkpoint layout")
        except bpfsys.BpfError:
            self.fd = bpfsys.map_create_array("aimesh_ckpt", ct.sizeof(_CheckpointValue), len(RING_INDEX) + 1)
            bpfsys.obj_pin(self.fd, str(path))

    def read(self, ring: str) -> tuple[int, int]:
        v = _CheckpointValue()
        bpfsys.map_lookup(self.fd, ct.c_uint32(RING_INDEX[ring]), v)
        return v.sequence, v.position

    def write(self, sequence: int, ring: str, position: int) -> None:
        if bpfsys.map_update(self.fd, ct.c_uint32(RING_INDEX[ring]), _CheckpointValue(sequence, position)) < 0:
            raise PinError("cannot write the export checkpoint")

    def close(self) -> None:
        os.close(self.fd)
