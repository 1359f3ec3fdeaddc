"""Kubernetes selector semantics: LabelSelector edge cases, namespaces, pods, and a property test against a reference."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import UNRESOLVED, LabelRequirement, LabelSelector, PodsSelector, parse_config
from agent.identity.k8s.model import Container, Namespace, Pod
from agent.identity.k8s.selectors import (label_selector_matches, namespace_matches, pod_identity, pods_selected,
                                          requirement_matches)


def sel(**kw) -> LabelSelector:
    return LabelSelector.model_validate(kw)


def pod(uid="u1", ns="shop", labels=None, sa="default", containers=(), ips=("10.1.0.5",)) -> Pod:
    return Pod(uid=uid, namespace=ns, name=f"p-{uid}", labels=labels or {}, service_account=sa, node="n1", ips=ips,
               phase="Running", containers=tuple(containers))


NS = {"shop": Namespace("shop", {"kubernetes.io/metadata.name": "shop", "team": "web"}),
      "models": Namespace("models", {"team": "ml"})}   # no metadata.name label: added as the API server would


def test_empty_selector_matches_all_absent_matches_none():
    assert label_selector_matches(sel(), {})
    assert label_selector_matches(sel(), {"a": "b"})
    assert not label_selector_matches(None, {})
    assert not label_selector_matches(None, {"a": "b"})


def test_match_labels_and_expressions_are_anded():
    s = sel(matchLabels={"app": "chat"}, matchExpressions=[{"key": "tier", "operator": "In", "values": ["web"]}])
    assert label_selector_matches(s, {"app": "chat", "tier": "web", "x": "y"})
    assert not label_selector_matches(s, {"app": "chat", "tier": "db"})
    assert not label_selector_matches(s, {"tier": "web"})
    assert not label_selector_matches(s, {"app": "chat"})


def test_notin_and_doesnotexist_match_objects_without_the_key():
    notin = LabelRequirement(key="env", operator="NotIn", values=["prod"])
    assert requirement_matches(notin, {})
    assert requirement_matches(notin, {"env": "dev"})
    assert not requirement_matches(notin, {"env": "prod"})
    dne = LabelRequirement(key="env", operator="DoesNotExist")
    assert requirement_matches(dne, {}) and not requirement_matches(dne, {"env": ""})
    ex = LabelRequirement(key="env", operator="Exists")
    assert requirement_matches(ex, {"env": ""}) and not requirement_matches(ex, {})
    inn = LabelRequirement(key="env", operator="In", values=["prod", ""])
    assert requirement_matches(inn, {"env": ""}) and not requirement_matches(inn, {})


def test_match_labels_empty_value_needs_the_key():
    assert label_selector_matches(sel(matchLabels={"a": ""}), {"a": ""})
    assert not label_selector_matches(sel(matchLabels={"a": ""}), {})


def test_namespace_by_name_selector_and_metadata_name_label():
    by_name = PodsSelector.model_validate({"namespace": "shop", "podSelector": {}})
    assert namespace_matches(by_name, "shop", {}) is True     # by name: the labels are not needed
    assert namespace_matches(by_name, "models", NS) is False
    by_label = PodsSelector.model_validate({"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {}})
    assert namespace_matches(by_label, "models", NS) is True
    assert namespace_matches(by_label, "shop", NS) is False
    assert namespace_matches(by_label, "unknown", NS) is None  # not known yet: undecided
    meta = PodsSelector.model_validate({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "models"}},
                                        "podSelector": {}})
    assert namespace_matches(meta, "models", NS) is True
    every = PodsSelector.model_validate({"namespaceSelector": {}, "podSelector": {}})
    assert namespace_matches(every, "shop", NS) and namespace_matches(every, "models", NS)


CFG = parse_config("""
identities:
  - name: chat
    kind: service
    select:
      pods:
        - namespace: shop
          podSelector: {matchLabels: {app: chat}, matchExpressions: [{key: tier, operator: In, values: [web]}]}
          serviceAccount: chat
          container: app
  - name: shop-any
    kind: service
    select: {pods: [{namespaceSelector: {matchLabels: {team: web}}, podSelector: {}}]}
  - name: llama
    kind: model
    select: {pods: [{namespaceSelector: {matchLabels: {team: ml}}, podSelector: {matchLabels: {model: llama}}}]}
""")
APP, SIDE, PAUSE = "a" * 64, "b" * 64, "c" * 64


def test_pod_identity_first_identity_wins_and_every_field_counts():
    p = pod(labels={"app": "chat", "tier": "web"}, sa="chat",
            containers=[Container("app", APP), Container("sidecar", SIDE)])
    assert pod_identity(p, APP, CFG.identities, NS) == "chat"
    assert pod_identity(p, SIDE, CFG.identities, NS) == "shop-any"     # container: app only
    assert pod_identity(p, None, CFG.identities, NS) == "shop-any"     # the pod level is no container
    assert pod_identity(p, PAUSE, CFG.identities, NS) == "shop-any"    # the sandbox: not a listed container
    other_sa = pod(labels={"app": "chat", "tier": "web"}, sa="default", containers=[Container("app", APP)])
    assert pod_identity(other_sa, APP, CFG.identities, NS) == "shop-any"
    m = pod(ns="models", labels={"model": "llama"})
    assert pod_identity(m, None, CFG.identities, NS) == "llama"
    assert pod_identity(pod(ns="models", labels={"model": "x"}), None, CFG.identities, NS) is None


def test_pod_identity_waits_for_what_it_cannot_decide():
    # a container without an id in the status yet: this cgroup may be it, and an `app` entry comes first
    p = pod(labels={"app": "chat", "tier": "web"}, sa="chat", containers=[Container("app", "")])
    assert pod_identity(p, APP, CFG.identities, NS) == UNRESOLVED
    # a namespace whose labels are not known yet, with namespaceSelector entries
    q = pod(ns="fresh", labels={"model": "llama"})
    assert pod_identity(q, None, CFG.identities, NS) == UNRESOLVED
    assert pod_identity(q, None, CFG.identities, {**NS, "fresh": Namespace("fresh", {})}) is None


def test_pods_selected_across_nodes():
    s = PodsSelector.model_validate({"namespace": "models", "podSelector": {"matchLabels": {"model": "llama"}}})
    pods = [pod("1", "models", {"model": "llama"}), pod("2", "models", {"model": "other"}),
            pod("3", "shop", {"model": "llama"})]
    assert [p.uid for p in pods_selected(s, pods, NS)] == ["1"]


# ---- property: the implementation against a direct reading of the API's definition

KEYS = st.sampled_from(["a", "b", "app", "example.com/tier"])
VALUES = st.sampled_from(["", "x", "y", "web"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


@st.composite
def requirements(draw):
    op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    values = draw(st.lists(VALUES, min_size=1, max_size=3)) if op in ("In", "NotIn") else []
    return {"key": draw(KEYS), "operator": op, "values": values}


SELECTORS = st.one_of(st.none(), st.builds(lambda ml, me: {"matchLabels": ml, "matchExpressions": me},
                                           LABELS, st.lists(requirements(), max_size=3)))


def reference(selector, labels) -> bool:
    """metav1.LabelSelectorAsSelector: nil -> Nothing(); matchLabels k=v become `k In (v)`; then every requirement."""
    if selector is None:
        return False
    reqs = [(k, "In", [v]) for k, v in selector["matchLabels"].items()]
    reqs += [(r["key"], r["operator"], r["values"]) for r in selector["matchExpressions"]]
    for key, op, values in reqs:
        has = key in labels
        ok = {"In": has and labels.get(key) in values, "NotIn": not has or labels.get(key) not in values,
              "Exists": has, "DoesNotExist": not has}[op]
        if not ok:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(SELECTORS, LABELS)
def test_label_selector_matches_the_reference(selector, labels):
    model = None if selector is None else LabelSelector.model_validate(selector)
    assert label_selector_matches(model, labels) == reference(selector, labels)
