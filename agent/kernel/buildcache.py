"""An opt-in cache of compiled builds, so that many datapaths of the same sources and limits compile once.

bcc compiles the program text with clang on every load (~8 s of an agent's start). The text differs between two
datapaths only in the pin paths of its maps (registry.pin_cflags), which reach the bytecode solely as map fds in
ld_imm64 instructions. So a compiled build is saved as: per program, its instructions with every map fd replaced by
the map's name; per map, its creation attributes (type, sizes, flags, name, BTF type ids); the BTF those ids refer
to. Loading a cached build creates (or reuses, as bcc does, when its pin exists) every map at this datapath's pin
path, patches the map fds into the instructions and loads the programs with the kernel's verifier as usual.

The cache is used only when AIMESH_BUILD_CACHE names a directory (the test suite sets it: hundreds of agents of one
build). Any mismatch or failure means "not cached": the loader then compiles with bcc as without the cache.
"""
from __future__ import annotations

import ctypes as ct
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional

from agent.kernel import bpfsys

ENV = "AIMESH_BUILD_CACHE"
FORMAT = 1
PSEUDO_MAP_FD = 1          # ld_imm64 src_reg: imm is a map fd
LD_IMM64 = 0x18


class CacheMiss(Exception):
    pass


def cache_dir() -> Optional[Path]:
    v = os.environ.get(ENV, "")
    return Path(v) if v else None


def cache_key(text: bytes, cflags: list[str], map_dir: str, programs: list[tuple[str, int, int]]) -> str:
    """The build's identity without this datapath's map directory (the only per-datapath input)."""
    h = hashlib.sha256(f"{FORMAT}\0{os.uname().release}\0".encode() + text)
    for f in cflags:
        h.update(b"\0" + f.replace(map_dir, "@MAPS@").encode())
    for name, typ, at in programs:
        h.update(f"\0{name}:{typ}:{at}".encode())
    return h.hexdigest()[:24]


def _lib():
    lib = bpfsys.lib._dll or bpfsys._load()
    lib.bpf_map_create.restype = ct.c_int
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
    lib.bpf_prog_load.restype = ct.c_int
    lib.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t, ct.c_void_p]
    lib.bpf_btf_load.restype = ct.c_int
    lib.bpf_btf_load.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_void_p]
    lib.bpf_btf_get_fd_by_id.restype = ct.c_int
    lib.bpf_btf_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.restype = ct.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    return lib


def _map_attrs(lib, fd: int) -> dict:
    buf = ct.create_string_buffer(128)
    n = ct.c_uint32(128)
    bpfsys._check(lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(n)), "map info")
    typ, _id, ks, vs, me, fl = struct.unpack_from("<6I", buf.raw, 0)
    name = buf.raw[24:40].split(b"\0", 1)[0].decode()
    btf_id, btf_key, btf_value = struct.unpack_from("<3I", buf.raw, 64)   # struct bpf_map_info
    return {"type": typ, "key_size": ks, "value_size": vs, "max_entries": me, "flags": fl, "name": name,
            "btf_id": btf_id, "btf_key": btf_key, "btf_value": btf_value}


def _btf_raw(lib, btf_id: int) -> bytes:
    fd = bpfsys._check(lib.bpf_btf_get_fd_by_id(btf_id), f"open BTF {btf_id}")
    try:
        info = ct.create_string_buffer(64)
        n = ct.c_uint32(64)
        bpfsys._check(lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(n)), "BTF info")
        size = struct.unpack_from("<I", info.raw, 8)[0]   # struct bpf_btf_info: btf, btf_size, id
        data = ct.create_string_buffer(size)
        info = ct.create_string_buffer(64)
        struct.pack_into("<QI", info, 0, ct.addressof(data), size)
        n = ct.c_uint32(64)
        bpfsys._check(lib.bpf_obj_get_info_by_fd(fd, info, ct.byref(n)), "BTF data")
        return data.raw
    finally:
        os.close(fd)


def save(root: Path, key: str, b, programs: list[tuple[str, int, int]], map_names: list[str]) -> None:
    """Record a build bcc just compiled (b: the bcc.BPF object, programs: (name, prog_type, attach_type))."""
    from bcc.libbcc import lib as bcc
    lib = _lib()
    fds: dict[int, str] = {}
    maps: dict[str, dict] = {}
    for name in map_names:
        fd = bcc.bpf_table_fd(b.module, name.encode())
        if fd < 0:
            raise CacheMiss(f"no fd for map {name}")
        fds[fd] = name
        maps[name] = _map_attrs(lib, fd)
    btf_ids = {m["btf_id"] for m in maps.values() if m["btf_id"]}
    if len(btf_ids) > 1:
        raise CacheMiss("maps of more than one BTF object")
    progs = []
    for name, typ, at in programs:
        code = bytearray(b.dump_func(name.encode()))
        refs = []
        for i in range(0, len(code) - 8, 8):
            if code[i] == LD_IMM64 and (code[i + 1] >> 4) == PSEUDO_MAP_FD:
                fd = struct.unpack_from("<i", code, i + 4)[0]
                if fd not in fds:
                    raise CacheMiss(f"{name} refers to map fd {fd} outside the registry")
                refs.append([i, fds[fd]])
                struct.pack_into("<i", code, i + 4, 0)
        fn = b.funcs.get(name.encode())
        if fn is None:
            raise CacheMiss(f"{name} was not loaded")
        # the name the kernel knows it by, as bcc chose it (bcc shortens long names its own way)
        kname = bpfsys.prog_info(fn.fd).name
        progs.append({"name": name, "kernel_name": kname, "type": typ, "attach_type": at, "code": code.hex(),
                      "refs": refs})
    entry = {"format": FORMAT, "license": bcc.bpf_module_license(b.module).decode(),
             "kern_version": bcc.bpf_module_kern_version(b.module), "maps": maps, "programs": progs,
             "btf": _btf_raw(lib, btf_ids.pop()).hex() if btf_ids else ""}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, root / f"{key}.json")


def load(root: Path, key: str, pin_paths: dict[str, str]) -> dict[str, int]:
    """Load a cached build: {program name: fd}. Maps are reused at their pin path or created and pinned there (the
    caller removes what this run pinned if it fails). Raises CacheMiss when there is no usable entry."""
    try:
        entry = json.loads((root / f"{key}.json").read_text())
    except (OSError, ValueError):
        raise CacheMiss("no entry") from None
    if entry.get("format") != FORMAT or set(entry["maps"]) != set(pin_paths):
        raise CacheMiss("entry of another format or map set")
    lib = _lib()
    opened: list[int] = []
    try:
        btf_fd = -1
        if entry["btf"]:
            raw = bytes.fromhex(entry["btf"])
            btf_fd = bpfsys._check(lib.bpf_btf_load(raw, len(raw), None), "load BTF")
            opened.append(btf_fd)
        map_fds: dict[str, int] = {}
        for name, m in entry["maps"].items():
            path = pin_paths[name]
            if os.path.exists(path):
                fd = bpfsys.obj_get(path)
            else:
                opts = ct.create_string_buffer(48)   # struct bpf_map_create_opts
                if m["btf_id"] and btf_fd >= 0:
                    struct.pack_into("<QIII", opts, 0, 48, btf_fd, m["btf_key"], m["btf_value"])
                else:
                    struct.pack_into("<Q", opts, 0, 48)
                struct.pack_into("<I", opts, 28, m["flags"])
                fd = bpfsys._check(lib.bpf_map_create(m["type"], m["name"].encode(), m["key_size"], m["value_size"],
                                                      m["max_entries"], opts), f"create map {name}")
                opened.append(fd)
                bpfsys.obj_pin(fd, path)
                opened.remove(fd)
            opened.append(fd)
            map_fds[name] = fd
        progs: dict[str, int] = {}
        lic = entry["license"].encode()
        for p in entry["programs"]:
            code = bytearray.fromhex(p["code"])
            for off, name in p["refs"]:
                struct.pack_into("<i", code, off + 4, map_fds[name])
            insns = (ct.c_char * len(code)).from_buffer(code)
            opts = ct.create_string_buffer(32)   # struct bpf_prog_load_opts: sz, attempts, expected_attach_type
            struct.pack_into("<QiI", opts, 0, 32, 0, max(p["attach_type"], 0))
            struct.pack_into("<I", opts, 28, entry["kern_version"])
            fd = lib.bpf_prog_load(p["type"], p["kernel_name"].encode(), lic, insns, len(code) // 8, opts)
            if fd < 0:
                for done in progs.values():
                    os.close(done)
                raise CacheMiss(f"loading cached {p['name']} failed: {os.strerror(-fd if fd != -1 else ct.get_errno())}")
            progs[p["name"]] = fd
        return progs
    finally:
        for fd in opened:
            os.close(fd)
