"""The agent's Kubernetes identity source: the one object the daemon starts, ticks and stops.

It owns the ClusterState and the API watch that fills it (agent/identity/k8s/watch.py), turns watch changes (flags set
from the watch threads) into work on the agent loop's thread: pod cgroups assigned again after pod or namespace
changes, the endpoint map re-applied after cluster changes (debounced), and says what a reload may not change
(`needs`). It also answers "which pod container is this cgroup" for records (`workload`), from the assigner's pod
lookup, cached per cgroup id.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client.core import CounterMetricFamily

from agent.config import (
    DNS_SUBDOMAIN_RE,
    Config,
    PodsEndpoint,
    PodsSelector,
    ServiceEndpoint,
)
from agent.errors import AgentError
from agent.flows.model import WorkloadData
from agent.identity import cgroups
from agent.identity.k8s.model import ClusterState, Pod
from agent.identity.k8s.resolve import (
    ClusterView,
    Debouncer,
    PodResolutionStats,
    resolve_endpoints,
    snapshot,
)
from agent.identity.k8s.selectors import container_name

log = logging.getLogger("aimesh.k8s")

ENDPOINTS_DEBOUNCE_S = 0.2   # cluster changes re-apply the endpoint map at most this often
SYNC_WAIT_S = 5.0            # at start, how long the first lists may take before cgroups are assigned
MAX_WORKLOADS = 65536        # cached cgroup -> workload entries (the cgroup_identity map's default capacity)
MAX_PIDS = 16384             # cached pid -> cgroup id entries (model calls name a pid, not a cgroup)


def remote_pod_selectors(config: Config) -> list[PodsSelector]:
    """The `pods:` endpoints' selectors, in file order without repeats: what the remote-pod watches ask for."""
    out: list[PodsSelector] = []
    for i in config.identities:
        for e in i.k8s_endpoints:
            if isinstance(e, PodsEndpoint) and e.pods not in out:
                out.append(e.pods)
    return out


def service_names(config: Config) -> list[str]:
    """The Services the `service:` endpoints name (sorted, without repeats): only their EndpointSlices are watched."""
    return sorted({e.service.name for i in config.identities for e in i.k8s_endpoints
                   if isinstance(e, ServiceEndpoint)})


def needs(config: Config | None, kubeconfig: Path | None = None, node_name: str | None = None) -> tuple:
    """What the watch is started with (settings, remote-pod scopes, named Services): a reload that changes it needs
    a restart. The flags override the config as at start."""
    if config is None or not config.uses_kubernetes:
        return (False,)
    k = config.k8s
    return (True, str(kubeconfig or k.kubeconfig or ""), node_name or k.node_name or "",
            tuple(s.model_dump_json() for s in remote_pod_selectors(config)), tuple(service_names(config)))


def workload_of(pod: Pod, container_id: str | None) -> WorkloadData:
    name, _known = container_name(pod, container_id)
    return WorkloadData(namespace=pod.namespace, pod=pod.name, container=name or "",
                        service_account=pod.service_account)


_NEEDS = ("the kubernetes section", "kubernetes.kubeconfig (or --kubeconfig)", "kubernetes.node_name (or --node-name)",
          "the pods: endpoints (one remote-pod watch each)",
          "the service: endpoints (only their Services' EndpointSlices are watched)")


def needs_changed(old: tuple, new: tuple) -> str | None:
    """What differs between two needs() tuples, in words; None when nothing does."""
    if old == new:
        return None
    if old[0] != new[0]:
        return "whether the agent watches Kubernetes (" + _NEEDS[0] + ", pod selectors or endpoints)"
    return ", ".join(w for w, a, b in zip(_NEEDS[1:], old[1:], new[1:], strict=True) if a != b)


class PodAssigner(Protocol):
    """What the source needs of agent/identity/assigner.IdentityAssigner."""
    view: ClusterView
    pod_cgroups: dict

    def on_cluster_change(self, view: ClusterView) -> int: ...


class StartWatch(Protocol):
    def __call__(self, state: ClusterState, node_name: str, kubeconfig: str | None = None,
                 need_all_pods: bool = False, pod_scopes: Sequence = (),
                 service_names: Sequence[str] | None = None): ...


class KubernetesSource:
    """cluster: a ClusterState someone else fills (tests); else start() starts the agent's own watch.
    kubeconfig, node_name: the command line's, over the config's."""

    def __init__(self, cluster: ClusterState | None = None, kubeconfig: Path | None = None,
                 node_name: str | None = None, stats: PodResolutionStats | None = None,
                 mount: Path | None = None) -> None:
        self.cluster = cluster
        self.kubeconfig, self.node_name = kubeconfig, node_name
        self.stats = stats or PodResolutionStats()
        self.mount = mount                 # the cgroup2 mount, to find a pid's cgroup
        self.watch = None                  # agent/identity/k8s/watch.Watch when start() started one
        self.assigner: PodAssigner | None = None
        self.apply_failures = 0
        self._pods_changed = False         # set from the watch threads; turn() re-assigns
        self._endpoints_changed = Debouncer(ENDPOINTS_DEBOUNCE_S)
        self._workloads: dict[int, WorkloadData | None] = {}
        self._pid_cgroups: dict[int, int | None] = {}

    @property
    def active(self) -> bool:
        return self.cluster is not None

    def needs(self, config: Config | None) -> tuple:
        return needs(config, self.kubeconfig, self.node_name)

    def reload_refusal(self, old: Config | None, new: Config) -> str | None:
        """Why `new` cannot be applied by a reload (the watch is set up at start), in one line; None when it can."""
        what = needs_changed(self.needs(old), self.needs(new)) if old is not None else None
        if what is None:
            return None
        return (f"kubernetes: what the agent watches changed ({what}); the watch is set up at start, so this reload "
                "changes nothing: restart the agent to apply it")

    # ---- start / stop ----
    def start(self, config: Config, sync_wait_s: float = SYNC_WAIT_S,
              start_watch: StartWatch | None = None) -> None:
        """When the config uses Kubernetes: the ClusterState (the agent's own watch unless one was given) and the
        change hook. The first lists get sync_wait_s before cgroups are assigned (fewer `unresolved`). AgentError,
        one line, when the watch cannot be set up."""
        if not config.uses_kubernetes:
            return
        if self.cluster is None:
            try:
                from agent.identity.k8s.watch import WatchConfigError, pod_scope
                from agent.identity.k8s.watch import start_watch as default_start
            except ImportError as e:
                raise AgentError(f"kubernetes: the API watch is not available ({e})") from None
            k = config.k8s
            node = self.node_name or k.node()
            if not node:
                raise AgentError("kubernetes.node_name: not set, no --node-name and NODE_NAME is empty (set it from "
                                 "the downward API: spec.nodeName)")
            if not DNS_SUBDOMAIN_RE.fullmatch(node) or len(node) > 253:
                raise AgentError(f"node name {node!r} (--node-name, kubernetes.node_name or NODE_NAME) is not a "
                                 "Kubernetes name")
            kubeconfig = self.kubeconfig or k.kubeconfig
            # remote pods: one watch per `pods:` endpoint, filtered by the API server (its namespace when named, its
            # podSelector); a namespaceSelector is applied here, over the namespaces' labels
            sels = remote_pod_selectors(config)
            scopes = [pod_scope(s.namespace, s.pod_selector.match_labels, s.pod_selector.match_expressions)
                      for s in sels]
            cluster = ClusterState()
            try:
                self.watch = (start_watch or default_start)(
                    cluster, node, str(kubeconfig) if kubeconfig else None, need_all_pods=bool(sels),
                    pod_scopes=scopes, service_names=service_names(config))
            except WatchConfigError as e:
                raise AgentError(str(e)) from None
            self.cluster = cluster
            if not self.watch.wait_synced(sync_wait_s):
                log.warning("kubernetes: the first lists took over %.0fs; pods not known yet are `unresolved` "
                            "(kubernetes.unresolved: %s)", sync_wait_s, k.unresolved)
        prev = self.cluster.on_change
        self.cluster.on_change = lambda kind: (prev(kind), self._on_change(kind))

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    def collectors(self) -> list:
        """Prometheus collectors: the resolution stats, the endpoint applies, and the watch's when it runs."""
        return [self.stats, _SourceCollector(self), *([self.watch.collector()] if self.watch is not None else [])]

    # ---- the loop's side ----
    def _on_change(self, kind: str) -> None:
        """Called from the watch threads: only flags; turn() acts."""
        if kind in ("pods", "namespaces"):
            self._pods_changed = True
        self._endpoints_changed.poke()

    def view(self) -> ClusterView:
        return snapshot(self.cluster) if self.cluster is not None else ClusterView()

    def resolve(self, config: Config, view: ClusterView | None = None) -> tuple:
        """The remote ends of the config's service/pods endpoints now (empty without Kubernetes)."""
        if not config.uses_kubernetes:
            return ()
        return resolve_endpoints(config, view if view is not None else self.view())

    def installed(self, assigner: PodAssigner, view: ClusterView) -> None:
        """A full install (start, reload) assigned with this view: records' workloads are looked up again."""
        self.assigner = assigner
        self._workloads.clear()

    def turn(self, config: Config | None, applied: tuple, apply: Callable[[Config, tuple], None]) -> None:
        """One loop turn: re-assign pod cgroups after pod/namespace changes; re-apply the endpoint map after cluster
        changes, debounced, when it resolves to something else than `applied` (apply(config, resolved) raises
        AgentError, ValueError or OSError to keep the previous map)."""
        if self.cluster is None or config is None or self.assigner is None:
            return
        if self._pods_changed:
            self._pods_changed = False
            self._workloads.clear()
            n = self.assigner.on_cluster_change(self.view())
            if n:
                log.info("kubernetes: %d cgroups re-assigned", n)
        if self._endpoints_changed.due() and any(i.k8s_endpoints for i in config.identities):
            resolved = resolve_endpoints(config, self.view())
            if resolved != applied:
                try:
                    apply(config, resolved)
                except (AgentError, ValueError, OSError) as e:
                    self.apply_failures += 1
                    log.error("kubernetes: the endpoint map was not updated, the previous one stays: %s", e)
                    return
                log.info("kubernetes: %d remote endpoints applied", len(resolved))

    # ---- records ----
    def workload(self, cgroup_id: int) -> WorkloadData | None:
        """The pod container a cgroup belongs to (namespace, pod, container, service account), when the assigner
        matched it to a known pod; cached per cgroup id until pods change."""
        try:
            return self._workloads[cgroup_id]
        except KeyError:
            pass
        w: WorkloadData | None = None
        a = self.assigner
        entry = a.pod_cgroups.get(cgroup_id) if a is not None else None
        if entry is not None:
            pod = a.view.pod(entry[1].pod_uid)
            if pod is not None:
                w = workload_of(pod, entry[1].container_id)
        if len(self._workloads) >= MAX_WORKLOADS:
            self._workloads.clear()
        self._workloads[cgroup_id] = w
        return w

    def workload_of_pid(self, pid: int) -> WorkloadData | None:
        """workload() of a process's cgroup (model calls name a pid); the pid's cgroup id is cached."""
        cid = self.note_pid(pid)
        return self.workload(cid) if cid is not None else None

    def note_pid(self, pid: int) -> int | None:
        """The cgroup id of a process, read once and cached (call it early: a process that exited has none)."""
        if self.cluster is None or self.mount is None:
            return None
        try:
            return self._pid_cgroups[pid]
        except KeyError:
            pass
        cid = _pid_cgroup_id(self.mount, pid)
        if len(self._pid_cgroups) >= MAX_PIDS:
            self._pid_cgroups.clear()
        self._pid_cgroups[pid] = cid
        return cid

    def housekeeping(self, alive: Callable[[int], bool]) -> None:
        """Forget exited pids and cgroups the assigner no longer holds."""
        for pid in [p for p in self._pid_cgroups if not alive(p)]:
            del self._pid_cgroups[pid]
        held = self.assigner.pod_cgroups if self.assigner is not None else {}
        for cid in [c for c in self._workloads if c not in held]:
            del self._workloads[cid]


def _pid_cgroup_id(mount: Path, pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return cgroups.cgroup_id(mount / line[3:].strip().lstrip("/"))
    except (OSError, ValueError):
        return None
    return None


class _SourceCollector:
    """aimesh_k8s_endpoint_apply_failures_total, read at scrape time."""

    def __init__(self, source: KubernetesSource) -> None:
        self._source = source

    def collect(self) -> Iterator:
        c = CounterMetricFamily("aimesh_k8s_endpoint_apply_failures",
                                "Cluster changes whose endpoint map could not be applied (the previous map stayed)")
        c.add_metric([], self._source.apply_failures)
        yield c
