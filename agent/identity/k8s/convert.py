"""API JSON -> model.py records, pure: bytes in, frozen records out (no network, no state).

Decoding goes straight from the wire bytes into small msgspec Structs that name only the fields aimesh keeps: the rest of
a pod (volumes, probes, env, managedFields...) is skipped by the decoder and never becomes a Python object. That keeps a
10k-pod list fast and its transient memory small (bench/k8s_scale.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from sys import intern
from typing import Generic, TypeVar

import msgspec

from agent.identity.k8s.model import (
    Container,
    EndpointSlice,
    Namespace,
    Pod,
    Service,
    ServicePort,
)

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Record = Pod | Namespace | Service | EndpointSlice


class _Meta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    cont: str = msgspec.field(default="", name="continue")


class _Named(msgspec.Struct):
    name: str = ""


class _ContainerStatus(msgspec.Struct):
    name: str = ""
    containerID: str = ""


class _PodIP(msgspec.Struct):
    ip: str = ""


class _PodSpec(msgspec.Struct):
    nodeName: str = ""
    serviceAccountName: str = ""
    serviceAccount: str = ""
    hostNetwork: bool = False
    containers: list[_Named] | None = None
    initContainers: list[_Named] | None = None
    ephemeralContainers: list[_Named] | None = None


class _PodStatus(msgspec.Struct):
    phase: str = ""
    podIP: str = ""
    podIPs: list[_PodIP] | None = None
    containerStatuses: list[_ContainerStatus] | None = None
    initContainerStatuses: list[_ContainerStatus] | None = None
    ephemeralContainerStatuses: list[_ContainerStatus] | None = None


class _Pod(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _PodStatus = msgspec.field(default_factory=_PodStatus)


class _Namespace(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _Port(msgspec.Struct):
    name: str = ""
    port: int | None = None
    protocol: str = "TCP"


class _ServiceSpec(msgspec.Struct):
    clusterIP: str = ""
    clusterIPs: list[str] | None = None
    ports: list[_Port] | None = None


class _Service(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _ServiceSpec = msgspec.field(default_factory=_ServiceSpec)


class _Conditions(msgspec.Struct):
    ready: bool | None = None


class _Endpoint(msgspec.Struct):
    addresses: list[str] | None = None
    conditions: _Conditions = msgspec.field(default_factory=_Conditions)


class _EndpointSlice(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    endpoints: list[_Endpoint] | None = None
    ports: list[_Port] | None = None


class _MetaOnly(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class Status(msgspec.Struct):
    """metav1.Status: what the API server answers on an error (HTTP body, or the object of a watch ERROR event)."""
    code: int = 0
    reason: str = ""
    message: str = ""


T = TypeVar("T")


class _List(msgspec.Struct, Generic[T]):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[T] | None = None


class _Event(msgspec.Struct):
    type: str
    object: msgspec.Raw


def _strip_scheme(container_id: str) -> str:
    """"containerd://abc" -> "abc" (also cri-o://, docker://)."""
    _, sep, rest = container_id.partition("://")
    return rest if sep else container_id


def _pod(p: _Pod) -> Pod:
    md, spec, st = p.metadata, p.spec, p.status
    ids: dict[str, str] = {}
    for statuses in (st.containerStatuses, st.initContainerStatuses, st.ephemeralContainerStatuses):
        for cs in statuses or ():
            ids[cs.name] = _strip_scheme(cs.containerID)
    containers = tuple(Container(intern(c.name), ids.get(c.name, ""))
                       for group in (spec.containers, spec.initContainers, spec.ephemeralContainers)
                       for c in group or ())
    ips = tuple(i.ip for i in st.podIPs or () if i.ip) or ((st.podIP,) if st.podIP else ())
    mirror = (md.annotations or {}).get(MIRROR_ANNOTATION, "")
    return Pod(uid=mirror or md.uid, namespace=intern(md.namespace), name=md.name, labels=_labels(md.labels),
               service_account=intern(spec.serviceAccountName or spec.serviceAccount), node=intern(spec.nodeName),
               ips=ips, phase=intern(st.phase), containers=containers, host_network=spec.hostNetwork, mirror_of=mirror)


def _labels(labels: dict[str, str] | None) -> dict[str, str]:
    """Label keys and values repeat across thousands of pods: one string object each (sys.intern) instead of one
    per pod."""
    return {intern(k): intern(v) for k, v in labels.items()} if labels else {}


def _namespace(n: _Namespace) -> Namespace:
    labels = dict(n.metadata.labels or {})
    labels.setdefault(NAMESPACE_NAME_LABEL, n.metadata.name)   # set by the API server since 1.21; older ones lack it
    return Namespace(name=n.metadata.name, labels=labels)


def _ports(ports: list[_Port] | None) -> tuple[ServicePort, ...]:
    return tuple(ServicePort(p.name, p.port or 0, p.protocol or "TCP") for p in ports or ())


def _service(s: _Service) -> Service:
    ips = s.spec.clusterIPs or ([s.spec.clusterIP] if s.spec.clusterIP else [])
    return Service(namespace=s.metadata.namespace, name=s.metadata.name,
                   cluster_ips=tuple(ip for ip in ips if ip and ip != "None"), ports=_ports(s.spec.ports))


def _endpointslice(e: _EndpointSlice) -> EndpointSlice:
    # discovery.k8s.io/v1: "ready" unset means ready (the consumer must treat nil as true)
    addresses = tuple(a for ep in e.endpoints or () if ep.conditions.ready is not False for a in ep.addresses or ())
    return EndpointSlice(namespace=e.metadata.namespace, name=e.metadata.name,
                         service=(e.metadata.labels or {}).get(SERVICE_NAME_LABEL, ""), addresses=addresses,
                         ports=_ports(e.ports))


@dataclass(frozen=True)
class _Kind:
    api_type: type
    convert: Callable[[object], Record]
    list_decoder: msgspec.json.Decoder
    object_decoder: msgspec.json.Decoder


def _kind(api_type: type, convert: Callable) -> _Kind:
    return _Kind(api_type, convert, msgspec.json.Decoder(_List[api_type]), msgspec.json.Decoder(api_type))


KINDS: Mapping[str, _Kind] = {
    "pods": _kind(_Pod, _pod),
    "namespaces": _kind(_Namespace, _namespace),
    "services": _kind(_Service, _service),
    "endpointslices": _kind(_EndpointSlice, _endpointslice),
}

_event_decoder = msgspec.json.Decoder(_Event)
_meta_decoder = msgspec.json.Decoder(_MetaOnly)
_status_decoder = msgspec.json.Decoder(Status)


class DecodeError(ValueError):
    """The API server sent bytes that are not the object they should be."""


@dataclass(frozen=True)
class Page:
    resource_version: str
    cont: str                 # the "continue" token of a paginated list, "" on the last page
    items: Sequence[Record]


@dataclass(frozen=True)
class Event:
    type: str                 # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    resource_version: str     # of the object ("" for ERROR)
    record: Record | None = None      # None for BOOKMARK and ERROR
    status: Status | None = None      # for ERROR


def decode_list(kind: str, data: bytes) -> Page:
    k = KINDS[kind]
    try:
        lst = k.list_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DecodeError(f"{kind} list: {e}") from None
    return Page(lst.metadata.resourceVersion, lst.metadata.cont, [k.convert(o) for o in lst.items or ()])


def decode_event(kind: str, line: bytes) -> Event:
    """One line of a watch stream: {"type": ..., "object": ...}."""
    try:
        ev = _event_decoder.decode(line)
        if ev.type == "ERROR":
            return Event("ERROR", "", status=_status_decoder.decode(ev.object))
        if ev.type == "BOOKMARK":
            return Event("BOOKMARK", _meta_decoder.decode(ev.object).metadata.resourceVersion)
        if ev.type not in ("ADDED", "MODIFIED", "DELETED"):
            raise DecodeError(f"{kind} watch: unknown event type {ev.type!r}")
        k = KINDS[kind]
        obj = k.object_decoder.decode(ev.object)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DecodeError(f"{kind} watch event: {e}") from None
    return Event(ev.type, obj.metadata.resourceVersion, record=k.convert(obj))


def decode_status(data: bytes) -> Status:
    """The Status body of an error reply; an empty Status when the body is not one (a proxy's HTML page)."""
    try:
        return _status_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Status()


def _field(e: object, name: str) -> object:
    return e.get(name) if isinstance(e, Mapping) else getattr(e, name, None)


def label_selector(match_labels: Mapping[str, str] | None = None,
                   match_expressions: Sequence[object] | None = None) -> str:
    """A metav1.LabelSelector as the API's labelSelector query string ("a=b,tier in (web),!legacy"). Expressions are
    mappings ({key, operator, values}) or objects with those attributes (agent/config.py's LabelRequirement).
    Raises ValueError naming the operator it does not know."""
    parts = [f"{k}={v}" for k, v in sorted((match_labels or {}).items())]
    for e in match_expressions or ():
        key, op = str(_field(e, "key")), str(_field(e, "operator"))
        values = ",".join(sorted(str(v) for v in _field(e, "values") or ()))   # type: ignore[union-attr]
        if op == "In":
            parts.append(f"{key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({values})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise ValueError(f"matchExpressions operator: {op!r} is not In, NotIn, Exists or DoesNotExist")
    return ",".join(parts)
