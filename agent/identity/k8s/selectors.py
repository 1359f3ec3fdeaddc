"""Kubernetes selector semantics, pure: LabelSelector, namespaces by name or labels, pods (local and remote).

As the API defines them (k8s.io/apimachinery labels.Selector, metav1.LabelSelectorAsSelector):
  - matchLabels and matchExpressions are ANDed; a selector with neither ({}) matches everything; no selector matches
    nothing;
  - In: the key is there and its value is listed; NotIn: the key is absent or its value is not listed;
    Exists / DoesNotExist: the key is there / absent;
  - a namespace also carries the label kubernetes.io/metadata.name = its name (the API server sets it; added here
    when a namespace object lacks it).

Local pods answer three ways: an identity name, None (no identity claims it), or UNRESOLVED when an entry that
comes first cannot be decided yet (the namespace's labels or the container's name are not known): the cgroup waits
as `unresolved` rather than take an identity that a later event would change.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

from agent.config import UNRESOLVED, Identity, LabelRequirement, LabelSelector, PodSelector, PodsSelector
from agent.identity.k8s.model import Namespace, Pod

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def requirement_matches(req: LabelRequirement, labels: Mapping[str, str]) -> bool:
    op = req.operator
    if op == "In":
        return req.key in labels and labels[req.key] in req.values
    if op == "NotIn":
        return req.key not in labels or labels[req.key] not in req.values
    if op == "Exists":
        return req.key in labels
    if op == "DoesNotExist":
        return req.key not in labels
    raise ValueError(f"operator {op!r}")


def label_selector_matches(sel: Optional[LabelSelector], labels: Mapping[str, str]) -> bool:
    if sel is None:
        return False
    for k, v in sel.match_labels.items():
        if labels.get(k) != v:
            return False
    return all(requirement_matches(r, labels) for r in sel.match_expressions)


def namespace_labels(name: str, namespaces: Mapping[str, Namespace]) -> Optional[Mapping[str, str]]:
    """The namespace's labels with kubernetes.io/metadata.name; None while the namespace is not known."""
    ns = namespaces.get(name)
    if ns is None:
        return None
    if ns.labels.get(NAMESPACE_NAME_LABEL) == name:
        return ns.labels
    return {**ns.labels, NAMESPACE_NAME_LABEL: name}


def namespace_matches(entry: PodSelector | PodsSelector, name: str,
                      namespaces: Mapping[str, Namespace]) -> Optional[bool]:
    """By name, or by namespaceSelector over its labels; None when a selector needs labels not known yet."""
    if entry.namespace is not None:
        return name == entry.namespace
    labels = namespace_labels(name, namespaces)
    if labels is None:
        return None
    return label_selector_matches(entry.namespace_selector, labels)


def container_name(pod: Pod, container_id: Optional[str]) -> tuple[Optional[str], bool]:
    """(the container's name, whether that is known) for a cgroup's container id. None, known: the pod level,
    CRI-O's conmon, the sandbox (pause) container or a container the status no longer lists; unknown while some
    container of the pod has no id in the status yet (the cgroup may be that one's)."""
    if container_id is None:
        return None, True
    for c in pod.containers:
        if c.container_id == container_id:
            return c.name, True
    if any(not c.container_id for c in pod.containers):
        return None, False
    return None, True


def _and(*parts: Optional[bool]) -> Optional[bool]:
    if any(p is False for p in parts):
        return False
    if any(p is None for p in parts):
        return None
    return True


def pod_entry_matches(entry: PodSelector, pod: Pod, container: Optional[str], container_known: bool,
                      namespaces: Mapping[str, Namespace]) -> Optional[bool]:
    """Every field the entry gives, ANDed; None when it cannot be decided yet."""
    sa = entry.service_account is None or pod.service_account == entry.service_account
    if entry.container is None:
        cont: Optional[bool] = True
    elif not container_known:
        cont = None
    else:
        cont = container == entry.container
    return _and(sa, label_selector_matches(entry.pod_selector, pod.labels), cont,
                namespace_matches(entry, pod.namespace, namespaces))


def pod_identity(pod: Pod, container_id: Optional[str], identities: Sequence[Identity],
                 namespaces: Mapping[str, Namespace]) -> Optional[str]:
    """The first identity (file order) with a matching select.pods entry; UNRESOLVED when an earlier entry cannot
    be decided yet; None when none matches."""
    name, known = container_name(pod, container_id)
    for ident in identities:
        for entry in ident.select.pods:
            m = pod_entry_matches(entry, pod, name, known, namespaces)
            if m is None:
                return UNRESOLVED
            if m:
                return ident.name
    return None


def pods_selected(sel: PodsSelector, pods: Iterable[Pod], namespaces: Mapping[str, Namespace]) -> list[Pod]:
    """The pods (any node) a `pods:` endpoint names; a namespace whose labels are not known selects nothing yet."""
    return [p for p in pods
            if namespace_matches(sel, p.namespace, namespaces) and label_selector_matches(sel.pod_selector, p.labels)]
