"""agent/kernel/uprobes.py without a kernel: /proc/PID/maps parsing, ELF symbol offsets, link names."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.kernel import registry, uprobes

MAPS = """\
55d4c0a00000-55d4c0a2a000 r--p 00000000 fe:00 1049001                    /usr/bin/python3.11
7f1c2a000000-7f1c2a07b000 r--p 00000000 fe:00 339900                     /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a07b000-7f1c2a1d6000 r-xp 0007b000 fe:00 339900                     /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a300000-7f1c2a301000 rw-p 00000000 00:00 0
7f1c2a400000-7f1c2a47b000 r-xp 00000000 08:11 77                         /opt/app/lib/libssl.so.1.1
7f1c2a500000-7f1c2a57b000 r-xp 00000000 08:11 78                         /opt/old/libssl.so.3 (deleted)
7f1c2a600000-7f1c2a67b000 r-xp 00000000 08:11 79                         /opt/app/lib/libssl.so.3.bak
7f1c2a700000-7f1c2a77b000 r-xp 00000000 08:11 80                         /opt/app/lib/libssl3.so
7f1c2a800000-7f1c2a87b000 r-xp 00000000 fe:00 81                         /opt/my dir/libssl.so
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_maps_give_each_libssl_file_once_with_its_device_and_inode():
    libs = uprobes.parse_maps(MAPS)
    assert [(l.path, l.dev, l.inode) for l in libs] == [
        ("/usr/lib/x86_64-linux-gnu/libssl.so.3", os.makedev(0xfe, 0), 339900),
        ("/opt/app/lib/libssl.so.1.1", os.makedev(8, 0x11), 77),
        ("/opt/my dir/libssl.so", os.makedev(0xfe, 0), 81),
    ]


def test_maps_of_this_process_match_stat():
    import ssl  # noqa: F401 - maps libssl
    libs = uprobes.parse_maps(Path(f"/proc/{os.getpid()}/maps").read_text())
    assert libs, "this Python maps no libssl.so.* (statically linked OpenSSL?)"
    for lib in libs:
        st = os.stat(lib.path)
        assert (st.st_dev, st.st_ino) == lib.key


def test_garbage_lines_are_skipped():
    assert uprobes.parse_maps("nonsense\n1-2 r-xp 0 zz:00 5 /lib/libssl.so.3\n1-2 r-xp 0 fe:00 x /lib/libssl.so.3\n"
                              "1-2 r-xp 0 fe:00 0 /lib/libssl.so.3\n") == []


def _system_libssl() -> str:
    libs = uprobes.system_libs()
    if not libs:
        pytest.skip("no system libssl.so.*")
    return libs[0].path


def test_symbol_offsets_are_file_offsets_of_the_functions():
    path = _system_libssl()
    offs = uprobes.symbol_offsets(path, registry.TLS_SYMBOLS + ("no_such_function",))
    assert set(offs) == set(registry.TLS_SYMBOLS)      # OpenSSL 3 has all of them; the unknown name is absent
    assert len(set(offs.values())) == len(offs) and all(v > 0 for v in offs.values())
    nm = shutil.which("nm")
    if nm:   # binutils agrees (libssl's text is mapped at vaddr == file offset on Debian, so the values compare)
        out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True).stdout
        vaddr = {p[2].split("@")[0]: int(p[0], 16) for p in (x.split() for x in out.splitlines()) if len(p) == 3}
        from elftools.elf.elffile import ELFFile
        with open(path, "rb") as f:
            seg = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1)
        for name, off in offs.items():
            assert off == vaddr[name] - seg["p_vaddr"] + seg["p_offset"], name


def test_symbol_offsets_of_a_file_that_is_not_elf(tmp_path):
    p = tmp_path / "libssl.so.3"
    p.write_bytes(b"not an elf file at all")
    with pytest.raises(uprobes.ElfError, match="not a readable ELF"):
        uprobes.symbol_offsets(str(p), ["SSL_write"])
    with pytest.raises(uprobes.ElfError, match="No such file"):
        uprobes.symbol_offsets(str(tmp_path / "missing"), ["SSL_write"])


def test_link_names_round_trip_and_are_bpffs_safe():
    spec = registry.UprobeSpec("aimesh_ssl_return", "SSL_read_ex", True)
    name = uprobes.link_name((0xfe00, 339900), spec)
    assert name == "tls-fe00-339900-SSL_read_ex-ret" and "." not in name
    assert uprobes.link_key(name) == (0xfe00, 339900)
    assert uprobes.link_key("connect4") is None and uprobes.link_key("tp_sys_enter_read") is None


def test_every_symbol_has_an_entry_and_a_return_probe():
    assert {u.symbol for u in registry.UPROBES if u.retprobe} == set(registry.TLS_SYMBOLS)
    assert {u.symbol for u in registry.UPROBES if not u.retprobe} == set(registry.TLS_SYMBOLS)
    assert set(registry.UPROBE_PROGRAMS) == {u.name for u in registry.UPROBES}


def test_system_libs_and_governed_pids(tmp_path):
    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    real = tmp_path / "lib" / "x86_64-linux-gnu" / "libssl.so.3"
    real.write_bytes(b"x")
    (tmp_path / "lib" / "libssl.so.3").symlink_to(real)            # the same file twice: once
    (tmp_path / "lib" / "libssl.so.3.conf").write_bytes(b"x")      # not a library name
    libs = uprobes.system_libs([str(tmp_path / "lib")])
    assert len(libs) == 1 and libs[0].inode == real.stat().st_ino
    cg = tmp_path / "cg"
    (cg / "a" / "b").mkdir(parents=True)
    (cg / "cgroup.procs").write_text("1\n")
    (cg / "a" / "b" / "cgroup.procs").write_text("20\n21\n")
    assert uprobes.governed_pids(cg) == {1, 20, 21}
