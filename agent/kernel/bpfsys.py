"""The bpf() syscall through Debian's libbpf (libbpf.so.1, a dependency of bcc): pins, maps, links, attachments, info.

No bcc here: the long-running agent works on pinned objects with these calls only, so it never loads LLVM. Every call
returns a Python value or raises BpfError naming the operation and the errno (libbpf 1.x returns -errno).
"""
from __future__ import annotations

import ctypes as ct
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# enum bpf_attach_type (uapi/linux/bpf.h), the ones aimesh uses. Names as bcc's BPFAttachType.
CGROUP_INET_INGRESS = 0
CGROUP_INET_EGRESS = 1
CGROUP_INET_SOCK_CREATE = 2
CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_BIND = 8
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_INET4_POST_BIND = 12
CGROUP_INET6_POST_BIND = 13
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
TRACE_RAW_TP = 23
CGROUP_INET_SOCK_RELEASE = 34
PERF_EVENT = 41

# enum bpf_link_type
LINK_TYPE_RAW_TRACEPOINT = 1
LINK_TYPE_CGROUP = 3
LINK_TYPE_PERF_EVENT = 7

BPF_F_ALLOW_MULTI = 2
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_MAP_TYPE_ARRAY = 2


class BpfError(OSError):
    pass


def _load() -> ct.CDLL:
    for name in ("libbpf.so.1", "libbpf.so"):
        try:
            return ct.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise BpfError("libbpf.so.1 is not installed (Debian package libbpf1, a dependency of python3-bpfcc)")


class _Lib:
    """Lazily bound libbpf functions with their C signatures."""

    _sigs = {
        "bpf_obj_pin": (ct.c_int, [ct.c_int, ct.c_char_p]),
        "bpf_obj_get": (ct.c_int, [ct.c_char_p]),
        "bpf_map_update_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]),
        "bpf_map_lookup_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
        "bpf_map_delete_elem": (ct.c_int, [ct.c_int, ct.c_void_p]),
        "bpf_map_get_next_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
        "bpf_map_update_batch": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]),
        "bpf_map_create": (ct.c_int, [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]),
        "bpf_link_create": (ct.c_int, [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]),
        "bpf_link_update": (ct.c_int, [ct.c_int, ct.c_int, ct.c_void_p]),
        "bpf_raw_tracepoint_open": (ct.c_int, [ct.c_char_p, ct.c_int]),
        "bpf_prog_attach": (ct.c_int, [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]),
        "bpf_prog_detach2": (ct.c_int, [ct.c_int, ct.c_int, ct.c_int]),
        "bpf_prog_query": (ct.c_int, [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                      ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]),
        "bpf_obj_get_info_by_fd": (ct.c_int, [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]),
        "bpf_prog_get_fd_by_id": (ct.c_int, [ct.c_uint32]),
        "bpf_map_get_fd_by_id": (ct.c_int, [ct.c_uint32]),
        "bpf_link_get_fd_by_id": (ct.c_int, [ct.c_uint32]),
    }

    def __init__(self) -> None:
        self._dll: Optional[ct.CDLL] = None

    def __getattr__(self, name: str):
        if self._dll is None:
            self._dll = _load()
        fn = getattr(self._dll, name)
        res, args = self._sigs[name]
        fn.restype, fn.argtypes = res, args
        setattr(self, name, fn)
        return fn


lib = _Lib()


def _check(res: int, what: str) -> int:
    if res < 0:
        err = -res if res != -1 else (ct.get_errno() or 1)
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return res


def obj_get(path: str) -> int:
    """fd of a pinned object; raises BpfError (errno ENOENT when nothing is pinned there)."""
    return _check(lib.bpf_obj_get(path.encode()), f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_pin_replace(fd: int, path: Path) -> None:
    """Pin fd at path in one step: pinned beside it as new-<name>, then renamed over whatever path held (an old
    link goes with its pin)."""
    tmp = path.with_name(f"new-{path.name}")
    if tmp.exists():
        os.unlink(tmp)
    obj_pin(fd, str(tmp))
    os.replace(tmp, path)


def map_create_array(name: str, value_size: int, entries: int) -> int:
    return _check(lib.bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode(), 4, value_size, entries, None),
                  f"create map {name}")


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> int:
    return lib.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags)


def map_lookup(fd: int, key, value) -> bool:
    return lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) == 0


def map_delete(fd: int, key) -> bool:
    return lib.bpf_map_delete_elem(fd, ct.byref(key)) == 0


def map_next_key(fd: int, key, next_key) -> bool:
    return lib.bpf_map_get_next_key(fd, None if key is None else ct.byref(key), ct.byref(next_key)) == 0


def map_update_batch(fd: int, keys, values, count: int) -> int:
    n = ct.c_uint32(count)
    return lib.bpf_map_update_batch(fd, keys, values, ct.byref(n), None)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(lib.bpf_link_create(prog_fd, target_fd, attach_type, None), f"link (attach type {attach_type})")


def raw_tracepoint_open(event: str, prog_fd: int) -> int:
    """Link a BPF_PROG_TYPE_RAW_TRACEPOINT program to a raw tracepoint (BPF_RAW_TRACEPOINT_OPEN): the fd is a bpf
    link (pinnable, BPF_LINK_TYPE_RAW_TRACEPOINT); it cannot be updated in place."""
    return _check(lib.bpf_raw_tracepoint_open(event.encode(), prog_fd), f"raw tracepoint {event}")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link atomically: no instant with none or two."""
    _check(lib.bpf_link_update(link_fd, new_prog_fd, None), "link update")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), f"attach (type {attach_type})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib.bpf_prog_detach2(prog_fd, target_fd, attach_type), f"detach (type {attach_type})")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly (links included) to a cgroup for one attach type."""
    ids = (ct.c_uint32 * 64)()
    cnt = ct.c_uint32(64)
    flags = ct.c_uint32(0)
    _check(lib.bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)), "prog query")
    return list(ids[:cnt.value])


def _info(fd: int) -> bytes:
    buf = ct.create_string_buffer(256)
    n = ct.c_uint32(256)
    _check(lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)), "object info")
    return buf.raw


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str               # the kernel's hash of the instructions (map references zeroed)
    name: str
    map_ids: tuple[int, ...] = ()

    @property
    def code(self) -> tuple[str, tuple[int, ...]]:
        """Same code on the same maps: two programs that behave identically."""
        return self.tag, tuple(sorted(self.map_ids))


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    cgroup_id: int       # cgroup links only
    attach_type: int     # cgroup links only


def prog_info(fd: int) -> ProgInfo:
    ids = (ct.c_uint32 * 64)()
    buf = ct.create_string_buffer(256)
    struct.pack_into("<IQ", buf, 52, 64, ct.addressof(ids))   # nr_map_ids, map_ids (struct bpf_prog_info)
    n = ct.c_uint32(256)
    _check(lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)), "program info")
    raw = buf.raw
    typ, pid = struct.unpack_from("<II", raw, 0)
    nr = min(struct.unpack_from("<I", raw, 52)[0], 64)
    return ProgInfo(typ, pid, raw[8:16].hex(), raw[64:80].split(b"\0", 1)[0].decode(errors="replace"),
                    tuple(ids[:nr]))


def map_info(fd: int) -> MapInfo:
    raw = _info(fd)
    typ, mid, ks, vs, me, fl = struct.unpack_from("<6I", raw, 0)
    return MapInfo(typ, mid, ks, vs, me, fl, raw[24:40].split(b"\0", 1)[0].decode(errors="replace"))


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd)
    typ, lid, prog_id = struct.unpack_from("<III", raw, 0)
    cg, at = struct.unpack_from("<QI", raw, 16) if typ == LINK_TYPE_CGROUP else (0, 0)
    return LinkInfo(typ, lid, prog_id, cg, at)


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib.bpf_prog_get_fd_by_id(prog_id), f"open program {prog_id}")


def same_code(prog_id: int, new: ProgInfo) -> bool:
    """Whether the loaded program prog_id is new's code on new's maps (ProgInfo.code): an upgrade keeps its link."""
    if prog_id == new.id:
        return True
    try:
        fd = prog_fd_by_id(prog_id)
    except BpfError:
        return False
    try:
        return prog_info(fd).code == new.code
    finally:
        os.close(fd)


class PerfEventAttr(ct.Structure):
    """struct perf_event_attr, the fields a tracepoint needs (PERF_ATTR_SIZE_VER5 = 112 bytes, zero-padded)."""
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("rest", ct.c_uint8 * 64)]


PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
_NR_PERF_EVENT_OPEN = 298   # x86_64


def tracepoint_perf_fd(tracefs: str, category: str, event: str) -> int:
    """A perf event for one tracepoint (all CPUs see a BPF program linked to it); the link keeps it alive."""
    try:
        tp_id = int(open(f"{tracefs}/events/{category}/{event}/id").read())
    except OSError as e:
        raise BpfError(e.errno or 1, f"tracepoint {category}:{event}: {e.strerror} (is tracefs mounted?)") from None
    attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=112, config=tp_id, sample_period=1, wakeup_events=1)
    libc = ct.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"perf_event_open {category}:{event}: {os.strerror(err)}")
    return fd


def tracefs_dir() -> str:
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(f"{p}/events"):
            return p
    raise BpfError(2, "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")


class UprobeAttr(ct.Structure):
    """struct perf_event_attr for the uprobe PMU: config1 is the file's path (uprobe_path), config2 the offset in it."""
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64), ("rest", ct.c_uint8 * 40)]


UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"


def uprobe_pmu(pmu_dir: str = UPROBE_PMU) -> tuple[int, int]:
    """(perf type of the uprobe PMU, bit of config that makes it a uretprobe), from sysfs."""
    try:
        typ = int(open(f"{pmu_dir}/type").read())
        fmt = open(f"{pmu_dir}/format/retprobe").read().strip()   # "config:0"
    except (OSError, ValueError) as e:
        raise BpfError(getattr(e, "errno", None) or 2, f"uprobe PMU {pmu_dir}: {e}") from None
    field, _, bit = fmt.partition(":")
    if field != "config" or not bit.isdigit():
        raise BpfError(22, f"uprobe PMU {pmu_dir}/format/retprobe: unexpected {fmt!r}")
    return typ, int(bit)


def uprobe_perf_fd(path: str, offset: int, retprobe: bool, pmu: tuple[int, int]) -> int:
    """A perf event for a uprobe (or uretprobe) at a file offset of path, in every process that maps the file; the
    bpf link made on it keeps it (and the file's inode) alive."""
    cpath = ct.create_string_buffer(path.encode())
    attr = UprobeAttr(type=pmu[0], size=112, config=(1 << pmu[1]) if retprobe else 0, sample_period=1,
                      wakeup_events=1, config1=ct.addressof(cpath), config2=offset)
    libc = ct.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_PERF_EVENT_OPEN, ct.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"perf_event_open {'uretprobe' if retprobe else 'uprobe'} {path}+{offset:#x}: "
                            f"{os.strerror(err)}")
    return fd
