"""The assigner with pods: kubelet-shaped directories (a tmp dir stands for the cgroup2 mount), a ClusterView built
by hand, and dict-backed identity maps."""
from __future__ import annotations

import os
from pathlib import Path

from agent.config import UNRESOLVED, parse_config
from agent.identity.assigner import IdentityAssigner
from agent.identity.k8s.model import Container, Pod
from agent.identity.k8s.resolve import PodResolutionStats, view_of
from agent.policy.identities import IdentityNumbering

UID1 = "5f6d6a7e-1b2c-4d3e-9f8a-0123456789ab"
UID2 = "0a1b2c3d-4e5f-4a6b-8c7d-9e8f7a6b5c4d"
STATIC = "0f9a3c1e2b4d5e6f7a8b9c0d1e2f3a4b"
APP, SIDE = "a" * 64, "b" * 64

CFG = parse_config("""
identities:
  - name: chat
    kind: service
    select:
      pods: [{namespace: shop, podSelector: {matchLabels: {app: chat}}, container: app}]
  - name: etcd
    kind: service
    select: {pods: [{namespace: kube-system, podSelector: {matchLabels: {component: etcd}}}]}
  - name: everything-else
    kind: service
    select: {cgroups: ["/kubepods*"]}
kubernetes: {unresolved: deny}
""")


class Maps:
    def __init__(self) -> None:
        self.cgroup: dict[int, int] = {}

    def set_cgroup_identity(self, cid: int, ident: int) -> None:
        self.cgroup[cid] = ident

    def clear_cgroup_identity(self, cid: int) -> None:
        self.cgroup.pop(cid, None)

    def set_cgroup_inherit(self, cid, ident) -> None: ...
    def clear_cgroup_inherit(self, cid) -> None: ...
    def set_process_identity(self, pid, ident) -> None: ...
    def clear_process_identity(self, pid) -> None: ...
    def set_local_endpoint(self, key, ident) -> None: ...


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def mk(root: Path, rel: str) -> int:
    p = root / rel.lstrip("/")
    p.mkdir(parents=True)
    return os.stat(p).st_ino


def chat_pod(labels=None, containers=((("app", APP), ("sidecar", SIDE)))) -> Pod:
    return Pod(UID1, "shop", "chat-7d9", labels or {"app": "chat"}, "default", "n1", ("10.1.0.5",), "Running",
               tuple(Container(n, c) for n, c in containers))


def setup(tmp_path, monkeypatch):
    monkeypatch.setattr("agent.identity.assigner.listeners", lambda: [])
    pod1 = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID1.replace('-', '_')}.slice"
    ids = {
        "pod1": mk(tmp_path, pod1),
        "app": mk(tmp_path, f"{pod1}/cri-containerd-{APP}.scope"),
        "side": mk(tmp_path, f"{pod1}/cri-containerd-{SIDE}.scope"),
        "static": mk(tmp_path, f"/kubepods/burstable/pod{STATIC}/{APP[:60]}beef"),
        "qos": os.stat(tmp_path / "kubepods.slice/kubepods-burstable.slice").st_ino,
    }
    clock, stats, numbering = Clock(), PodResolutionStats(), IdentityNumbering()
    a = IdentityAssigner(Maps(), numbering, tmp_path, tmp_path, stats=stats, clock=clock)
    return a, ids, clock, stats, numbering


def names(a: IdentityAssigner, numbering: IdentityNumbering) -> dict[int, str]:
    by_id = {v: k for k, v in numbering.to_state()["ids"].items()}
    return {cid: by_id[i] for cid, i in a.maps.cgroup.items()}


def test_unknown_pods_are_unresolved_then_assigned_when_they_arrive(tmp_path, monkeypatch):
    a, ids, clock, stats, numbering = setup(tmp_path, monkeypatch)
    a.resync(CFG)
    got = names(a, numbering)
    assert got[ids["app"]] == got[ids["side"]] == got[ids["pod1"]] == got[ids["static"]] == UNRESOLVED
    assert got[ids["qos"]] == "everything-else"          # not a pod: the glob
    assert stats.unresolved_total == 5 and stats.unresolved_now == 5   # the static pod's own level too

    clock.t += 1.5
    mirror = Pod("mirror-uid", "kube-system", "etcd-n1", {"component": "etcd"}, "default", "n1", (), "Running",
                 mirror_of=STATIC)
    assert a.on_cluster_change(view_of({UID1: chat_pod(), "mirror-uid": mirror})) == 5
    got = names(a, numbering)
    assert got[ids["app"]] == "chat"
    assert got[ids["side"]] == "everything-else"          # container: app only -> the glob below
    assert got[ids["pod1"]] == "everything-else"
    assert got[ids["static"]] == "etcd"                   # the static pod, by its mirror pod's config hash
    assert stats.unresolved_now == 0 and sum(stats.counts) == 5 and stats.sum == 5 * 1.5
    assert stats.counts[stats.buckets.index(2.5)] == 5   # 1.5 s falls in the 2.5 s bucket


def test_label_change_reassigns_and_pod_removal_makes_it_unresolved(tmp_path, monkeypatch):
    a, ids, clock, stats, numbering = setup(tmp_path, monkeypatch)
    a.view = view_of({UID1: chat_pod()})
    a.resync(CFG)
    assert names(a, numbering)[ids["app"]] == "chat"
    a.on_cluster_change(view_of({UID1: chat_pod(labels={"app": "other"})}))
    assert names(a, numbering)[ids["app"]] == "everything-else"
    a.on_cluster_change(view_of({}))
    assert names(a, numbering)[ids["app"]] == UNRESOLVED
    assert a.on_cluster_change(view_of({})) == 0           # nothing changed, nothing written


def test_new_cgroup_event_before_and_after_its_pod(tmp_path, monkeypatch):
    a, ids, clock, stats, numbering = setup(tmp_path, monkeypatch)
    a.view = view_of({UID1: chat_pod(containers=(("app", ""),))})   # status has no container id yet
    a.resync(CFG)
    rel = f"/kubepods/pod{UID2}/{SIDE}"
    cid = mk(tmp_path, rel)
    assert a.on_cgroup_created(rel, cid) == UNRESOLVED    # cgroup before its pod's watch event
    assert names(a, numbering)[ids["app"]] == UNRESOLVED  # the container's id is not in the status yet
    p2 = Pod(UID2, "shop", "chat-2", {"app": "chat"}, "default", "n1", (), "Running", (Container("app", SIDE),))
    a.on_cluster_change(view_of({UID1: chat_pod(), UID2: p2}))
    got = names(a, numbering)
    assert got[cid] == "chat" and got[ids["app"]] == "chat"
    rel3 = f"/kubepods/pod{UID2}/{'d' * 64}"               # pod known first, then its cgroup: at once
    assert a.on_cgroup_created(rel3, mk(tmp_path, rel3)) == "everything-else"


def test_no_pod_selectors_keeps_globs_only(tmp_path, monkeypatch):
    a, ids, clock, stats, numbering = setup(tmp_path, monkeypatch)
    cfg = parse_config('identities: [{name: all, kind: service, select: {cgroups: ["/kubepods*"]}}]')
    a.resync(cfg)
    assert set(names(a, numbering).values()) == {"all"}
    assert stats.unresolved_total == 0


def test_prune_forgets_removed_pod_cgroups(tmp_path, monkeypatch):
    a, ids, clock, stats, numbering = setup(tmp_path, monkeypatch)
    a.resync(CFG)
    p = next(rel for cid, (rel, _) in a.pod_cgroups.items() if cid == ids["side"])
    (tmp_path / p.lstrip("/")).rmdir()
    a.prune_pod_cgroups()
    assert ids["side"] not in a.pod_cgroups and stats.unresolved_now == 4
