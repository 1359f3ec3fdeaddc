"""KubernetesSource, the daemon's one Kubernetes object: what it starts the watch with (scopes, named Services, the
node), what a reload may not change, and the loop's turn (re-assign, debounced endpoint re-apply)."""
from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import parse_config
from agent.errors import AgentError
from agent.identity.k8s.model import ClusterState, Pod, Service, ServicePort
from agent.identity.k8s.source import (
    KubernetesSource,
    needs,
    needs_changed,
    service_names,
)
from agent.identity.k8s.watch import PodScope

CFG = """
identities:
  - name: chat
    kind: service
    select: {pods: [{namespace: shop, podSelector: {matchLabels: {app: chat}}}]}
  - name: llama
    kind: model
    endpoints:
      - {service: {namespace: models, name: llama}, ports: [8000]}
      - {pods: {namespace: models, podSelector: {matchLabels: {model: llama}}}}
  - name: vec
    kind: dataset
    endpoints:
      - {service: {namespace: data, name: qdrant}}
      - {service: {namespace: other, name: llama}}
      - {pods: {namespaceSelector: {matchLabels: {team: data}}, podSelector: {matchExpressions: [{key: app, operator: Exists}]}}}
kubernetes: {unresolved: deny, node_name: node-a}
"""


class FakeWatch:
    def __init__(self, synced: bool = True) -> None:
        self._synced, self.stopped = synced, False

    def wait_synced(self, _t: float) -> bool:
        return self._synced

    def collector(self):
        return "watch-collector"

    def stop(self) -> None:
        self.stopped = True


class Recorder:
    def __init__(self, synced: bool = True) -> None:
        self.calls: list[dict] = []
        self.synced = synced

    def __call__(self, state, node_name, kubeconfig=None, need_all_pods=False, pod_scopes=(), service_names=None):
        self.calls.append({"state": state, "node": node_name, "kubeconfig": kubeconfig,
                           "need_all_pods": need_all_pods, "scopes": list(pod_scopes),
                           "services": service_names})
        return FakeWatch(self.synced)


def test_the_watch_is_started_with_one_scope_per_pods_endpoint_and_the_named_services():
    rec = Recorder()
    src = KubernetesSource(kubeconfig=Path("/k/config"))
    src.start(parse_config(CFG), start_watch=rec)
    (call,) = rec.calls
    assert call["node"] == "node-a" and call["kubeconfig"] == "/k/config" and call["need_all_pods"] is True
    assert call["scopes"] == [PodScope("models", "model=llama"), PodScope("", "app")]
    assert call["services"] == ["llama", "qdrant"]
    assert src.active and call["state"] is src.cluster
    assert src.collectors()[-1] == "watch-collector"
    src.stop()
    assert src.watch.stopped


def test_no_pods_endpoints_no_remote_pod_watch_and_no_service_endpoints_no_service_watch():
    rec = Recorder()
    cfg = parse_config("identities: [{name: chat, kind: service, select: {pods: [{namespace: shop, podSelector: {}}]}}]\n"
                       "kubernetes: {node_name: n1}")
    KubernetesSource().start(cfg, start_watch=rec)
    assert rec.calls[0]["need_all_pods"] is False and rec.calls[0]["scopes"] == []
    assert rec.calls[0]["services"] == []


def test_node_name_flag_over_config_over_environment(monkeypatch):
    rec = Recorder()
    monkeypatch.setenv("NODE_NAME", "from-env")
    KubernetesSource(node_name="from-flag").start(parse_config(CFG), start_watch=rec)
    KubernetesSource().start(parse_config(CFG.replace(", node_name: node-a", "")), start_watch=rec)
    assert [c["node"] for c in rec.calls] == ["from-flag", "from-env"]
    monkeypatch.delenv("NODE_NAME")
    with pytest.raises(AgentError, match=r"^kubernetes.node_name: not set, no --node-name and NODE_NAME is empty"):
        KubernetesSource().start(parse_config(CFG.replace(", node_name: node-a", "")), start_watch=rec)
    with pytest.raises(AgentError, match=r"^node name 'a b' \(--node-name"):
        KubernetesSource(node_name="a b").start(parse_config(CFG), start_watch=rec)


def test_a_plain_config_starts_nothing():
    rec = Recorder()
    src = KubernetesSource()
    src.start(parse_config("identities: [{name: a, kind: service, select: {cgroups: ['/a']}}]"), start_watch=rec)
    assert rec.calls == [] and not src.active and src.collectors()[0] is src.stats and len(src.collectors()) == 2


def test_a_reload_that_changes_what_is_watched_is_refused_in_one_line():
    src = KubernetesSource()
    old = parse_config(CFG)
    assert src.reload_refusal(old, parse_config(CFG)) is None
    # a policy-only change (another port) watches the same
    assert src.reload_refusal(old, parse_config(CFG.replace("ports: [8000]", "ports: [8001]"))) is None
    more = parse_config(CFG.replace("name: qdrant", "name: weaviate"))
    msg = src.reload_refusal(old, more)
    assert msg is not None and "\n" not in msg
    assert "the service: endpoints" in msg and "pods:" not in msg and msg.endswith("restart the agent to apply it")
    msg = src.reload_refusal(old, parse_config(CFG.replace("model: llama}}}", "model: mistral}}}")))
    assert "the pods: endpoints" in msg and "service:" not in msg
    assert "kubernetes.node_name" in src.reload_refusal(old, parse_config(CFG.replace("node-a", "node-b")))
    plain = parse_config("identities: [{name: a, kind: service}]")
    assert "whether the agent watches Kubernetes" in src.reload_refusal(old, plain)
    # the flags win over the config, so the config's node name changing under --node-name changes nothing
    assert KubernetesSource(node_name="n").reload_refusal(old, parse_config(CFG.replace("node-a", "node-b"))) is None


def test_needs_and_its_words():
    cfg = parse_config(CFG)
    assert service_names(cfg) == ["llama", "qdrant"]
    assert needs(None) == (False,) and needs(cfg)[0] is True
    assert needs_changed(needs(cfg), needs(cfg)) is None


class FakeAssigner:
    def __init__(self) -> None:
        self.views: list = []
        self.view = None
        self.pod_cgroups: dict = {}

    def on_cluster_change(self, view) -> int:
        self.views.append(view)
        return 1


def test_turn_reassigns_after_pod_changes_and_reapplies_endpoints_debounced():
    state = ClusterState()
    src = KubernetesSource(cluster=state)
    cfg = parse_config(CFG)
    src.start(cfg)                      # a given ClusterState: no watch of its own, only the change hook
    assert src.watch is None
    a = FakeAssigner()
    src.installed(a, src.view())
    applied: list[tuple] = []
    src.turn(cfg, (), lambda c, r: applied.append(r))
    assert a.views == [] and applied == []          # nothing changed yet
    state.upsert("services", Service("models", "llama", ("10.96.0.10",), (ServicePort("http", 8000, "TCP"),)))
    src.turn(cfg, (), lambda c, r: applied.append(r))
    assert a.views == [] and [str(e.network) for e in applied[0]] == ["10.96.0.10/32"]
    state.upsert("pods", Pod("u1", "shop", "chat-0", {"app": "chat"}, "chat", "node-a", ("10.1.0.5",), "Running"))
    src.turn(cfg, applied[0], lambda c, r: applied.append(r))
    assert len(a.views) == 1 and "u1" in a.views[0].pods


def test_a_failed_apply_keeps_the_previous_map_and_is_counted():
    state = ClusterState()
    src = KubernetesSource(cluster=state)
    cfg = parse_config(CFG)
    src.start(cfg)
    src.installed(FakeAssigner(), src.view())

    def refuse(c, r):
        raise ValueError("endpoint_identity is full")
    state.upsert("services", Service("models", "llama", ("10.96.0.10",), ()))
    src.turn(cfg, (), refuse)
    assert src.apply_failures == 1
    reg = CollectorRegistry()
    for c in src.collectors():
        reg.register(c)
    assert "aimesh_k8s_endpoint_apply_failures_total 1.0" in generate_latest(reg).decode()


def test_workload_of_a_cgroup_from_the_assigners_pod_lookup(tmp_path, monkeypatch):
    """cgroup id -> (namespace, pod, container, service account), from what the assigner matched; a cgroup of an
    unknown pod has none until the pod arrives (the cache is dropped when pods change)."""
    from agent.flows.model import WorkloadData
    from agent.identity.k8s.model import Container
    from tests.unit.test_k8s_assigner import APP, UID1, setup
    from tests.unit.test_k8s_assigner import CFG as ACFG
    a, ids, _clock, _stats, _numbering = setup(tmp_path, monkeypatch)
    state = ClusterState()
    src = KubernetesSource(cluster=state)
    src.start(ACFG)
    a.view = src.view()
    a.resync(ACFG)
    src.installed(a, a.view)
    assert src.workload(ids["app"]) is None and src.workload(12345) is None
    state.upsert("pods", Pod(UID1, "shop", "chat-7d9", {"app": "chat"}, "chat-sa", "n1", ("10.1.0.5",), "Running",
                             (Container("app", APP),)))
    src.turn(ACFG, (), lambda c, r: None)
    assert src.workload(ids["app"]) == WorkloadData("shop", "chat-7d9", "app", "chat-sa")
    assert src.workload(ids["pod1"]) == WorkloadData("shop", "chat-7d9", "", "chat-sa")   # the pod level
    assert src.workload(ids["side"]) == WorkloadData("shop", "chat-7d9", "", "chat-sa")   # not in the status
    src.housekeeping(lambda pid: True)
    assert ids["app"] in src._workloads
