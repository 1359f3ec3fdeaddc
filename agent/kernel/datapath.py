"""The agent's handle on a pinned datapath: maps, rings, links. No bcc: only the bpf() syscall (bpfsys) and mmap.

The datapath lives in bpffs (pins.py), built by the loader (loader.py). This class opens the pinned maps of one
build, writes policy generations, and puts the build's programs in force: it creates one pinned bpf link per
attachment, or swaps the program behind an existing link in one step (bpf_link_update), so at no instant does the
cgroup have zero or two sets of aimesh programs. Closing it leaves everything in force.

Programs of an optional group (registry.ProgramSpec.group, e.g. the capture raw tracepoints) are linked only while the
live generation's runtime_config flags need them (registry.groups_needed): apply() links a group before the flip that
turns it on and unpins its links after the flip that turns it off, so a node without capture identities runs none of
its sys_enter/sys_exit programs. attach() does the same from the adopted runtime_config after an agent restart.
"""
from __future__ import annotations

import ctypes as ct
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from agent.errors import AgentError
from agent.kernel import abi, bpfsys, registry
from agent.kernel.maps import MapError, MapHandle
from agent.kernel.pins import DatapathDir
from agent.kernel.ringbuf import RingReader
from agent.policy.compile import MapImage

log = logging.getLogger("aimesh.kernel")

_BPF_EXIST = 2
_BATCH = {registry.HASH, registry.ARRAY, registry.PERCPU_ARRAY, registry.LRU_HASH}


def release_free_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: a big policy leaves tens of MB)."""
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread (gRPC's, the metrics server's) its own malloc arena; two are plenty for the agent and
    keep its RSS from growing with thread count (M_ARENA_MAX, as MALLOC_ARENA_MAX=2 would)."""
    try:
        ct.CDLL("libc.so.6").mallopt(-8, n)
    except (OSError, AttributeError):
        pass


def possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values have one slot each)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += (int(b) - int(a) + 1) if b else 1
    return n


@dataclass
class AttachReport:
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    orphans_detached: list[str] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)     # optional programs whose link was unpinned


class Datapath:
    """Open pinned maps and rings of one build. attach() puts the build's programs in force."""

    def __init__(self, d: DatapathDir, limits: abi.Limits, map_pins: dict[str, str]) -> None:
        self.dir, self.limits = d, limits
        self.maps: dict[str, MapHandle] = {}
        self.map_fds: dict[str, int] = {}
        for spec in registry.MAPS:
            path = d.maps / map_pins[spec.name]
            try:
                fd = bpfsys.obj_get(str(path))
            except bpfsys.BpfError as e:
                self.close()
                raise AgentError(f"pinned map {path}: {e.strerror}") from None
            self.map_fds[spec.name] = fd
            if spec.key is not None and spec.map_type not in (registry.SK_STORAGE, registry.SOCKHASH,
                                                               registry.PERCPU_ARRAY, registry.PERCPU_HASH):
                self.maps[spec.name] = MapHandle(fd, spec.name, spec.key, spec.value, spec.capacity(limits),
                                                 spec.map_type in _BATCH)
        self.rings: dict[str, RingReader] = {name: RingReader(self.map_fds[name], name) for name in registry.RINGS}
        self._live: Optional[dict[str, list[bytes]]] = None   # the live generation's keys; None: not known yet
        self._ncpu = possible_cpus()
        cfg = self.maps["runtime_config"].lookup(ct.c_uint32(0))
        self.active_gen = cfg.active_gen if cfg else 0
        self.config_flags = cfg.flags if cfg else 0
        self.interim_ns = cfg.interim_ns if cfg else 0
        self.attached_count = 0
        self.fail_closed = bool(self.config_flags & abi.ConfigFlag.UNMANAGED_CLOSED)
        self.all_decisions = False   # a ring event for plain allows too: set by the agent when a flow log is on
        self.capture_request_bytes = cfg.capture_request_bytes if cfg else 0
        self.capture_response_bytes = cfg.capture_response_bytes if cfg else 0
        self.gw_addr = bytes(cfg.gw_addr) if cfg else bytes(16)   # the L7 gateway's redirect address (16-byte form)
        self.gw_port = cfg.gw_port if cfg else 0
        self.map_paths = {name: str(d.maps / pin) for name, pin in map_pins.items()}   # e.g. gateway_origin
        self._progs: Optional[Path] = None      # the build whose programs attach() put in force
        self.groups_linked: frozenset[str] = frozenset()

    # ---- putting a build in force ----
    def attach(self, root: Path, progs_dir: Path) -> AttachReport:
        """Link every program of the build at progs_dir: create missing links, swap changed ones, keep the rest.
        Optional groups: linked when the live flags need them, their links unpinned when not."""
        rep = AttachReport()
        want = registry.groups_needed(self.config_flags)
        try:
            cg_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise AgentError(f"cannot open cgroup {root}: {e.strerror}") from None
        try:
            ours: set[int] = set()
            for p in registry.PROGRAMS:
                if p.group and p.group not in want:
                    self._unlink(p, rep)
                    continue
                kept_id = self._put_in_force(p, progs_dir, cg_fd, rep)
                ours.update(x for x in kept_id if x)
            rep.orphans_detached = detach_orphans(root, cg_fd, ours)
        except bpfsys.BpfError as e:
            raise AgentError(f"attaching the datapath to {root} failed: {e.strerror}") from None
        finally:
            os.close(cg_fd)
        self._progs = progs_dir
        self.groups_linked = want
        self.attached_count = len(registry.CGROUP_PROGRAMS)
        log.info("datapath in force on %s: %d links created, %d swapped, %d kept%s%s", root, len(rep.created),
                 len(rep.replaced), len(rep.kept),
                 f", {len(rep.unlinked)} optional unlinked" if rep.unlinked else "",
                 f"; detached {len(rep.orphans_detached)} orphaned programs" if rep.orphans_detached else "")
        return rep

    def _put_in_force(self, p: registry.ProgramSpec, progs_dir: Path, cg_fd: int, rep: AttachReport) -> tuple[int, int]:
        """Link one program of the build; returns (its id, the id of an older program kept in its place or 0)."""
        try:
            prog_fd = bpfsys.obj_get(str(progs_dir / p.name))
        except bpfsys.BpfError as e:
            raise AgentError(f"pinned program {progs_dir / p.name}: {e.strerror}") from None
        try:
            new = bpfsys.prog_info(prog_fd)
            if p.target == "sockhash":
                # the map holds the verdict program; attaching again replaces it in one step
                bpfsys.prog_attach(prog_fd, self.map_fds["fastpath_sockets"], p.attach_type, 0)
                rep.kept.append(p.link)
                return new.id, 0
            tracefs = bpfsys.tracefs_dir() if p.target == "tracepoint" else None
            return new.id, self._link(p, prog_fd, new, cg_fd, tracefs, rep)
        finally:
            os.close(prog_fd)

    def _unlink(self, p: registry.ProgramSpec, rep: AttachReport) -> None:
        """Unpin the link of an optional program: the kernel detaches it with its last reference."""
        path = self.dir.links / p.link
        try:
            os.unlink(path)
            rep.unlinked.append(p.link)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise AgentError(f"unpinning {path} failed: {e.strerror}") from None

    def link_groups(self, want: frozenset[str]) -> AttachReport:
        """Link the optional groups in `want`, unlink the others (no-op before attach()). Unlinking a group empties
        the maps only its programs keep (registry.GROUP_MAPS): nothing would remove their entries any more."""
        rep = AttachReport()
        if self._progs is None or want == self.groups_linked:
            return rep
        try:
            for p in registry.PROGRAMS:
                if not p.group:
                    continue
                if p.group in want and p.group not in self.groups_linked:
                    self._put_in_force(p, self._progs, -1, rep)
                elif p.group not in want and p.group in self.groups_linked:
                    self._unlink(p, rep)
        except bpfsys.BpfError as e:
            raise AgentError(f"linking the optional programs failed: {e.strerror}") from None
        for g in self.groups_linked - want:
            for name in registry.GROUP_MAPS.get(g, ()):
                m = self.maps[name]
                m.delete_many(list(m.keys()))
        log.info("optional programs: %s linked%s", ", ".join(sorted(want)) or "none",
                 f" ({len(rep.created) + len(rep.kept)} links in force, {len(rep.unlinked)} unpinned)")
        self.groups_linked = want
        return rep

    def _link(self, p: registry.ProgramSpec, prog_fd: int, new: bpfsys.ProgInfo, cg_fd: int,
              tracefs: Optional[str], rep: AttachReport) -> int:
        """Put the program in force for one attachment; returns the id of an older program kept in its place."""
        path = self.dir.links / p.link
        try:
            link_fd = bpfsys.obj_get(str(path))
        except bpfsys.BpfError:
            link_fd = -1
        if link_fd >= 0:
            try:
                cur_id = bpfsys.link_info(link_fd).prog_id
                if bpfsys.same_code(cur_id, new):
                    rep.kept.append(p.link)   # an upgrade swaps only the programs that changed
                    return cur_id
                if p.target == "cgroup":
                    bpfsys.link_update(link_fd, prog_fd)
                    rep.replaced.append(p.link)
                    return 0
            finally:
                os.close(link_fd)
        # new link (a tracepoint link cannot be updated: the new one is linked first, then the old pin replaced)
        if p.target == "cgroup":
            fd = bpfsys.link_create(prog_fd, cg_fd, p.attach_type)
        elif p.target == "raw_tracepoint":
            fd = bpfsys.raw_tracepoint_open(p.tracepoint, prog_fd)
        else:
            cat, ev = p.tracepoint.split(":")
            pfd = bpfsys.tracepoint_perf_fd(tracefs or "", cat, ev)
            try:
                fd = bpfsys.link_create(prog_fd, pfd, bpfsys.PERF_EVENT)
            finally:
                os.close(pfd)
        try:
            bpfsys.obj_pin_replace(fd, path)
        finally:
            os.close(fd)
        (rep.replaced if link_fd >= 0 else rep.created).append(p.link)
        return 0

    # ---- policy generations ----
    def next_gen(self) -> int:
        return 1 - self.active_gen

    def apply(self, image: MapImage, settle_s: float = 0.01) -> None:
        """Write image into the inactive generation, flip runtime_config to it, then drop the previous generation.

        The inactive generation is emptied first (a crash in the middle of an earlier apply may have left part of
        one there), so what becomes live is exactly the image.
        """
        if image.gen == self.active_gen and self._live is not None:
            raise ValueError(f"generation {image.gen} is live; compile into {self.next_gen()}")
        self._delete_gen(image.gen)
        written = {name: [bytes(k) for k, _ in items] for name, items in self._image_items(image)}
        try:
            for name, items in self._image_items(image):
                self.maps[name].update_many(items)
        except Exception:
            self._delete_keys(written)  # the live generation was never touched
            raise
        old_gen, old = self.active_gen, self._live
        want = registry.groups_needed(image.config_flags)
        self.link_groups(self.groups_linked | want)   # linked before the flip that needs them
        self.gw_addr, self.gw_port = bytes(image.gw_addr), int(image.gw_port)   # with the flip, as one value
        self.set_runtime(image.gen, image.config_flags)
        self._live = written
        time.sleep(settle_s)  # a program that read the old generation finishes within microseconds
        if old is not None:
            self._delete_keys(old)
        else:
            self._delete_gen(old_gen)
        self.link_groups(want)                         # unlinked after the flip that stopped needing them
        release_free_memory()

    @staticmethod
    def _image_items(image: MapImage):
        yield "identity_info", image.identity_info
        yield "endpoint_identity", [(k, ct.c_uint32(v)) for k, v in image.endpoints]
        yield "policy_verdict", image.policies
        yield "redirect_backend", image.backends
        yield "redirect_service", image.redirects

    def _delete_gen(self, gen: int) -> None:
        """Delete every key of one generation from the generation-keyed maps (walks the maps)."""
        for spec in registry.MAPS:
            if spec.gen_keyed:
                m = self.maps[spec.name]
                m.delete_many([k for k in list(m.keys()) if k.gen == gen])

    def _delete_keys(self, keys: dict[str, list[bytes]]) -> None:
        for name, raw in keys.items():
            kt = self.maps[name].key_type
            self.maps[name].delete_many(kt.from_buffer_copy(b) for b in raw)

    def map_usage(self) -> dict[str, tuple[int, int]]:
        """(entries the live generation uses, capacity) for the agent-written maps; no kernel walk."""
        return {name: (len(raw), self.maps[name].capacity) for name, raw in (self._live or {}).items()}

    def set_runtime(self, gen: int, flags: int, interim_ns: Optional[int] = None) -> None:
        if interim_ns is not None:
            self.interim_ns = interim_ns
        flags &= ~(abi.ConfigFlag.UNMANAGED_CLOSED | abi.ConfigFlag.ALL_DECISIONS)
        live = flags | (abi.ConfigFlag.UNMANAGED_CLOSED if self.fail_closed else 0) | \
            (abi.ConfigFlag.ALL_DECISIONS if self.all_decisions else 0)
        rc = abi.RuntimeConfig(gen, int(live), self.interim_ns, self.capture_request_bytes,
                               self.capture_response_bytes)
        rc.gw_addr[:] = self.gw_addr
        rc.gw_port = self.gw_port
        self.maps["runtime_config"].update(ct.c_uint32(0), rc)
        self.active_gen, self.config_flags = gen, int(flags)

    def set_capture_budget(self, request_bytes: int, response_bytes: int) -> None:
        """Bytes the capture copies per request and per response (runtime_config); applied at the next set_runtime."""
        self.capture_request_bytes, self.capture_response_bytes = int(request_bytes), int(response_bytes)

    # ---- plaintext capture ----
    def capture_skip(self, tgid: int, fd: int) -> bool:
        """Flag one captured socket CAPTURE_SOCK_F_SKIP: the kernel copies nothing more of it (its close is still
        reported). False when the socket is no longer in capture_sockets."""
        m = self.maps["capture_sockets"]
        key = abi.CaptureSockKey(tgid, fd)
        v = m.lookup(key)
        if v is None:
            return False
        v.flags |= abi.CaptureSockFlag.SKIP
        return bpfsys.map_update(m.fd, key, v, _BPF_EXIST) == 0   # not re-created if closed meanwhile

    def set_fail_closed(self, on: bool) -> None:
        """Unmanaged counts as governed and enforced (CFG_F_UNMANAGED_CLOSED) while a workload-identity map is full."""
        if on != self.fail_closed:
            self.fail_closed = on
            self.set_runtime(self.active_gen, self.config_flags)

    # ---- identities of local workloads ----
    def set_cgroup_identity(self, cgroup_id: int, identity: int) -> None:
        self.maps["cgroup_identity"].update(ct.c_uint64(cgroup_id), ct.c_uint32(identity))

    def clear_cgroup_identity(self, cgroup_id: int) -> None:
        self.maps["cgroup_identity"].delete(ct.c_uint64(cgroup_id))

    def set_cgroup_inherit(self, cgroup_id: int, identity: int) -> None:
        self.maps["cgroup_inherit"].update(ct.c_uint64(cgroup_id), ct.c_uint32(identity))

    def clear_cgroup_inherit(self, cgroup_id: int) -> None:
        self.maps["cgroup_inherit"].delete(ct.c_uint64(cgroup_id))

    def set_process_identity(self, pid: int, identity: int) -> None:
        self.maps["process_identity"].update(ct.c_uint32(pid), ct.c_uint32(identity))

    def clear_process_identity(self, pid: int) -> None:
        self.maps["process_identity"].delete(ct.c_uint32(pid))

    def set_local_endpoint(self, key: abi.LocalEndpointKey, identity: int) -> None:
        """A socket bound before the datapath (seen in /proc): its port's identity, with a seeded ref so that a
        co-binder of another identity is refused. A port the programs already hold for another identity keeps it."""
        refs = self.maps["local_endpoint_refs"]
        seeded = abi.LocalEndpointRef(identity=identity, flags=abi.LocalEndpointRefFlag.SEEDED, refs=1)
        if not refs.insert(key, seeded):
            cur = refs.lookup(key)
            if cur is not None and cur.refs and cur.identity != identity:
                return
        self.maps["local_endpoint_identity"].update(key, ct.c_uint32(identity))

    def set_local_addresses(self, keys: list[abi.LocalEndpointKey]) -> None:
        self._set_address_set("local_address", keys)

    def set_dns_resolvers(self, keys: list[abi.LocalEndpointKey]) -> None:
        self._set_address_set("dns_resolver", keys)

    def _set_address_set(self, name: str, keys: list[abi.LocalEndpointKey]) -> None:
        m = self.maps[name]
        wanted = {bytes(k) for k in keys}
        m.delete_many([k for k in list(m.keys()) if bytes(k) not in wanted])
        m.update_many([(k, ct.c_uint8(1)) for k in keys])

    def identity_entries(self, name: str) -> dict[int, int]:
        """cgroup_identity, cgroup_inherit or process_identity as the kernel holds it now (what a previous agent wrote)."""
        return {int(k.value): int(v.value) for k, v in self.maps[name].items()}

    # ---- counters ----
    def counters(self) -> list[int]:
        """verdict_counters summed over CPUs, one int per slot (see abi.h)."""
        fd = self.map_fds["verdict_counters"]
        vals = (ct.c_uint64 * self._ncpu)()
        out = []
        for i in range(abi.COUNTER_SLOTS):
            out.append(sum(vals) if bpfsys.map_lookup(fd, ct.c_uint32(i), vals) else 0)
        return out

    def decision_counts(self) -> dict[tuple[int, int, int, int, bool], int]:
        """decision_counts summed over CPUs: (src, dst, hook, verdict, deprecated) -> decisions (read at scrape)."""
        fd = self.map_fds["decision_counts"]
        key, nxt = abi.DecisionCountKey(), abi.DecisionCountKey()
        vals = (ct.c_uint64 * self._ncpu)()
        out: dict[tuple[int, int, int, int, bool], int] = {}
        ok = bpfsys.map_next_key(fd, None, nxt)
        while ok:
            if bpfsys.map_lookup(fd, nxt, vals):
                out[(nxt.src, nxt.dst, nxt.hook, nxt.verdict, bool(nxt.deprecated))] = sum(vals)
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
            ok = bpfsys.map_next_key(fd, key, nxt)
        return out

    def close(self) -> None:
        """Close our descriptors; everything pinned stays in force."""
        for r in getattr(self, "rings", {}).values():
            r.close()
        for fd in self.map_fds.values():
            os.close(fd)
        self.map_fds.clear()
        self.maps.clear()


def detach_orphans(root: Path, cg_fd: int, ours: Iterable[int]) -> list[str]:
    """Detach aimesh programs attached to root outside our links (left by an agent that pinned nothing)."""
    ours = set(ours)
    gone: list[str] = []
    for p in registry.CGROUP_PROGRAMS:
        for pid in bpfsys.prog_query(cg_fd, p.attach_type):
            if pid in ours:
                continue
            try:
                fd = bpfsys.prog_fd_by_id(pid)
            except bpfsys.BpfError:
                continue
            try:
                info = bpfsys.prog_info(fd)
                if not info.name.startswith("aimesh_"):
                    continue
                try:
                    bpfsys.prog_detach(fd, cg_fd, p.attach_type)
                    gone.append(f"{info.name} (id {pid})")
                except bpfsys.BpfError:
                    pass  # attached by a link of someone else's: not ours to remove
            finally:
                os.close(fd)
    if gone:
        log.warning("detached %d aimesh programs attached to %s outside any pinned link: %s", len(gone), root,
                    ", ".join(gone))
    return gone


__all__ = ["Datapath", "AttachReport", "detach_orphans", "release_free_memory", "MapError"]
