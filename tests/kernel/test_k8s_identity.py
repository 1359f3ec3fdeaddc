"""Pods as identities, judged by the real kernel: cgroup trees shaped exactly like kubelet's (systemd and cgroupfs
drivers, containerd and CRI-O, crun's child cgroup, a static pod) under the test's private root, real processes in
them, and the agent's own Kubernetes watch talking over real HTTP to tests/kube_api.py (a local list/watch server
serving API objects shaped like a real cluster's) as the test plays a script on it.

Traffic goes to loopback only: a Service whose ClusterIP is 127.0.0.77 stands for a remote end.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from tests.kernel.harness import free_port, run_client, start_server

kube_api = pytest.importorskip("tests.kube_api", reason="tests/kube_api.py (k8swatch) is not on this branch")
pytest.importorskip("agent.identity.k8s.watch", reason="agent/identity/k8s/watch.py (k8swatch) is not on this branch")

CHAT_UID = "6f0e3b4a-2c1d-4e8f-9a7b-1c2d3e4f5a6b"          # tests/data/k8s/pods.json: chat-frontend on node-a
CHAT_APP = "a3f9c2e18b7d4c5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6"
CHAT_SHIPPER = "b4e0d3f29c8e5d6f7081a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"
APISERVER_HASH = "3b8f1c2d9e7a4b6c5d0e1f2a3b4c5d6e"           # the static kube-apiserver's config hash (mirror pod)
CRIO_UID = "4d5e6f70-8192-4a3b-9c4d-5e6f70819203"
CRIO_ID = "7c6b5a49382716f5e4d3c2b1a0f9e8d7c6b5a49382716f5e4d3c2b1a0f9e8d7"
LATE_UID = "e1d2c3b4-a596-4877-8695-a4b3c2d1e0f9"
LATE_ID = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
EARLY_UID = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
EARLY_ID = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809"
VEC_IP = "127.0.0.77"
REMOTE_IP = "127.0.0.78"                                     # a pod "on another node"
REMOTE_UID = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"


def _u(uid: str) -> str:
    return uid.replace("-", "_")


def systemd_container(root: Path, uid: str, cid: str, runtime: str = "cri-containerd", qos: str = "burstable") -> Path:
    pod = root / "kubepods.slice" / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{_u(uid)}.slice"
    return pod / f"{runtime}-{cid}.scope"


def cgroupfs_container(root: Path, uid: str, leaf: str, qos: str = "") -> Path:
    base = root / "kubepods" / qos if qos else root / "kubepods"
    return base / f"pod{uid}" / leaf


def pod_object(template: dict, uid: str, name: str, labels: dict, containers: list[tuple[str, str]]) -> dict:
    """A copy of a captured pod with another identity: uid, name, labels and its containers' runtime ids."""
    p = copy.deepcopy(template)
    md = p["metadata"]
    md.update(uid=uid, name=name, labels=labels)
    md.pop("generateName", None)
    p["spec"]["initContainers"] = []
    p["spec"]["containers"] = [{"name": n, "image": "registry.example/x:1"} for n, _ in containers]
    p["status"]["initContainerStatuses"] = []
    p["status"]["containerStatuses"] = [
        {"name": n, "state": {"running": {"startedAt": "2026-12-01T10:00:00Z"}}, "lastState": {}, "ready": True,
         "restartCount": 0, "image": "registry.example/x:1", "imageID": "registry.example/x@sha256:" + "0" * 64,
         "containerID": cid, "started": True} for n, cid in containers]
    return p


def eventually(fn, ok, what: str, timeout: float = 20.0):
    """fn() until ok(result): waits for the agent to catch up with the API, never asserts on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if ok(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {r}")
        time.sleep(0.2)


def allowed(r: dict) -> bool:
    return r["ok"] == 1


def denied(r: dict) -> bool:
    return r["ok"] == 0 and r["errors"] == {"EPERM": 1}


@pytest.fixture
def api():
    objects = {k: kube_api.load(k) for k in kube_api.KINDS}
    a = kube_api.KubeAPI(objects=objects).start()
    try:
        yield a
    finally:
        a.stop()


def test_pods_namespaces_and_services_decide_in_the_kernel(cgroups, agents, api, tmp_path):
    pods = {p["metadata"]["name"]: p for p in kube_api.load("pods")}
    chat = pods["chat-frontend-7d9c8b6f5d-x2k4q"]
    api.add("pods", pod_object(chat, CRIO_UID, "embedder-crio", {"app": "embedder"},
                               [("embedder", f"cri-o://{CRIO_ID}")]))
    root = cgroups.root
    # kubelet's trees: systemd + containerd (the chat app and its sidecar), systemd + CRI-O with crun's child
    # cgroup (embedder), cgroupfs + containerd for the static kube-apiserver, cgroupfs pods for the race
    chat_app = cgroups.child(str(systemd_container(root, CHAT_UID, CHAT_APP).relative_to(root)))
    chat_side = cgroups.child(str(systemd_container(root, CHAT_UID, CHAT_SHIPPER).relative_to(root)))
    crio_scope = cgroups.child(str(systemd_container(root, CRIO_UID, CRIO_ID, "crio", "besteffort")
                                   .relative_to(root)))
    cgroups.child(str(systemd_container(root, CRIO_UID, CRIO_ID, "crio-conmon", "besteffort").relative_to(root)))
    crio_crun = cgroups.child(str((crio_scope / "container").relative_to(root)))
    apiserver = cgroups.child(str(cgroupfs_container(root, APISERVER_HASH, "d1c2b3a4f5e6" + "0" * 52, "burstable")
                                  .relative_to(root)))
    late = cgroups.child(str(cgroupfs_container(root, LATE_UID, LATE_ID).relative_to(root)))   # before its pod
    llm_cg, other_cg = cgroups.child("llm"), cgroups.child("other")

    port = free_port()
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service",
             "select": {"pods": [{"namespace": "shop", "podSelector": {"matchLabels": {"app": "chat"}},
                                  "serviceAccount": "chat", "container": "app"}]}},
            {"name": "embedder", "kind": "service",
             "select": {"pods": [{"namespaceSelector": {"matchLabels": {"team": "commerce"}},
                                  "podSelector": {"matchExpressions": [
                                      {"key": "app", "operator": "In", "values": ["embedder"]}]}}]}},
            {"name": "apiserver", "kind": "service",
             "select": {"pods": [{"namespace": "kube-system",
                                  "podSelector": {"matchLabels": {"component": "kube-apiserver"}}}]}},
            {"name": "llm", "kind": "model", "select": {"cgroups": [cgroups.rel(llm_cg)]}},
            {"name": "vec", "kind": "dataset", "endpoints": [{"service": {"namespace": "models", "name": "vec"}}]},
            {"name": "shards", "kind": "dataset",
             "endpoints": [{"pods": {"namespace": "models", "podSelector": {"matchLabels": {"app": "shard"}}}}]},
        ],
        "policies": [{"from": ["chat", "embedder", "apiserver"], "to": "llm", "ports": [port]}],
        "kubernetes": {"unresolved": "deny", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig")),
                       "node_name": "node-a"},
    }
    agent = agents(cfg)
    srv = start_server(llm_cg, port, name="llm", timeout=300)
    vec_port = free_port()
    vec = start_server(other_cg, vec_port, name="vec", host=VEC_IP, timeout=300)
    shard = start_server(other_cg, vec_port, name="shard", host=REMOTE_IP, timeout=300)
    try:
        # every runtime shape, matched by its pod
        assert allowed(run_client(chat_app, port))
        assert denied(run_client(chat_side, port))        # container: app only; the sidecar has no identity
        assert allowed(run_client(crio_crun, port))       # CRI-O, crun's child cgroup, namespace by labels
        assert allowed(run_client(apiserver, port))       # the static pod, through its mirror pod
        # a cgroup whose pod the API has not told us about: unresolved, denied, until the pod arrives
        assert denied(run_client(late, port))
        assert denied(run_client(late, vec_port, host=VEC_IP))   # even to an ungoverned end: deny = no policy at all
        api.add("pods", pod_object(chat, LATE_UID, "chat-late", {"app": "chat"}, [("app", f"containerd://{LATE_ID}")]))
        eventually(lambda: run_client(late, port), allowed, "the late pod's cgroup after its pod arrived")
        # the pod first, then its cgroup (mkdir seen by the kernel, assigned at once from the known pod)
        api.add("pods", pod_object(chat, EARLY_UID, "chat-early", {"app": "chat"},
                                   [("app", f"containerd://{EARLY_ID}")]))
        early = cgroups.child(str(cgroupfs_container(root, EARLY_UID, EARLY_ID, "besteffort").relative_to(root)))
        eventually(lambda: run_client(early, port), allowed, "a new cgroup of a known pod")
        # a label change moves the pod out of `chat`: the kernel's cgroup map follows
        api.modify("pods", ("shop", "chat-late"), lambda p: p["metadata"]["labels"].update(app="other"))
        eventually(lambda: run_client(late, port), denied, "the relabelled pod")
        # the watch breaks and resumes (410 Gone mid-watch, a dropped connection): nothing is lost
        api.expire()
        api.drop()
        api.modify("pods", ("shop", "chat-late"), lambda p: p["metadata"]["labels"].update(app="chat"))
        eventually(lambda: run_client(late, port), allowed, "the pod relabelled back after 410 and a drop")
        # delete: the pod's cgroup waits as unresolved again
        api.delete("pods", ("shop", "chat-late"))
        eventually(lambda: run_client(late, port), denied, "the deleted pod's cgroup")

        # a Service named as an endpoint: its ClusterIP becomes `vec` in the endpoint map when it appears
        assert allowed(run_client(chat_app, vec_port, host=VEC_IP))     # unmanaged local address, nobody governed
        svc = copy.deepcopy(next(s for s in kube_api.load("services") if s["metadata"]["name"] == "llama"))
        svc["metadata"].update(name="vec", uid="ab12cd34-ef56-4789-9abc-def012345678")
        svc["spec"].update(clusterIP=VEC_IP, clusterIPs=[VEC_IP], ports=[{"name": "tcp", "protocol": "TCP",
                                                                          "port": vec_port, "targetPort": vec_port}])
        api.add("services", svc)
        eventually(lambda: run_client(chat_app, vec_port, host=VEC_IP), denied, "the Service's ClusterIP as vec")
        api.delete("services", ("models", "vec"))
        eventually(lambda: run_client(chat_app, vec_port, host=VEC_IP), allowed, "the Service gone")

        # a `pods:` endpoint: a pod on another node (its own remote-pods watch) becomes `shards` by its IP
        assert allowed(run_client(chat_app, vec_port, host=REMOTE_IP))
        remote = pod_object(chat, REMOTE_UID, "shard-0", {"app": "shard"}, [("shard", "containerd://" + "e" * 64)])
        remote["metadata"]["namespace"] = "models"
        remote["spec"]["nodeName"] = "node-b"
        remote["status"].update(podIP=REMOTE_IP, podIPs=[{"ip": REMOTE_IP}])
        api.add("pods", remote)
        eventually(lambda: run_client(chat_app, vec_port, host=REMOTE_IP), denied, "the remote pod's IP as shards")
    finally:
        srv.popen.kill()
        vec.popen.kill()
        shard.popen.kill()
        for p in (srv, vec, shard):
            p.popen.wait()

    flows = agent.flows(wait_for=1)
    names = {(r["source"]["name"], r["verdict"]) for r in flows if r["destination"]["port"] == port}
    assert ("unresolved", "denied") in names and ("chat", "allowed") in names
    status, metrics = agent.get("/metrics")
    assert status == 200
    assert "aimesh_k8s_pod_resolution_seconds_count" in metrics
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("aimesh_k8s_pod_resolution_seconds_count"))
    assert count >= 1          # the late pod's cgroup resolved at least once
    assert "aimesh_k8s_unresolved_assignments_total" in metrics


@pytest.mark.parametrize("how", ["allow", "audit"])
def test_unresolved_allow_and_audit(cgroups, agents, api, tmp_path, how):
    """allow: not governed (an ungoverned end is reached); audit: governed in audit mode (reached, recorded as audit)."""
    root = cgroups.root
    late = cgroups.child(str(cgroupfs_container(root, LATE_UID, LATE_ID).relative_to(root)))
    other_cg = cgroups.child("other")
    cfg = {"identities": [{"name": "chat", "kind": "service",
                           "select": {"pods": [{"namespace": "shop", "podSelector": {}}]}}],
           "kubernetes": {"unresolved": how, "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig")),
                          "node_name": "node-a"}}
    agent = agents(cfg)
    port = free_port()
    srv = start_server(other_cg, port, name="other", host=VEC_IP, timeout=120)
    try:
        assert allowed(run_client(late, port, host=VEC_IP))
    finally:
        srv.popen.kill()
        srv.popen.wait()
    seen = {(r["verdict"], r["reason"]) for r in agent.flows(wait_for=1)
            if r["destination"]["port"] == port and r["source"]["name"] == "unresolved"}
    assert seen == ({("audit", "no_policy_src")} if how == "audit" else {("allowed", "not_governed")})


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "model_call":
            out.append(r)
    return out


def _workload(ident: dict) -> tuple[str, str, str, str]:
    return ident["namespace"], ident["pod"], ident["container"], ident["service_account"]


def test_records_name_the_pod_and_a_services_ends_are_judged(cgroups, agents, api, tmp_path):
    """End to end, with the flags a DaemonSet passes (--kubeconfig, --node-name): the records log names each local
    end's namespace, pod, container and service account; a Service's ClusterIP and its EndpointSlice's ready address
    are the `vec` identity in the kernel (only that Service's slices are watched); a container whose pod is not known
    yet is `unresolved` and denied, then resolved and allowed with its pod in the record."""
    pods = {p["metadata"]["name"]: p for p in kube_api.load("pods")}
    chat = pods["chat-frontend-7d9c8b6f5d-x2k4q"]            # shop/chat-frontend-…, service account chat
    port = free_port()
    svc = copy.deepcopy(next(s for s in kube_api.load("services") if s["metadata"]["name"] == "llama"))
    svc["metadata"].update(name="vec", uid="ab12cd34-ef56-4789-9abc-def012345678")
    svc["spec"].update(clusterIP=VEC_IP, clusterIPs=[VEC_IP],
                       ports=[{"name": "tcp", "protocol": "TCP", "port": port, "targetPort": port}])
    api.add("services", svc)
    eps = copy.deepcopy(kube_api.load("endpointslices")[0])
    eps["metadata"].update(name="vec-7f2kq", uid="bc23de45-f067-4890-abcd-ef0123456789")
    eps["metadata"]["labels"]["kubernetes.io/service-name"] = "vec"
    eps["endpoints"] = [{"addresses": [REMOTE_IP], "conditions": {"ready": True}, "nodeName": "node-b"}]
    eps["ports"] = [{"name": "tcp", "protocol": "TCP", "port": port}]
    api.add("endpointslices", eps)

    root = cgroups.root
    chat_app = cgroups.child(str(systemd_container(root, CHAT_UID, CHAT_APP).relative_to(root)))
    chat_side = cgroups.child(str(systemd_container(root, CHAT_UID, CHAT_SHIPPER).relative_to(root)))
    late = cgroups.child(str(cgroupfs_container(root, LATE_UID, LATE_ID).relative_to(root)))   # before its pod
    other_cg = cgroups.child("other")
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service",
             "select": {"pods": [{"namespace": "shop", "podSelector": {"matchLabels": {"app": "chat"}}}]}},
            {"name": "vec", "kind": "dataset",
             "endpoints": [{"service": {"namespace": "models", "name": "vec"}, "ports": [port]}]},
        ],
        "policies": [{"from": "chat", "to": "vec", "ports": [port]}],
        "kubernetes": {"unresolved": "deny"},
    }
    records = tmp_path / "records.jsonl"
    agent = agents(cfg, extra=["--records-log", str(records), "--node-name", "node-a",
                               "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))])
    servers = [start_server(other_cg, port, name=n, host=h, timeout=300)
               for n, h in (("vec-cluster-ip", VEC_IP), ("vec-endpoint", REMOTE_IP))]
    try:
        assert allowed(run_client(chat_app, port, host=VEC_IP))       # chat -> vec by the ClusterIP
        assert allowed(run_client(chat_side, port, host=REMOTE_IP))   # ... by the slice's ready address
        assert denied(run_client(other_cg, port, host=VEC_IP))        # nobody -> vec: no policy
        assert denied(run_client(other_cg, port, host=REMOTE_IP))
        assert denied(run_client(late, port, host=VEC_IP))            # unresolved: deny
        api.add("pods", pod_object(chat, LATE_UID, "chat-late", {"app": "chat"}, [("app", f"containerd://{LATE_ID}")]))
        eventually(lambda: run_client(late, port, host=VEC_IP), allowed, "the late pod's cgroup after its pod arrived")
    finally:
        for s in servers:
            s.popen.kill()
            s.popen.wait()

    def conns() -> list[dict]:
        return [r for r in _records(records) if r["kind"] == 1 and r["destination_port"] == port
                and r["source"]["name"] == "chat" and r["hook"] == 1]   # the client's side (the servers: unmanaged)
    got = eventually(conns, lambda rs: {r["source"]["pod"] for r in rs} >= {chat["metadata"]["name"], "chat-late"},
                     "connection records of both pods")
    by = {(r["destination_address"], _workload(r["source"])) for r in got}
    assert (VEC_IP, ("shop", "chat-frontend-7d9c8b6f5d-x2k4q", "app", "chat")) in by
    assert (REMOTE_IP, ("shop", "chat-frontend-7d9c8b6f5d-x2k4q", "log-shipper", "chat")) in by
    assert (VEC_IP, ("shop", "chat-late", "app", "chat")) in by
    assert all(r["destination"]["name"] == "vec" and r["destination"]["pod"] == "" for r in got)   # remote: no pod
    denials = [r for r in _records(records) if r["kind"] == 3 and r["destination_port"] == port]
    assert {(r["source"]["name"], r["destination"]["name"]) for r in denials} >= {("unmanaged", "vec"),
                                                                                  ("unresolved", "vec")}
    assert all(r["source"]["pod"] == "" for r in denials)    # neither an unmanaged nor an unresolved cgroup has one
    # what the agent asked the API server for: its node's pods, and only the named Service's EndpointSlices
    assert {r.query.get("fieldSelector") for r in api.watches("pods") + api.lists("pods")} == {"spec.nodeName=node-a"}
    assert {r.query.get("labelSelector") for r in api.watches("endpointslices")} == {
        "kubernetes.io/service-name in (vec)"}
    # Prometheus labels stay identity names: one series per identity, never per pod
    status, metrics = agent.get("/metrics")
    assert status == 200 and 'source="chat"' in metrics
    assert "chat-frontend-7d9c8b6f5d-x2k4q" not in metrics and "chat-late" not in metrics


def test_model_calls_from_a_pod_name_it(cgroups, agents, api, tmp_path):
    """The openai SDK in a pod's container calls a local model server: the model-call record's source names the
    pod's namespace, name, container and service account (found from the caller's pid)."""
    from tests.kernel.test_capture import model_calls, run_openai, start_llm_server
    root = cgroups.root
    chat_app = cgroups.child(str(systemd_container(root, CHAT_UID, CHAT_APP).relative_to(root)))
    llama = cgroups.child("llama")
    cfg = {"mode": "enforce",
           "identities": [
               {"name": "chat", "kind": "service",
                "select": {"pods": [{"namespace": "shop", "podSelector": {"matchLabels": {"app": "chat"}}}]}},
               {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(llama)]}}],
           "policies": [{"from": "chat", "to": "llama"}],
           "kubernetes": {"unresolved": "deny"}}
    records = tmp_path / "records.jsonl"
    agents(cfg, extra=["--records-log", str(records), "--node-name", "node-a",
                       "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))])
    srv, url = start_llm_server(llama)
    try:
        assert len(run_openai(chat_app, url)) == 2
        calls = model_calls(records, want=2)
    finally:
        srv.kill()
        srv.wait()
    assert len(calls) == 2, calls
    for c in calls:
        s = c["source"]
        assert (s["name"], s["namespace"], s["pod"], s["container"], s["service_account"]) == (
            "chat", "shop", "chat-frontend-7d9c8b6f5d-x2k4q", "app", "chat")
        assert c["destination"]["name"] == "llama"
