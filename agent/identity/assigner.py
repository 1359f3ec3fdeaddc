"""Keeps cgroup_identity and process_identity in step with the config and with cgroups and processes as they appear.

It decides (selectors) and writes through a small interface, so it runs against the real datapath in the agent and
against a dict in unit tests.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

from agent.config import GATEWAY, GATEWAY_CGROUP, UNRESOLVED, Config
from agent.identity import cgroups, processes
from agent.identity.host import listeners
from agent.identity.k8s import cgroup_path
from agent.identity.k8s.resolve import ClusterView, PodResolutionStats
from agent.identity.k8s.selectors import pod_identity
from agent.identity.selectors import cgroup_match, descendants_identity, process_match
from agent.kernel import abi
from agent.kernel.maps import MapError
from agent.policy.identities import IdentityNumbering

log = logging.getLogger("aimesh.identity")


class IdentityMaps(Protocol):
    def set_cgroup_identity(self, cgroup_id: int, identity: int) -> None: ...
    def clear_cgroup_identity(self, cgroup_id: int) -> None: ...
    def set_cgroup_inherit(self, cgroup_id: int, identity: int) -> None: ...
    def clear_cgroup_inherit(self, cgroup_id: int) -> None: ...
    def set_process_identity(self, pid: int, identity: int) -> None: ...
    def clear_process_identity(self, pid: int) -> None: ...
    def set_local_endpoint(self, key: abi.LocalEndpointKey, identity: int) -> None: ...


def _raise(name: str, err: Exception) -> None:
    raise err


class IdentityAssigner:
    """on_full(map name, error) is told when the kernel refuses an entry (a full map); the default re-raises.

    Kubernetes: when an identity selects pods, a cgroup inside a pod's cgroup (agent/identity/k8s/cgroup_path.py)
    is matched by its pod (self.view, replaced by on_cluster_change) before any cgroup glob; while its pod is not
    known it is `unresolved` (compiled from kubernetes.unresolved), and it is assigned again when the pod arrives or
    changes. How long that took goes to `stats`."""

    def __init__(self, maps: IdentityMaps, numbering: IdentityNumbering, mount: Path, root: Path,
                 on_full: Callable[[str, Exception], None] = _raise, view: Optional[ClusterView] = None,
                 stats: Optional[PodResolutionStats] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.maps, self.numbering, self.mount, self.root = maps, numbering, mount, root
        self.on_full = on_full
        self.cgroups: dict[int, int] = {}     # cgroup id -> identity id, as written
        self.inherit: dict[int, int] = {}     # cgroup id -> identity every cgroup below it gets, as written
        self.processes: dict[int, int] = {}   # pid -> identity id, as written
        self.config: Optional[Config] = None
        self.view = view or ClusterView()
        self.stats = stats or PodResolutionStats()
        self.clock = clock
        self.pod_cgroups: dict[int, tuple[str, cgroup_path.PodCgroup]] = {}   # cgroup id -> (path, its pod)
        self.waiting: dict[int, float] = {}   # cgroup id -> when it was first given `unresolved`

    def cgroup_identity(self, rel: str, cid: int) -> Optional[str]:
        """Pods win over cgroup globs; a pod cgroup whose pod is not known is UNRESOLVED. Bookkeeping for the
        re-assignment and the resolution latency happens here."""
        cfg = self.config
        name: Optional[str] = None
        if cfg is not None and cfg.uses_gateway and self.mount / rel.lstrip("/") == self.root / GATEWAY_CGROUP:
            return GATEWAY   # the L7 gateway's own cgroup (agent/gateway/supervisor.py spawns it there)
        if cfg is not None and any(i.select.pods for i in cfg.identities):
            pc = cgroup_path.parse(rel)
            if pc is not None:
                self.pod_cgroups[cid] = (rel, pc)
                pod = self.view.pod(pc.pod_uid)
                name = UNRESOLVED if pod is None else pod_identity(pod, pc.container_id, cfg.identities,
                                                                     self.view.namespaces)
        if name == UNRESOLVED:
            if cid not in self.waiting:
                self.waiting[cid] = self.clock()
                self.stats.assigned_unresolved()
        else:
            t0 = self.waiting.pop(cid, None)
            if t0 is not None:
                self.stats.resolved(max(0.0, self.clock() - t0))
        self.stats.unresolved_now = len(self.waiting)
        if name is not None:
            return name
        return cgroup_match(rel, cfg.identities) if cfg is not None else None

    def inherit_identity(self, rel: str, name: Optional[str]) -> Optional[str]:
        """The identity the kernel may give a not-yet-classified cgroup below rel (cgroup_inherit), or None. Only
        cgroup globs are certain before the agent looks: with pod selectors, or the gateway's cgroup below rel, none."""
        cfg = self.config
        if cfg is None or name is None or name in (GATEWAY, UNRESOLVED):
            return None
        if any(i.select.pods for i in cfg.identities):
            return None
        full = self.mount / rel.lstrip("/")
        if cfg.uses_gateway:
            try:
                (self.root / GATEWAY_CGROUP).relative_to(full)
                return None
            except ValueError:
                pass
        below = descendants_identity(rel, cfg.identities)
        return name if below == name else None

    def _alive(self, rel: str, cid: int) -> bool:
        """The cgroup at rel is still the one with this id (ids are never reused; a removed one is gone for good)."""
        try:
            return cgroups.cgroup_id(self.mount / rel.lstrip("/")) == cid
        except OSError:
            return False

    def _forget_if_removed(self, rel: str, cid: int) -> None:
        """Written after the cgroup_rmdir program already deleted the entries (removed between the event or the walk
        and the write): delete them again, or they stay for good. Checked after the write, so a removal after this
        check is the kernel's to clean up."""
        if self._alive(rel, cid):
            return
        if self.cgroups.pop(cid, None) is not None:
            self.maps.clear_cgroup_identity(cid)
        if self.inherit.pop(cid, None) is not None:
            self.maps.clear_cgroup_inherit(cid)

    def on_cluster_change(self, view: ClusterView) -> int:
        """Pods or namespaces changed: assign every known pod cgroup again; returns how many entries changed."""
        self.view = view
        if self.config is None:
            return 0
        changed = 0
        for cid, (rel, _pc) in list(self.pod_cgroups.items()):
            name = self.cgroup_identity(rel, cid)
            want = self.numbering.id_of(name) if name else None
            if want == self.cgroups.get(cid):
                continue
            changed += 1
            if want is None:
                self.maps.clear_cgroup_identity(cid)
                del self.cgroups[cid]
            elif self._guard("cgroup_identity", self.maps.set_cgroup_identity)(cid, want):
                self.cgroups[cid] = want
                log.info("cgroup %s -> %s", rel, name)
        return changed

    def prune_pod_cgroups(self) -> None:
        """Forget pod cgroups that were removed (kubelet deletes them with the pod)."""
        for cid, (rel, _pc) in list(self.pod_cgroups.items()):
            if not (self.mount / rel.lstrip("/")).is_dir():
                del self.pod_cgroups[cid]
                self.waiting.pop(cid, None)
        self.stats.unresolved_now = len(self.waiting)

    # ---- full passes (start, reload) ----
    def resync(self, config: Config) -> None:
        self.config = config
        seen: dict[int, int] = {}
        self.pod_cgroups = {}
        walked: set[int] = set()
        seen_inherit: dict[int, int] = {}
        rels: dict[int, str] = {}
        for rel, cid in cgroups.walk(self.mount, self.root):
            walked.add(cid)
            rels[cid] = rel
            name = self.cgroup_identity(rel, cid)
            if name:
                seen[cid] = self.numbering.id_of(name)
            below = self.inherit_identity(rel, name)
            if below:
                seen_inherit[cid] = self.numbering.id_of(below)
        for cid in [c for c in self.waiting if c not in walked]:
            del self.waiting[cid]
        self.stats.unresolved_now = len(self.waiting)
        # inherit entries that no longer hold go before the identities change, new ones after
        self._diff(self.inherit, {c: v for c, v in seen_inherit.items() if self.inherit.get(c) == v},
                   self._guard("cgroup_inherit", self.maps.set_cgroup_inherit), self.maps.clear_cgroup_inherit)
        self._diff(self.cgroups, seen, self._guard("cgroup_identity", self.maps.set_cgroup_identity),
                   self.maps.clear_cgroup_identity)
        self._diff(self.inherit, seen_inherit, self._guard("cgroup_inherit", self.maps.set_cgroup_inherit),
                   self.maps.clear_cgroup_inherit)
        for cid, rel in rels.items():
            self._forget_if_removed(rel, cid)
        procs: dict[int, int] = {}
        if any(i.select.processes for i in config.identities):
            for pid in processes.all_pids():
                info = processes.read_process(pid)
                name = process_match(info[0], info[1], config.identities, info[2], info[3]) if info else None
                if name:
                    procs[pid] = self.numbering.id_of(name)
        self._diff(self.processes, procs, self._guard("process_identity", self.maps.set_process_identity),
                   self.maps.clear_process_identity)
        self._seed_listeners()
        log.info("identities assigned: %d cgroups, %d processes", len(self.cgroups), len(self.processes))

    def _seed_listeners(self) -> None:
        """Servers that bound before the agent started: their sockets become endpoints of their identity."""
        for lst in listeners():
            ident = self.processes.get(lst.pid)
            if ident is None:
                cid = _pid_cgroup_id(self.mount, lst.pid)
                ident = self.cgroups.get(cid) if cid is not None else None
            if ident is None:
                continue
            k = abi.LocalEndpointKey()
            k.addr[:] = lst.addr
            k.port, k.proto = lst.port, lst.proto
            self._guard("local_endpoint_identity", self.maps.set_local_endpoint)(k, ident)

    def _guard(self, name: str, fn):
        """fn, with a refused entry (MapError) reported to on_full instead of raised; returns whether it was written."""
        def call(*args) -> bool:
            try:
                fn(*args)
                return True
            except MapError as e:
                self.on_full(name, e)
                return False
        return call

    @staticmethod
    def _diff(current: dict[int, int], wanted: dict[int, int], set_fn, clear_fn) -> None:
        for key in list(current):
            if key not in wanted:
                clear_fn(key)
                del current[key]
        for key, ident in wanted.items():
            if current.get(key) != ident:
                if set_fn(key, ident) is False:
                    current.pop(key, None)
                    continue
                current[key] = ident

    # ---- events ----
    def on_cgroup_created(self, rel_path: str, cgroup_id: int) -> Optional[str]:
        if self.config is None:
            return None
        full = self.mount / rel_path.lstrip("/")
        try:
            full.relative_to(self.root)
        except ValueError:
            return None  # outside the subtree we govern
        name = self.cgroup_identity(rel_path, cgroup_id)
        if name:
            ident = self.numbering.id_of(name)
            if self._guard("cgroup_identity", self.maps.set_cgroup_identity)(cgroup_id, ident):
                self.cgroups[cgroup_id] = ident
                log.info("cgroup %s -> %s", rel_path, name)
        below = self.inherit_identity(rel_path, name)
        if below and self._guard("cgroup_inherit", self.maps.set_cgroup_inherit)(cgroup_id, self.numbering.id_of(below)):
            self.inherit[cgroup_id] = self.numbering.id_of(below)
        self._forget_if_removed(rel_path, cgroup_id)
        return name

    def on_exec(self, pid: int) -> Optional[str]:
        if self.config is None:
            return None
        info = processes.read_process(pid)
        name = process_match(info[0], info[1], self.config.identities, info[2], info[3]) if info else None
        if name:
            ident = self.numbering.id_of(name)
            if self._guard("process_identity", self.maps.set_process_identity)(pid, ident):
                self.processes[pid] = ident
                log.info("process %d (%s) -> %s", pid, info[0], name)
        elif pid in self.processes:
            # exec'd into something that no longer matches
            self.maps.clear_process_identity(pid)
            del self.processes[pid]
        return name

    def prune_local_endpoints(self, entries, delete) -> int:
        """Drop bound-port entries no socket holds any more (a server that exited); returns how many."""
        held = {(lst.addr, lst.port, lst.proto) for lst in listeners()}
        gone = [k for k in entries if (bytes(k.addr), k.port, k.proto) not in held]
        for k in gone:
            delete(k)
        return len(gone)

    def prune_processes(self, alive) -> None:
        """Forget pids that exited (the kernel deletes their map entries itself)."""
        for pid in [p for p in self.processes if not alive(p)]:
            del self.processes[pid]


def _pid_cgroup_id(mount: Path, pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return cgroups.cgroup_id(mount / line[3:].lstrip("/"))
    except OSError:
        return None
    return None
