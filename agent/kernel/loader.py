"""The only bcc user: compile bpf/, load every program, pin the build in the datapath directory, exit.

It runs as a short-lived child of the agent (`python -m agent.kernel.loader`), so the long-running agent never holds
bcc and LLVM (~60 MB). Maps are pinned by bcc itself at the paths registry.pin_cflags gives (an existing pin is
reused: same layout, same map). Programs are pinned under progs/<build digest>/; the loader attaches nothing — the
agent fills the maps first and then attaches or swaps the links, so no program ever runs on empty maps.

One build at a time: the loader holds an exclusive flock on the datapath directory while it builds and pins (the
agent hands it the open file of its own RootLock, so the lock is held by whoever of the two still lives; a loader
started alone takes the lock itself and is refused when an agent or another loader holds it). It dies with the agent
(PR_SET_PDEATHSIG SIGKILL): a loader whose agent was killed never pins a build after the next agent adopted another.
What a killed loader left half-pinned (progs/tmp-*) the next start reaps (reap_stale) before it builds or adopts.

Output: one JSON line on stdout ({"build": digest, "progs": dir, "maps": {name: pin name}}); on failure one line on
stderr naming what failed, exit status 2, and every pin this run created removed.
"""
from __future__ import annotations

import argparse
import ctypes as ct
import fcntl
import hashlib
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from agent.kernel import abi, buildcache, registry
from agent.kernel.pins import DatapathDir, RootLock, remove_tree
from agent.kernel.source import assemble


class LoadError(Exception):
    pass


TMP_PREFIX = "tmp-"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits; refuse to go on if that parent is already gone
    (it died between fork and prctl: the signal was never armed)."""
    libc = ct.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise LoadError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ct.get_errno())}")
    if os.getppid() != parent_pid:
        raise LoadError(f"the agent that started this loader (pid {parent_pid}) is gone; nothing was pinned")


def lock_dir(d: DatapathDir, fd: Optional[int]) -> int:
    """Hold the exclusive flock on the datapath directory: on the agent's open file when given (same lock), else on
    a new one. Raises LoadError when another agent or loader holds it."""
    if fd is None:
        d.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LoadError(f"another aimesh agent or loader holds {d.path}; nothing was pinned") from None
    return fd


def reap_stale(d: DatapathDir) -> list[str]:
    """Unpin what a killed loader left half-done (its progs/tmp-* directory). Call only while holding the lock."""
    removed: list[str] = []
    if d.progs.is_dir():
        for p in d.progs.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                removed += remove_tree(p)
    return removed


def build_inputs(d: DatapathDir, limits: abi.Limits, bpf_root: Optional[Path] = None) -> tuple[bytes, list[str]]:
    """The program text and compiler flags of a build: the same inputs give the same digest."""
    cflags = limits.cflags() + registry.pin_cflags(str(d.maps), limits) + ["-Wno-unused-function"]
    return assemble(bpf_root).encode(), cflags


def build_digest(text: bytes, cflags: list[str]) -> str:
    h = hashlib.sha256(text)
    for f in cflags:
        h.update(b"\0" + f.encode())
    for p in registry.PROGRAMS:
        h.update(f"\0{p.name}:{p.prog_type}:{p.attach_type}".encode())
    for name in registry.UPROBE_PROGRAMS:
        h.update(f"\0{name}:{registry.KPROBE}".encode())
    return h.hexdigest()[:16]


def load(d: DatapathDir, limits: abi.Limits, bpf_root: Optional[Path] = None) -> dict:
    from bcc import BPF
    from bcc.libbcc import lib

    d.make()
    text, cflags = build_inputs(d, limits, bpf_root)
    digest = build_digest(text, cflags)
    maps_before = set(os.listdir(d.maps))
    final = d.progs / digest
    tmp = d.progs / f"{TMP_PREFIX}{digest}-{os.getpid()}"   # bpffs refuses names with a dot
    b = None
    try:
        if _load_cached(d, limits, text, cflags, tmp):
            if final.exists():
                remove_tree(final)
            os.rename(tmp, final)
            return {"build": digest, "progs": str(final),
                    "maps": {m.name: m.pin_name(limits) for m in registry.MAPS}}
        try:
            b = BPF(text=text, cflags=cflags)
        except Exception as e:  # bcc raises bare Exception for compile and load errors
            raise LoadError(f"compiling the BPF programs failed: {e}") from None
        # bcc auto-attaches tracepoint__* functions to perf events of this process; the agent links them itself.
        for p in registry.PROGRAMS:
            if p.target == "tracepoint":
                try:
                    b.detach_tracepoint(p.tracepoint.encode())
                except Exception:
                    pass
        tmp.mkdir(parents=True)
        for p in registry.PROGRAMS:
            try:
                if p.prog_type in (registry.CGROUP_SOCK_ADDR, registry.CGROUP_SOCK):
                    fn = b.load_func(p.name.encode(), p.prog_type, attach_type=p.attach_type)
                else:
                    fn = b.load_func(p.name.encode(), p.prog_type)
            except Exception as e:
                raise LoadError(f"loading {p.name} failed: {e}") from None
            if lib.bpf_obj_pin(fn.fd, str(tmp / p.name).encode()) < 0:
                raise LoadError(f"pinning {p.name} in {tmp} failed")
        for name in registry.UPROBE_PROGRAMS:   # linked per libssl file by agent/kernel/uprobes.py
            try:
                fn = b.load_func(name.encode(), registry.KPROBE)
            except Exception as e:
                raise LoadError(f"loading {name} failed: {e}") from None
            if lib.bpf_obj_pin(fn.fd, str(tmp / name).encode()) < 0:
                raise LoadError(f"pinning {name} in {tmp} failed")
        _save_cached(d, text, cflags, b)
        if final.exists():
            remove_tree(final)
        os.rename(tmp, final)
    except BaseException:
        remove_tree(tmp)
        for name in set(os.listdir(d.maps)) - maps_before:
            os.unlink(d.maps / name)
        raise
    finally:
        if b is not None:
            b.cleanup()
    return {"build": digest, "progs": str(final), "maps": {m.name: m.pin_name(limits) for m in registry.MAPS}}


def _cached_programs() -> list[tuple[str, int, int]]:
    """(name, prog_type, expected attach type) of every program, as load() hands them to bcc."""
    return [(p.name, p.prog_type, p.attach_type if p.prog_type in (registry.CGROUP_SOCK_ADDR, registry.CGROUP_SOCK)
             else 0) for p in registry.PROGRAMS] + [(name, registry.KPROBE, 0) for name in registry.UPROBE_PROGRAMS]


def _load_cached(d: DatapathDir, limits: abi.Limits, text: bytes, cflags: list[str], tmp: Path) -> bool:
    """Load and pin the programs from the build cache (buildcache.py) when one is set and holds this build."""
    root = buildcache.cache_dir()
    if root is None:
        return False
    from bcc.libbcc import lib
    key = buildcache.cache_key(text, cflags, str(d.maps), _cached_programs())
    pins = {m.name: str(d.maps / m.pin_name(limits)) for m in registry.MAPS}
    try:
        fds = buildcache.load(root, key, pins)
    except (buildcache.CacheMiss, OSError):
        remove_tree(tmp)
        return False
    try:
        tmp.mkdir(parents=True)
        for name, fd in fds.items():
            if lib.bpf_obj_pin(fd, str(tmp / name).encode()) < 0:
                raise LoadError(f"pinning {name} in {tmp} failed")
    finally:
        for fd in fds.values():
            os.close(fd)
    return True


def _save_cached(d: DatapathDir, text: bytes, cflags: list[str], b) -> None:
    root = buildcache.cache_dir()
    if root is None:
        return
    key = buildcache.cache_key(text, cflags, str(d.maps), _cached_programs())
    try:
        buildcache.save(root, key, b, _cached_programs(), [m.name for m in registry.MAPS])
    except (buildcache.CacheMiss, OSError) as e:
        print(f"aimesh loader: build not cached: {e}", file=sys.stderr)


def run_child(d: DatapathDir, limits: abi.Limits, bpf_root: Optional[Path] = None, timeout: float = 300,
              lock: Optional[RootLock] = None) -> dict:
    """Run the loader in a child process and return its result; raises LoadError with its one-line error.
    lock: the caller's held RootLock on d, shared with the child (it builds under that same lock)."""
    import subprocess
    cmd = [sys.executable, "-m", "agent.kernel.loader", "--dir", str(d.path), "--limits",
           json.dumps(asdict(limits)), "--parent-pid", str(os.getpid())] + \
        (["--bpf-root", str(bpf_root)] if bpf_root else [])
    fds: tuple[int, ...] = ()
    if lock is not None and lock.fd is not None:
        cmd += ["--lock-fd", str(lock.fd)]
        fds = (lock.fd,)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, pass_fds=fds)
    except subprocess.TimeoutExpired:
        raise LoadError(f"the BPF loader did not finish in {timeout:.0f}s") from None
    if out.returncode != 0:
        lines = [x for x in out.stderr.splitlines() if x.strip() and "Warning" not in x]
        raise LoadError(lines[-1] if lines else f"the BPF loader exited with {out.returncode}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LoadError(f"the BPF loader printed no result: {out.stdout[-200:]!r}") from None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="aimesh-loader")
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--limits", default="{}")
    ap.add_argument("--bpf-root", type=Path, default=None)
    ap.add_argument("--parent-pid", type=int, default=None, help="die with this parent (the agent)")
    ap.add_argument("--lock-fd", type=int, default=None, help="the agent's open, locked datapath directory")
    args = ap.parse_args(argv)
    try:
        if args.parent_pid is not None:
            die_with_parent(args.parent_pid)
        lock_dir(DatapathDir(args.dir), args.lock_fd)   # held until exit
        limits = abi.Limits(**json.loads(args.limits))
        res = load(DatapathDir(args.dir), limits, args.bpf_root)
    except (LoadError, OSError, TypeError, ValueError) as e:
        print(f"aimesh loader: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
