"""From a ClusterState to what the identity side needs: a consistent snapshot, the remote ends of `service:` and
`pods:` endpoints (an input of the policy compile), a debounce for re-applying them, and the pod-resolution stats.

Pure apart from snapshot(), which takes the ClusterState's lock for the copy; the clock is an argument.
"""
from __future__ import annotations

import bisect
import ipaddress
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent.config import Config, PodsEndpoint, ServiceEndpoint
from agent.identity.k8s.model import ClusterState, EndpointSlice, Namespace, Pod, Service
from agent.identity.k8s.selectors import pods_selected
from agent.policy.compile import ResolvedEndpoint

GONE_PHASES = ("Succeeded", "Failed")     # their IPs may already belong to another pod


@dataclass(frozen=True)
class ClusterView:
    """A copy of the ClusterState's tables, taken at once, so one pass sees one state."""
    pods: Mapping[str, Pod] = field(default_factory=dict)
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    services: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    endpointslices: Mapping[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    by_mirror: Mapping[str, Pod] = field(default_factory=dict)   # a static pod's config hash -> its mirror pod
    slices_of: Mapping[tuple[str, str], tuple[EndpointSlice, ...]] = field(default_factory=dict)  # by Service

    def pod(self, uid: str) -> Optional[Pod]:
        """The pod a cgroup's UID names: the API's uid, or a static pod's config hash (its mirror pod)."""
        return self.pods.get(uid) or self.by_mirror.get(uid)


def view_of(pods: Mapping[str, Pod], namespaces: Mapping[str, Namespace] = {},
            services: Mapping[tuple[str, str], Service] = {},
            endpointslices: Mapping[tuple[str, str], EndpointSlice] = {}) -> ClusterView:
    slices: dict[tuple[str, str], list[EndpointSlice]] = {}
    for s in endpointslices.values():
        slices.setdefault((s.namespace, s.service), []).append(s)
    return ClusterView(dict(pods), dict(namespaces), dict(services), dict(endpointslices),
                       {p.mirror_of: p for p in pods.values() if p.mirror_of},
                       {k: tuple(v) for k, v in slices.items()})


def snapshot(state: ClusterState) -> ClusterView:
    with state.lock:
        return view_of(state.pods, state.namespaces, state.services, state.endpointslices)


def _net(ip: str):
    a = ipaddress.ip_address(ip)
    return ipaddress.ip_network(a)


def _service_ends(e: ServiceEndpoint, view: ClusterView) -> Iterator[tuple[str, int]]:
    ns, name = e.service.namespace, e.service.name
    svc = view.services.get((ns, name))
    names: Optional[set[str]] = None          # the service ports asked for, by name (EndpointSlice ports follow them)
    if svc is not None:
        ports = e.ports or [p.port for p in svc.ports] or [0]
        for ip in svc.cluster_ips:
            for port in ports:
                yield ip, port
        if e.ports:
            names = {p.name for p in svc.ports if p.port in e.ports}
    for s in view.slices_of.get((ns, name), ()):
        ports = [p.port for p in s.ports if names is None or p.name in names]
        if not s.ports:
            ports = [0]
        for ip in s.addresses:
            for port in ports:
                yield ip, port


def _pod_ends(e: PodsEndpoint, view: ClusterView) -> Iterator[tuple[str, int]]:
    for p in pods_selected(e.pods, view.pods.values(), view.namespaces):
        if p.phase in GONE_PHASES or (p.host_network and not e.ports):
            continue   # a host-network pod's IP is its node's: only its given ports are the pod's
        for ip in p.ips:
            for port in e.ports or [0]:
                yield ip, port


def resolve_endpoints(cfg: Config, view: ClusterView) -> tuple[ResolvedEndpoint, ...]:
    """Every remote end the config's service/pods endpoints name now, in identity order (each identity's sorted),
    without repeats; unparsable addresses are skipped."""
    out: list[ResolvedEndpoint] = []
    seen: set[tuple[str, object, int]] = set()
    for ident in cfg.identities:
        mine: list[ResolvedEndpoint] = []
        for e in ident.k8s_endpoints:
            ends = _service_ends(e, view) if isinstance(e, ServiceEndpoint) else _pod_ends(e, view)
            for ip, port in ends:
                try:
                    net = _net(ip)
                except ValueError:
                    continue
                key = (ident.name, net, port)
                if key not in seen:
                    seen.add(key)
                    mine.append(ResolvedEndpoint(ident.name, net, port))
        mine.sort(key=lambda r: (r.network.version, r.network.network_address.packed, r.port))
        out.extend(mine)
    return tuple(out)


class Debouncer:
    """poke() from any thread; due() from the loop says True at most once per interval, and only after a poke."""

    def __init__(self, interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self._dirty = False
        self._last = float("-inf")

    def poke(self) -> None:
        self._dirty = True

    @property
    def pending(self) -> bool:
        return self._dirty

    def due(self) -> bool:
        now = self.clock()
        if not self._dirty or now - self._last < self.interval_s:
            return False
        self._dirty = False
        self._last = now
        return True


RESOLUTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PodResolutionStats:
    """How long kubepods cgroups waited as `unresolved` for their pod: a Prometheus collector read at scrape time.

    aimesh_k8s_pod_resolution_seconds (histogram): first seen unresolved -> assigned from the pod;
    aimesh_k8s_unresolved_assignments_total: cgroups given `unresolved`; aimesh_k8s_unresolved_cgroups: now."""

    def __init__(self, buckets: tuple[float, ...] = RESOLUTION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.unresolved_total = 0
        self.unresolved_now = 0
        self._lock = threading.Lock()

    def assigned_unresolved(self) -> None:
        with self._lock:
            self.unresolved_total += 1

    def resolved(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def collect(self):
        with self._lock:
            counts, total, now, s = list(self.counts), self.unresolved_total, self.unresolved_now, self.sum
        cum, acc = [], 0
        for b, c in zip(self.buckets + (float("inf"),), counts, strict=True):
            acc += c
            cum.append(("+Inf" if b == float("inf") else repr(b), acc))
        h = HistogramMetricFamily("aimesh_k8s_pod_resolution_seconds",
                                  "Time a kubepods cgroup spent as `unresolved` before its pod was known",
                                  buckets=cum, sum_value=s)
        yield h
        c = CounterMetricFamily("aimesh_k8s_unresolved_assignments",
                                "Kubepods cgroups given the reserved identity `unresolved` (pod not known yet)")
        c.add_metric([], total)
        yield c
        g = GaugeMetricFamily("aimesh_k8s_unresolved_cgroups", "Kubepods cgroups that are `unresolved` now")
        g.add_metric([], now)
        yield g
