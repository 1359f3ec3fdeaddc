"""What aimesh keeps of the Kubernetes API: neutral, immutable records and one store.

The watch (agent/identity/k8s/watch.py) fills a ClusterState from the API server; the identity side (selectors, the
assigner, the endpoint compile) reads it. Nothing here talks to the network or the kernel, so both sides are tested
against a ClusterState built by hand.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    container_id: str          # runtime id without the scheme ("containerd://" stripped), "" while not started


@dataclass(frozen=True, slots=True)
class Pod:
    uid: str                   # metadata.uid (for a static pod: the config hash UID kubelet uses in the cgroup path)
    namespace: str
    name: str
    labels: Mapping[str, str]
    service_account: str
    node: str
    ips: tuple[str, ...]       # status.podIPs
    phase: str                 # status.phase
    containers: tuple[Container, ...] = ()
    host_network: bool = False
    mirror_of: str = ""        # the static pod's config hash (annotation kubernetes.io/config.mirror), else ""


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str]  # includes kubernetes.io/metadata.name


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str              # TCP | UDP | SCTP


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]   # spec.clusterIPs, without "None"
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str               # label kubernetes.io/service-name
    addresses: tuple[str, ...] # of endpoints whose conditions.ready is not false
    ports: tuple[ServicePort, ...]


@dataclass
class ClusterState:
    """The objects the agent knows, keyed as the API keys them; `on_change(kind)` is called after every change
    (kind: "pods" | "namespaces" | "services" | "endpointslices") from the thread that made it."""
    pods: dict[str, Pod] = field(default_factory=dict)                       # uid -> pod
    namespaces: dict[str, Namespace] = field(default_factory=dict)           # name -> namespace
    services: dict[tuple[str, str], Service] = field(default_factory=dict)   # (namespace, name) -> service
    endpointslices: dict[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    on_change: Callable[[str], None] = lambda _kind: None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def replace(self, kind: str, objects: Iterable) -> None:
        """A full list (start, or a re-list after 410 Gone): what is not in it is gone."""
        table = getattr(self, kind)
        with self.lock:
            table.clear()
            for o in objects:
                table[_key(kind, o)] = o
        self.on_change(kind)

    def upsert(self, kind: str, obj) -> None:
        with self.lock:
            getattr(self, kind)[_key(kind, obj)] = obj
        self.on_change(kind)

    def delete(self, kind: str, obj) -> None:
        with self.lock:
            getattr(self, kind).pop(_key(kind, obj), None)
        self.on_change(kind)


def _key(kind: str, o):
    if kind == "pods":
        return o.uid
    if kind == "namespaces":
        return o.name
    if kind in ("services", "endpointslices"):
        return (o.namespace, o.name)
    raise ValueError(f"unknown kind {kind!r}")
