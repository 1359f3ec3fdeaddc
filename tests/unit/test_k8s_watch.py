"""The Kubernetes watch against tests/kube_api.py over real HTTP: list, watch, 410 Gone, dropped connections, 401."""
from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.identity.k8s.convert import label_selector
from agent.identity.k8s.model import ClusterState
from agent.identity.k8s.watch import (
    Backoff,
    PodScope,
    Watch,
    WatchConfigError,
    connect,
    pod_scope,
    start_watch,
    streams_for,
)
from tests.kube_api import KubeAPI, label_match, load
from tests.unit.collector_testlib import make_pki

CHAT = ("shop", "chat-frontend-7d9c8b6f5d-x2k4q")
CHAT_UID = "6f0e3b4a-2c1d-4e8f-9a7b-1c2d3e4f5a6b"
LLAMA_UID = "c2d4e6f8-0a1b-4c3d-8e5f-7a9b1c3d5e7f"
MIRROR_HASH = "3b8f1c2d9e7a4b6c5d0e1f2a3b4c5d6e"


def until(pred: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    assert pred(), "condition not reached"


class RecordingBackoff(Backoff):
    def __init__(self, delays: list[float]) -> None:
        super().__init__(base=0.05, cap=0.4, rand=lambda: 1.0)
        self.delays = delays

    def next(self) -> float:
        d = super().next()
        self.delays.append(d)
        return d


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    a = KubeAPI().start()
    yield a
    a.stop()


def watch(api: KubeAPI, tmp_path: Path, state: ClusterState, delays: list[float] | None = None,
          token: str | None = None, **kw) -> Watch:
    client = connect(str(api.kubeconfig(tmp_path / "kubeconfig", token=token)))
    bo = (lambda: RecordingBackoff(delays)) if delays is not None else (lambda: RecordingBackoff([]))
    return Watch(client, state, streams_for("node-a", **kw), backoff=bo).start()


@pytest.fixture
def running(api: KubeAPI, tmp_path: Path) -> Iterator[tuple[KubeAPI, ClusterState, Watch, list[float]]]:
    state, delays = ClusterState(), []
    w = watch(api, tmp_path, state, delays)
    assert w.wait_synced(10)
    yield api, state, w, delays
    w.stop()


def new_pod(name: str, uid: str, node: str = "node-a", labels: dict | None = None) -> dict:
    p = copy.deepcopy(load("pods")[0])
    p["metadata"].update(name=name, uid=uid, labels=labels or {"app": "chat"})
    p["spec"]["nodeName"] = node
    return p


def test_initial_list_fills_every_table_with_local_pods_only(running) -> None:
    _, state, w, _ = running
    assert {p.name for p in state.pods.values()} == {
        "chat-frontend-7d9c8b6f5d-x2k4q", "kube-apiserver-node-a", "batch-embedder-5f6d7-9kq2w"}   # not llama-0 (node-b)
    chat = state.pods[CHAT_UID]
    assert chat.service_account == "chat" and chat.node == "node-a" and chat.phase == "Running"
    assert chat.ips == ("10.244.1.17", "fd00:10:244:1::11")
    assert {c.name: c.container_id for c in chat.containers} == {
        "app": "a3f9c2e18b7d4c5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6",
        "log-shipper": "b4e0d3f29c8e5d6f7081a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7",
        "migrate": "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988"}
    mirror = state.pods[MIRROR_HASH]                   # keyed by the config hash kubelet puts in the cgroup path
    assert mirror.mirror_of == MIRROR_HASH and mirror.host_network and mirror.name == "kube-apiserver-node-a"
    pending = next(p for p in state.pods.values() if p.phase == "Pending")
    assert pending.ips == () and pending.containers[0].container_id == ""
    assert state.namespaces["shop"].labels["kubernetes.io/metadata.name"] == "shop"
    assert state.services[("models", "llama")].cluster_ips == ("10.96.120.15", "fd00:10:96::78")
    assert state.services[("models", "llama-headless")].cluster_ips == ()
    es = state.endpointslices[("models", "llama-8xk2p")]
    assert es.service == "llama" and es.addresses == ("10.244.2.31", "10.244.4.2")   # ready=false left out, unset kept
    assert all(s.lists == 1 and s.relists == 0 and s.errors == 0 for s in w.stats().values())


def test_add_modify_delete_reach_the_state(running) -> None:
    api, state, w, _ = running
    changes: list[str] = []
    state.on_change = changes.append
    api.add("pods", new_pod("elsewhere", "11111111-0000-4000-8000-000000000001", node="node-b"))
    api.add("pods", new_pod("chat-2", "11111111-0000-4000-8000-000000000002"))
    until(lambda: "11111111-0000-4000-8000-000000000002" in state.pods)
    api.modify("pods", CHAT, lambda o: o["metadata"]["labels"].update(tier="api"))
    until(lambda: state.pods[CHAT_UID].labels.get("tier") == "api")
    api.delete("pods", CHAT)
    until(lambda: CHAT_UID not in state.pods)
    api.modify("namespaces", ("", "shop"), lambda o: o["metadata"]["labels"].update(team="payments"))
    until(lambda: state.namespaces["shop"].labels["team"] == "payments")
    assert "11111111-0000-4000-8000-000000000001" not in state.pods     # fieldSelector spec.nodeName=node-a
    assert w.stats()["pods"].events == 3 and w.stats()["namespaces"].events == 1
    assert changes.count("pods") == 3


def test_410_gone_relists_and_drops_what_was_deleted_meanwhile(running) -> None:
    api, state, w, _ = running
    api.delete_quietly("pods", CHAT)             # the DELETED event is compacted away: only a re-list can notice
    until(lambda: w.stats()["pods"].relists == 1)
    until(lambda: CHAT_UID not in state.pods)
    assert MIRROR_HASH in state.pods
    # the re-list counts before its new watch starts: wait for that watch, then check it resumed from the new list
    until(lambda: len(api.watches("pods")) >= 2 and api.watches("pods")[-1].query.get("resourceVersion") is not None
          and int(api.watches("pods")[-1].query["resourceVersion"]) >= api.resource_version)
    watches = api.watches("pods")
    assert int(watches[-1].query["resourceVersion"]) >= api.resource_version   # resumed from the new list, not the old rv
    assert w.stats()["pods"].errors == 0
    api.add("pods", new_pod("after-410", "11111111-0000-4000-8000-000000000003"))
    until(lambda: "11111111-0000-4000-8000-000000000003" in state.pods)


def test_dropped_connection_reconnects_with_backoff_from_the_last_version(running) -> None:
    api, state, w, delays = running
    lists_before = len(api.lists("namespaces"))
    rv_before = api.resource_version
    api.fail(3, 500)                             # the first three reconnects fail too
    api.drop()
    until(lambda: all(s.synced for s in w.stats().values()) and sum(s.errors for s in w.stats().values()) == 7)
    assert sorted(delays)[:4] == [0.05] * 4 and max(delays) >= 0.1     # 4 drops, then doubled while it kept failing
    assert len(api.lists("namespaces")) == lists_before                             # resumed, not re-listed
    assert all(r.query["resourceVersion"] == str(rv_before) for r in api.watches("namespaces"))
    assert "incomplete chunked read" in w.stats()["namespaces"].last_error or "500" in w.stats()["namespaces"].last_error
    api.modify("pods", CHAT, lambda o: o["metadata"]["labels"].update(tier="after-drop"))
    until(lambda: state.pods[CHAT_UID].labels.get("tier") == "after-drop")


def test_bookmarks_move_the_resume_point(running) -> None:
    api, _, w, _ = running
    api.bookmark()
    until(lambda: w.stats()["services"].bookmarks == 1)
    rv = api.resource_version
    api.drop()
    until(lambda: len(api.watches("services")) >= 2)
    assert int(api.watches("services")[-1].query["resourceVersion"]) >= rv - len(("pods", "namespaces", "services",
                                                                                   "endpointslices"))
    assert api.watches("services")[0].query["allowWatchBookmarks"] == "true"


def test_unauthorized_is_one_line_naming_the_token(api: KubeAPI, tmp_path: Path) -> None:
    state = ClusterState()
    w = watch(api, tmp_path, state, token="wrong")
    try:
        until(lambda: all(s.errors >= 1 for s in w.stats().values()))
        err = w.stats()["pods"].last_error
        assert "401" in err and "token" in err and "\n" not in err
        assert not w.synced() and state.pods == {}
    finally:
        w.stop()


def test_remote_pods_by_label_merge_with_local_pods(api: KubeAPI, tmp_path: Path) -> None:
    state = ClusterState()
    scopes = [pod_scope("models", {"model": "llama"}), pod_scope(None, {"app": "chat"})]
    w = watch(api, tmp_path, state, need_all_pods=True, pod_scopes=scopes)
    try:
        assert w.wait_synced(10)
        assert LLAMA_UID in state.pods and CHAT_UID in state.pods
        assert [r.query["labelSelector"] for r in api.lists("models/pods")] == ["model=llama"]
        # the chat pod leaves the remote scope (label change -> DELETED on that watch) but stays a local pod
        api.modify("pods", CHAT, lambda o: o["metadata"]["labels"].update(app="shop"))
        until(lambda: state.pods[CHAT_UID].labels["app"] == "shop")
        api.modify("pods", ("models", "llama-0"), lambda o: o["metadata"]["labels"].update(model="mistral"))
        until(lambda: LLAMA_UID not in state.pods)
        assert CHAT_UID in state.pods
    finally:
        w.stop()


def test_streams_follow_the_config() -> None:
    names = lambda ss: [(s.name, s.path, s.label_selector) for s in ss]
    assert names(streams_for("n", True, [PodScope("a", "x=1"), PodScope()]))[-1] == ("remote_pods", "/api/v1/pods", "")
    assert [s.name for s in streams_for("n", False, [PodScope("a", "x=1")])] == [
        "pods", "namespaces", "services", "endpointslices"]                      # scopes without need_all_pods: none
    assert [s.name for s in streams_for("n", service_names=[])] == ["pods", "namespaces"]
    assert streams_for("n", service_names=["llama", "kube-dns", "llama"])[-1].label_selector == (
        "kubernetes.io/service-name in (kube-dns,llama)")


def test_endpointslices_only_of_named_services(api: KubeAPI, tmp_path: Path) -> None:
    state = ClusterState()
    w = watch(api, tmp_path, state, service_names=["llama"])
    try:
        assert w.wait_synced(10)
        assert list(state.endpointslices) == [("models", "llama-8xk2p")]
    finally:
        w.stop()


def test_paginated_list(tmp_path: Path) -> None:
    namespaces = [{"metadata": {"name": f"ns-{i:04d}", "uid": f"u{i}", "labels": {}}} for i in range(1234)]
    api = KubeAPI(objects={"namespaces": namespaces}).start()
    state = ClusterState()
    w = watch(api, tmp_path, state)
    try:
        assert w.wait_synced(10)
        assert len(state.namespaces) == 1234 and state.namespaces["ns-0007"].labels == {
            "kubernetes.io/metadata.name": "ns-0007"}
        assert len(api.lists("namespaces")) == 3                       # pages of 500
    finally:
        w.stop()
        api.stop()


def test_collector_exports_per_kind(running) -> None:
    api, _, w, _ = running
    api.modify("pods", CHAT, lambda o: o["metadata"]["labels"].update(tier="x"))
    until(lambda: w.stats()["pods"].events == 1)
    reg = CollectorRegistry()
    reg.register(w.collector())
    assert reg.get_sample_value("aimesh_k8s_watch_events_total", {"kind": "pods"}) == 1
    assert reg.get_sample_value("aimesh_k8s_relists_total", {"kind": "services"}) == 0
    assert reg.get_sample_value("aimesh_k8s_watch_errors_total", {"kind": "namespaces"}) == 0
    assert reg.get_sample_value("aimesh_k8s_synced", {"kind": "endpointslices"}) == 1
    assert reg.get_sample_value("aimesh_k8s_last_sync_timestamp_seconds", {"kind": "pods"}) > 0


def test_stop_ends_every_thread(api: KubeAPI, tmp_path: Path) -> None:
    w = watch(api, tmp_path, ClusterState())
    assert w.wait_synced(10)
    w.stop()
    assert not any(r.thread.is_alive() for r in w._runners)


def test_config_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WatchConfigError, match=r"^kubernetes.node_name: empty"):
        start_watch(ClusterState(), "", kubeconfig=str(tmp_path / "none"))
    with pytest.raises(WatchConfigError, match=r"kubernetes.kubeconfig: .*none") as e:
        connect(str(tmp_path / "none"))
    assert "\n" not in str(e.value)
    with pytest.raises(WatchConfigError, match=r"^kubernetes: .*sa") as e:
        connect(None, service_account_dir=str(tmp_path / "sa"))
    sa = tmp_path / "sa2"
    sa.mkdir()
    (sa / "token").write_text("t")
    (sa / "namespace").write_text("aimesh")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(WatchConfigError, match=r"not in a pod \(KUBERNETES_SERVICE_HOST unset\)"):
        connect(None, service_account_dir=str(sa))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_in_cluster_config_over_https_with_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path / "pki")
    api = KubeAPI().start(cert=pki.server_cert, key=pki.server_key)
    sa = tmp_path / "serviceaccount"            # what kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount
    sa.mkdir()
    (sa / "token").write_text(api.token)
    (sa / "namespace").write_text("aimesh")
    (sa / "ca.crt").write_bytes(pki.ca.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", api.url.rsplit(":", 1)[1])
    state = ClusterState()
    w = Watch(connect(None, service_account_dir=str(sa)), state, streams_for("node-a")).start()
    try:
        assert api.url.startswith("https://") and w.wait_synced(10)
        assert CHAT_UID in state.pods
        (sa / "ca.crt").write_bytes(pki.other_ca.read_bytes())      # a CA that did not sign the server: refused
        w2 = Watch(connect(None, service_account_dir=str(sa)), ClusterState(), streams_for("node-a")).start()
        try:
            until(lambda: w2.stats()["pods"].errors >= 1)
            assert "CERTIFICATE_VERIFY_FAILED" in w2.stats()["pods"].last_error
        finally:
            w2.stop()
    finally:
        w.stop()
        api.stop()


@pytest.mark.parametrize("labels,exprs,want,match,nomatch", [
    ({"app": "chat"}, [{"key": "tier", "operator": "In", "values": ["web", "api"]}], "app=chat,tier in (api,web)",
     {"app": "chat", "tier": "web"}, {"app": "chat", "tier": "db"}),
    ({}, [{"key": "legacy", "operator": "DoesNotExist"}], "!legacy", {"a": "b"}, {"legacy": "1"}),
    ({}, [{"key": "env", "operator": "NotIn", "values": ["dev"]}], "env notin (dev)", {}, {"env": "dev"}),
    ({}, [{"key": "gpu", "operator": "Exists"}], "gpu", {"gpu": ""}, {}),
])
def test_label_selector_strings_mean_what_kubernetes_means(labels, exprs, want, match, nomatch) -> None:
    s = label_selector(labels, exprs)
    assert s == want
    assert label_match(s, match) and not label_match(s, nomatch)


def test_label_selector_unknown_operator() -> None:
    with pytest.raises(ValueError, match="operator: 'Has'"):
        label_selector({}, [{"key": "a", "operator": "Has"}])


def test_pod_scope_from_config_objects() -> None:
    from types import SimpleNamespace
    req = SimpleNamespace(key="tier", operator="In", values=["web"])     # the shape of agent/config.py's LabelRequirement
    assert pod_scope("models", {"model": "llama"}, [req]) == PodScope("models", "model=llama,tier in (web)")
    assert pod_scope(None, {}, []) == PodScope()                              # namespaceSelector: {} and podSelector: {}
