"""TLS capture's attachments: the uprobes of bpf/tls.c on every libssl a governed process maps. No bcc.

A uprobe is set on a file (an inode), not on a process: one set of links per libssl file serves every process that
maps it, so each file is attached once, keyed by (device, inode). Files are found in /proc/PID/maps of the governed
processes (at start, at exec, and at each housekeeping rescan: CPython dlopens libssl at `import ssl`, after exec) and
among the system's libssl.so.* (what a process will dlopen later). Symbol offsets come from the file's ELF dynamic
symbol table (pyelftools). Each link is a perf event of the uprobe PMU with the build's program linked to it
(BPF_LINK_CREATE, BPF_PERF_EVENT), pinned under the datapath's links/ as tls-<dev>-<inode>-<symbol>[-ret], so it
outlives the agent; a restart adopts the pins, replacing those whose program changed; `aimesh uninstall` unpins them
with every other link.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from agent.kernel import bpfsys, registry

log = logging.getLogger("aimesh.tls")

LIBSSL = re.compile(r"(?:^|/)libssl\.so(?:\.[0-9]+)*$")
LINK_PREFIX = "tls-"
SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class MappedLib:
    """A file mapped by a process, as /proc/PID/maps names it."""
    path: str
    dev: int       # os.makedev(major, minor), comparable with os.stat().st_dev
    inode: int

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.inode


def parse_maps(text: str, match: re.Pattern[str] = LIBSSL) -> list[MappedLib]:
    """The distinct files of a /proc/PID/maps text whose path matches (deleted files are left out: the path no
    longer names them)."""
    out: dict[tuple[int, int], MappedLib] = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].rstrip()
        if path.endswith(" (deleted)") or not match.search(path):
            continue
        major, _, minor = parts[3].partition(":")
        try:
            lib = MappedLib(path, os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        except ValueError:
            continue
        if lib.inode:
            out.setdefault(lib.key, lib)
    return list(out.values())


def symbol_offsets(path: str, names: Iterable[str]) -> dict[str, int]:
    """File offsets of the defined functions `names` in the ELF file at path (dynamic symbols, else the full table):
    what the uprobe PMU takes. Names the file does not define are absent (OpenSSL 1.1.0 has no SSL_write_ex)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    wanted = set(names)
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            vaddrs: dict[str, int] = {}
            for sec_name in (".dynsym", ".symtab"):
                sec = elf.get_section_by_name(sec_name)
                if sec is None:
                    continue
                for sym in sec.iter_symbols():
                    if (sym.name in wanted and sym.name not in vaddrs and sym["st_info"]["type"] == "STT_FUNC"
                            and sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]):
                        vaddrs[sym.name] = sym["st_value"]
                if vaddrs:
                    break
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror}") from None
    except (ELFError, ValueError, KeyError) as e:
        raise ElfError(f"{path}: not a readable ELF file ({e})") from None
    out: dict[str, int] = {}
    for name, vaddr in vaddrs.items():
        for seg in loads:
            if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                out[name] = vaddr - seg["p_vaddr"] + seg["p_offset"]
                break
    return out


def link_name(key: tuple[int, int], spec: registry.UprobeSpec) -> str:
    return f"{LINK_PREFIX}{key[0]:x}-{key[1]}-{spec.symbol}{'-ret' if spec.retprobe else ''}"


def link_key(name: str) -> Optional[tuple[int, int]]:
    """(dev, inode) of a pinned uprobe link's name; None for other links."""
    m = re.match(rf"^{LINK_PREFIX}([0-9a-f]+)-([0-9]+)-", name)
    return (int(m.group(1), 16), int(m.group(2))) if m else None


def system_libs(dirs: Iterable[str] = SYSTEM_LIB_DIRS) -> list[MappedLib]:
    """The libssl.so.* files of the system library directories (and their multiarch subdirectories), one per file."""
    out: dict[tuple[int, int], MappedLib] = {}
    for d in dirs:
        base = Path(d)
        if not base.is_dir():
            continue
        for p in sorted([*base.glob("libssl.so.*"), *base.glob("*/libssl.so.*")]):
            if not LIBSSL.search(str(p)):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), MappedLib(str(p), st.st_dev, st.st_ino))
    return list(out.values())


def governed_pids(root: Path) -> set[int]:
    """Every process in the cgroup subtree at root."""
    pids: set[int] = set()
    for d, _dirs, files in os.walk(root):
        if "cgroup.procs" in files:
            try:
                pids.update(int(x) for x in Path(d, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
    return pids


@dataclass
class TlsAttachStats:
    libraries: int = 0          # files with links in force
    links_created: int = 0
    links_kept: int = 0
    failures: dict[str, str] = field(default_factory=dict)   # library path -> why it is not attached


class TlsProbes:
    """The uprobe links of one build, per libssl file. Methods never raise for one library: a file that cannot be
    attached is logged once and remembered in stats.failures."""

    def __init__(self, links_dir: Path, progs_dir: Path, proc: Path = Path("/proc"),
                 pmu: Optional[tuple[int, int]] = None) -> None:
        self.links_dir, self.proc = links_dir, proc
        self.pmu = pmu or bpfsys.uprobe_pmu()
        self.stats = TlsAttachStats()
        self._done: set[tuple[int, int]] = set()     # attached, or failed (not retried)
        self._prog_fds: dict[str, int] = {}
        self._progs: dict[str, bpfsys.ProgInfo] = {}
        try:
            for name in registry.UPROBE_PROGRAMS:
                fd = bpfsys.obj_get(str(progs_dir / name))
                self._prog_fds[name] = fd
                self._progs[name] = bpfsys.prog_info(fd)
        except bpfsys.BpfError:
            self.close()
            raise

    def pinned_keys(self) -> set[tuple[int, int]]:
        if not self.links_dir.is_dir():
            return set()
        return {k for p in self.links_dir.iterdir() if (k := link_key(p.name)) is not None}

    def attach(self, lib: MappedLib, open_path: Optional[str] = None) -> bool:
        """Link every probe of bpf/tls.c on lib (opened at open_path: /proc/PID/root/... for another mount
        namespace); True when this call attached it."""
        if lib.key in self._done:
            return False
        self._done.add(lib.key)
        path = open_path or lib.path
        try:
            offsets = symbol_offsets(path, registry.TLS_SYMBOLS)
            if not ({"SSL_write", "SSL_write_ex"} & offsets.keys() and {"SSL_read", "SSL_read_ex"} & offsets.keys()):
                raise ElfError(f"{path}: defines neither SSL_write(_ex) nor SSL_read(_ex)")
            for spec in registry.UPROBES:
                if spec.symbol in offsets:
                    self._link(lib.key, spec, path, offsets[spec.symbol])
        except (ElfError, bpfsys.BpfError, OSError) as e:
            self.stats.failures[lib.path] = str(e)
            log.warning("TLS capture: cannot probe %s: %s", lib.path, e)
            return False
        self.stats.libraries += 1
        log.info("TLS capture: probing %s (dev %#x inode %d)", lib.path, lib.dev, lib.inode)
        return True

    def _link(self, key: tuple[int, int], spec: registry.UprobeSpec, path: str, offset: int) -> None:
        pin = self.links_dir / link_name(key, spec)
        if pin.exists():
            try:
                fd = bpfsys.obj_get(str(pin))
                try:
                    # the same code on the same maps (an upgrade that changed another program): keep the link
                    if bpfsys.same_code(bpfsys.link_info(fd).prog_id, self._progs[spec.name]):
                        self.stats.links_kept += 1
                        return
                finally:
                    os.close(fd)
            except bpfsys.BpfError:
                pass   # unreadable: replaced below
        # a perf-event link cannot swap its program: link the new one, then replace the pin (the old link goes)
        pfd = bpfsys.uprobe_perf_fd(path, offset, spec.retprobe, self.pmu)
        try:
            fd = bpfsys.link_create(self._prog_fds[spec.name], pfd, bpfsys.PERF_EVENT)
        finally:
            os.close(pfd)
        try:
            bpfsys.obj_pin_replace(fd, pin)
        finally:
            os.close(fd)
        self.stats.links_created += 1

    def scan_pid(self, pid: int) -> int:
        """Attach the libssl files process pid maps; how many were new. A process that exited is no error."""
        try:
            text = (self.proc / str(pid) / "maps").read_text()
        except OSError:
            return 0
        return sum(self.attach(lib, f"{self.proc}/{pid}/root{lib.path}") for lib in parse_maps(text))

    def scan(self, pids: Iterable[int], system: bool = False) -> int:
        n = sum(self.attach(lib) for lib in system_libs()) if system else 0
        return n + sum(self.scan_pid(pid) for pid in pids)

    def prune(self) -> list[str]:
        """Unpin the links of files no longer attached by this agent (a library replaced by an upgrade, a build's
        probe dropped): called after the start scan, which re-attached every file still in use."""
        gone: list[str] = []
        if not self.links_dir.is_dir():
            return gone
        wanted = {link_name(k, s) for k in self._done for s in registry.UPROBES}
        for p in sorted(self.links_dir.iterdir()):
            if link_key(p.name) is not None and p.name not in wanted:
                os.unlink(p)
                gone.append(p.name)
        return gone

    def close(self) -> None:
        """Close the program descriptors; the pinned links stay in force."""
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()


def start(links_dir: Path, progs_dir: Path, root: Path) -> TlsProbes:
    """Probes for one build: every system libssl and every libssl a process under root maps; stale pins removed."""
    probes = TlsProbes(links_dir, progs_dir)
    probes.scan(governed_pids(root), system=True)
    gone = probes.prune()
    if gone:
        log.info("TLS capture: unpinned %d uprobe links of libraries no longer probed", len(gone))
    return probes
