"""Remote ends from the cluster -> compile input; the unresolved identity's flags; debounce; resolution metrics."""
from __future__ import annotations

import ipaddress
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, generate_latest

from agent.config import UNRESOLVED, parse_config
from agent.identity.k8s.model import ClusterState, EndpointSlice, Namespace, Pod, Service, ServicePort
from agent.identity.k8s.resolve import Debouncer, PodResolutionStats, resolve_endpoints, snapshot, view_of
from agent.kernel import abi
from agent.policy.compile import ResolvedEndpoint, addr16, compile_image
from agent.policy.identities import IdentityNumbering

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
CFG = """
identities:
  - name: llama
    kind: model
    endpoints:
      - {service: {namespace: models, name: llama}, ports: [8000]}
      - {pods: {namespace: models, podSelector: {matchLabels: {model: llama}}}}
  - name: vectors
    kind: dataset
    endpoints:
      - {service: {namespace: data, name: qdrant}}
      - {pods: {namespaceSelector: {matchLabels: {team: ml}}, podSelector: {matchLabels: {model: llama}}}, ports: [9]}
      - "10.9.0.0/16"
kubernetes: {unresolved: %s}
"""


def pod(uid, ns, labels, ips, phase="Running", host_network=False) -> Pod:
    return Pod(uid, ns, f"p{uid}", labels, "default", "n2", ips, phase, host_network=host_network)


def view():
    return view_of(
        pods={"1": pod("1", "models", {"model": "llama"}, ("10.1.0.5", "fd00::5")),
              "2": pod("2", "models", {"model": "llama"}, ("10.1.0.6",), phase="Succeeded"),
              "3": pod("3", "models", {"model": "other"}, ("10.1.0.7",)),
              "4": pod("4", "models", {"model": "llama"}, ("192.168.0.2",), host_network=True)},
        namespaces={"models": Namespace("models", {"team": "ml"})},
        services={("models", "llama"): Service("models", "llama", ("10.96.0.10",),
                                               (ServicePort("http", 8000, "TCP"), ServicePort("metrics", 9090, "TCP"))),
                  ("data", "qdrant"): Service("data", "qdrant", ("10.96.0.20", "fd00:96::20"),
                                              (ServicePort("grpc", 6334, "TCP"),))},
        endpointslices={("models", "llama-abc"): EndpointSlice("models", "llama-abc", "llama", ("10.1.0.5", "10.1.0.8"),
                                                               (ServicePort("http", 8080, "TCP"),
                                                                ServicePort("metrics", 9091, "TCP"))),
                        ("data", "qdrant-x"): EndpointSlice("data", "qdrant-x", "qdrant", ("10.2.0.3",),
                                                            (ServicePort("grpc", 6334, "TCP"),))})


def ends(cfg_text="deny"):
    cfg = parse_config(CFG % cfg_text)
    return cfg, {(r.identity, str(r.network), r.port) for r in resolve_endpoints(cfg, view())}


def test_service_endpoints_are_cluster_ips_and_ready_addresses_by_port_name():
    _, got = ends()
    llama = {(n, p) for i, n, p in got if i == "llama"}
    # ClusterIP with the asked service port; the EndpointSlice addresses with the target port of that port's name
    assert {("10.96.0.10/32", 8000), ("10.1.0.5/32", 8080), ("10.1.0.8/32", 8080)} <= llama
    assert ("10.96.0.10/32", 9090) not in llama and ("10.1.0.8/32", 9091) not in llama
    vec = {(n, p) for i, n, p in got if i == "vectors"}
    # no ports: every port of the Service, every port of the slices; both address families
    assert {("10.96.0.20/32", 6334), ("fd00:96::20/128", 6334), ("10.2.0.3/32", 6334)} <= vec


def test_pod_endpoints_skip_finished_and_host_network_pods():
    _, got = ends()
    llama = {(n, p) for i, n, p in got if i == "llama"}
    assert {("10.1.0.5/32", 0), ("fd00::5/128", 0)} <= llama          # any port
    assert not any(n in ("10.1.0.6/32", "10.1.0.7/32", "192.168.0.2/32") for n, _ in llama)
    vec = {(n, p) for i, n, p in got if i == "vectors"}
    assert ("10.1.0.5/32", 9) in vec and ("192.168.0.2/32", 9) in vec  # host network with given ports: those


def test_compile_takes_the_resolved_endpoints_first_owner_wins():
    cfg, _ = ends()
    resolved = resolve_endpoints(cfg, view()) + (ResolvedEndpoint("vectors", ipaddress.ip_network("10.1.0.5"), 8080),
                                                 ResolvedEndpoint("gone", ipaddress.ip_network("10.3.0.1"), 0))
    ids = IdentityNumbering()
    img = compile_image(cfg, ids, 1, NOW, resolved)
    eps = {(bytes(k.addr), k.port): v for k, v in img.endpoints}
    a = addr16(ipaddress.ip_address("10.1.0.5"))
    assert eps[(a, 8080)] == ids.id_of("llama")                        # llama's came first
    assert eps[(addr16(ipaddress.ip_address("10.9.0.0")), 0)] == ids.id_of("vectors")   # the configured CIDR stays
    assert not any(k == addr16(ipaddress.ip_address("10.3.0.1")) for k, _ in eps)       # unknown identity: skipped
    assert any("already an endpoint" in w for w in img.warnings)
    assert len(compile_image(cfg, IdentityNumbering(), 1, NOW).endpoints) == 1          # without: the CIDR only


def test_unresolved_is_a_compiled_identity_following_kubernetes_unresolved():
    F = abi.IdentityFlag
    for how, mode, want in (("deny", "enforce", F.GOVERNED | F.ENFORCE), ("deny", "audit", F.GOVERNED),
                            ("audit", "enforce", F.GOVERNED), ("allow", "enforce", 0)):
        cfg = parse_config(f"mode: {mode}\n" + CFG % how)
        ids = IdentityNumbering()
        img = compile_image(cfg, ids, 1, NOW)
        flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
        assert flags[UNRESOLVED] == want, (how, mode)
        assert img.identities[ids.id_of(UNRESOLVED)].kind == "reserved"
    plain = compile_image(parse_config("identities: [{name: a, kind: service}]"), IdentityNumbering(), 1, NOW)
    assert UNRESOLVED not in {m.name for m in plain.identities.values()}


def test_policies_may_name_unresolved_with_kubernetes():
    cfg = parse_config(CFG % "deny" + "policies: [{from: unresolved, to: llama, ports: [8000]}]\n")
    ids = IdentityNumbering()
    img = compile_image(cfg, ids, 1, NOW)
    assert {(k.src, k.dst) for k, _ in img.policies} == {(ids.id_of(UNRESOLVED), ids.id_of("llama"))}


def test_snapshot_reads_the_cluster_state_and_mirror_pods():
    st = ClusterState()
    st.upsert("pods", Pod("m", "kube-system", "etcd-n1", {}, "default", "n1", (), "Running", mirror_of="abc"))
    v = snapshot(st)
    assert v.pod("abc").name == "etcd-n1" and v.pod("m").name == "etcd-n1" and v.pod("zzz") is None


def test_debouncer_at_most_once_per_interval_and_only_after_a_poke():
    t = [0.0]
    d = Debouncer(0.2, clock=lambda: t[0])
    assert not d.due()
    d.poke()
    assert d.due() and not d.due()
    d.poke()
    t[0] = 0.1
    assert not d.due() and d.pending
    t[0] = 0.25
    assert d.due() and not d.pending


def test_resolution_metrics_exposition():
    s = PodResolutionStats()
    s.assigned_unresolved()
    s.resolved(0.3)
    s.unresolved_now = 2
    reg = CollectorRegistry(auto_describe=False)
    reg.register(s)
    text = generate_latest(reg).decode()
    assert 'aimesh_k8s_pod_resolution_seconds_bucket{le="0.25"} 0.0' in text
    assert 'aimesh_k8s_pod_resolution_seconds_bucket{le="0.5"} 1.0' in text
    assert "aimesh_k8s_pod_resolution_seconds_count 1.0" in text
    assert "aimesh_k8s_unresolved_assignments_total 1.0" in text
    assert "aimesh_k8s_unresolved_cgroups 2.0" in text
