"""deploy/k8s: every kustomization renders, every object validates offline against several Kubernetes versions'
schemas (kubernetes-validate, strict: unknown fields are errors), and the rules schemas cannot say hold: the agent's
capabilities exactly, nothing privileged, read-only mounts, read-only RBAC on exactly four resources, NODE_NAME from
the downward API, probes, tolerations, the collector at Pod Security "restricted", TLS wiring that lines up.

Rendering uses a real kustomize: a `kustomize` binary if there is one, else `kubectl kustomize` (kubectl embeds
kustomize; v5 or later is needed for components and `labels:`). Neither is a Debian or PyPI package that is recent
enough (Debian 12's kubernetes-client is 1.20, with kustomize v2), so a machine without either fails here, by name.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/production")
# Oldest supported minor to the newest kubernetes-validate bundles; strict (unknown properties are errors).
K8S_VERSIONS = ("1.28.0", "1.31.0", "1.34.0", "1.37.0")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}   # no schema bundled: checked structurally below

NAMESPACE = "aimesh-system"
AGENT_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"}
TLS_CAPTURE_CAPS = AGENT_CAPS | {"SYS_ADMIN"}
CAPS_BY_RENDER = {"base": AGENT_CAPS, "overlays/production": AGENT_CAPS, "overlays/dev": TLS_CAPTURE_CAPS}
RBAC_RULES = {("", "pods"), ("", "namespaces"), ("", "services"), ("discovery.k8s.io", "endpointslices")}
READ_VERBS = {"get", "list", "watch"}
# agent volume -> (host path or None, mounted read-only?). Exactly these; read-write only where the agent writes.
AGENT_VOLUMES = {
    "config": (None, True), "collector-tls": (None, True), "collector-token": (None, True),
    "bpffs": ("/sys/fs/bpf", False),          # pins the datapath
    "cgroup": ("/sys/fs/cgroup", True),       # attach needs only a directory fd
    "tracefs": ("/sys/kernel/tracing", True),  # tracepoint ids are read
    "modules": ("/lib/modules", True), "usr-src": ("/usr/src", True),   # bcc's headers
    "state": ("/var/lib/aimesh", False),      # the collector spool
    "tmp": (None, False),                     # emptyDir
}
Docs = list[dict[str, Any]]


# ---- rendering ----

def kustomize_cmd() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("neither kustomize nor kubectl is on PATH: deploy/k8s cannot be rendered (see Makefile setup)")


def kustomize_version() -> tuple[int, ...]:
    cmd = kustomize_cmd()
    out = subprocess.run(["kustomize", "version"] if cmd[0] == "kustomize" else ["kubectl", "version", "--client"],
                         capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"(?:Kustomize Version: |^)v?(\d+)\.(\d+)\.(\d+)", out, re.M)
    assert m, f"cannot tell the kustomize version from {out!r}"
    return tuple(int(x) for x in m.groups())


_rendered: dict[str, Docs] = {}


def render(name: str) -> Docs:
    if name not in _rendered:
        out = subprocess.run([*kustomize_cmd(), str(K8S / name)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"kustomize {name}: {out.stderr.strip()}"
        _rendered[name] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_rendered[name])


def one(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec.get("containers", [])


def workloads(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def secret_file(pod: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(secret name, key) that provides file `path` in container c, or None."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "secret" in vols[m["name"]]:
            sec = vols[m["name"]]["secret"]
            key = path[len(prefix):]
            items = sec.get("items")
            if items is not None:
                key = next((i["key"] for i in items if i["path"] == key), None)
            return (sec["secretName"], key) if key else None
    return None


# ---- the rules schemas cannot check: each returns the problems it finds ----

def agent_problems(docs: Docs, caps: set[str]) -> list[str]:
    p: list[str] = []
    ds = one(docs, "DaemonSet", "aimesh-agent")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c.get("securityContext", {})
    if not pod.get("hostPID"):
        p.append("hostPID must be true (process selectors, libssl discovery)")
    if pod.get("hostNetwork") and pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
        p.append("hostNetwork needs dnsPolicy ClusterFirstWithHostNet to resolve the collector")
    if sc.get("privileged"):
        p.append("agent: privileged")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        p.append(f"agent: capabilities.drop must be [ALL], is {sc.get('capabilities', {}).get('drop')}")
    add = sc.get("capabilities", {}).get("add", [])
    if sorted(add) != sorted(caps):
        p.append(f"agent: capabilities.add must be exactly {sorted(caps)}, is {sorted(add)}")
    if sc.get("allowPrivilegeEscalation") is not False:
        p.append("agent: allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        p.append("agent: readOnlyRootFilesystem must be true")
    seccomp = sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        p.append(f"agent: seccompProfile must be RuntimeDefault, is {seccomp}")
    env = {e["name"]: e for e in c.get("env", [])}
    if env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        p.append("agent: NODE_NAME must come from fieldRef spec.nodeName")
    # volumes and mounts: exactly the expected set, read-only where the agent does not write
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    if set(vols) != set(AGENT_VOLUMES) or set(mounts) != set(AGENT_VOLUMES):
        p.append(f"agent: volumes {sorted(vols)} / mounts {sorted(mounts)} must be exactly {sorted(AGENT_VOLUMES)}")
    for name, (host, ro) in AGENT_VOLUMES.items():
        v, m = vols.get(name, {}), mounts.get(name, {})
        if host is not None and v.get("hostPath", {}).get("path") != host:
            p.append(f"agent: volume {name} must be hostPath {host}, is {v}")
        if host is None and "hostPath" in v:
            p.append(f"agent: volume {name} must not be a hostPath")
        if host in ("/lib/modules", "/usr/src", "/sys/fs/bpf", "/sys/fs/cgroup", "/sys/kernel/tracing") \
                and m.get("mountPath") != host:
            p.append(f"agent: {host} must be mounted at the same path (symlinks between them; the agent's paths)")
        if bool(m.get("readOnly")) != ro:
            p.append(f"agent: mount {name} must be {'read-only' if ro else 'read-write'}")
        if "subPath" in m or "subPathExpr" in m:
            p.append(f"agent: mount {name} uses subPath (never updated by kubelet)")
    if mounts.get("bpffs", {}).get("mountPropagation") == "Bidirectional":
        p.append("agent: Bidirectional propagation needs privileged")
    cfg = arg_after(c["args"], "--config")
    cfg_mount = mounts.get("config", {}).get("mountPath", "")
    if Path(cfg).parent != Path(cfg_mount) or "configMap" not in vols.get("config", {}):
        p.append(f"agent: --config {cfg} must be a file of the ConfigMap volume at {cfg_mount}")
    if "--watch-config" in c["args"] and arg_after(c["args"], "--watch-config") == "off":
        p.append("agent: --watch-config off: ConfigMap changes would need a restart")
    # probes
    port = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}.get("metrics")
    metrics_addr = arg_after(c["args"], "--metrics-addr")
    if port is None or not metrics_addr.endswith(f":{port}"):
        p.append(f"agent: --metrics-addr {metrics_addr} must listen on the metrics port {port}")
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("metrics", port):
            p.append(f"agent: {probe} must GET {path} on the metrics port, is {get}")
    # every node, whatever its taints
    if not any(t.get("operator") == "Exists" and not t.get("key") and not t.get("effect")
               for t in pod.get("tolerations", [])):
        p.append("agent: needs a toleration {operator: Exists} (no key, no effect) to run on every node")
    if pod.get("nodeSelector") or pod.get("affinity"):
        p.append("agent: a nodeSelector or affinity would leave nodes ungoverned")
    res = c.get("resources", {})
    if not {"cpu", "memory"} <= set(res.get("requests", {})) or "memory" not in res.get("limits", {}):
        p.append("agent: needs cpu and memory requests and a memory limit")
    sa = pod.get("serviceAccountName")
    if not any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs):
        p.append(f"agent: service account {sa} is not in the render")
    binding = [d for d in docs if d["kind"] == "ClusterRoleBinding"
               and {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in d.get("subjects", [])]
    if len(binding) != 1 or binding[0]["roleRef"]["name"] != "aimesh-agent":
        p.append(f"agent: service account {sa} must be bound to ClusterRole aimesh-agent exactly once")
    return p


def no_privileged_problems(docs: Docs) -> list[str]:
    p: list[str] = []
    for where, pod in workloads(docs):
        for c in containers(pod):
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                p.append(f"{where}/{c['name']}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                p.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                p.append(f"{where}/{c['name']}: readOnlyRootFilesystem must be true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                p.append(f"{where}/{c['name']}: must drop ALL capabilities")
    return p


def rbac_problems(docs: Docs) -> list[str]:
    p: list[str] = []
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    if [r["metadata"]["name"] for r in roles] != ["aimesh-agent"] or roles[0]["kind"] != "ClusterRole":
        return [f"exactly one ClusterRole aimesh-agent expected, found {[r['metadata']['name'] for r in roles]}"]
    granted: set[tuple[str, str]] = set()
    for i, rule in enumerate(roles[0].get("rules", [])):
        if set(rule) - {"apiGroups", "resources", "verbs"}:
            p.append(f"rules[{i}]: only apiGroups, resources and verbs (no resourceNames, nonResourceURLs)")
        if set(rule.get("verbs", [])) != READ_VERBS or len(rule["verbs"]) != 3:
            p.append(f"rules[{i}].verbs must be exactly get, list, watch: {rule.get('verbs')}")
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                granted.add((g, r))
    if granted != RBAC_RULES:
        p.append(f"the ClusterRole grants {sorted(granted)}, must be exactly {sorted(RBAC_RULES)}")
    return p


def collector_problems(docs: Docs) -> list[str]:
    """Pod Security "restricted" for the collector, and TLS + token wiring that lines up with the agent's config."""
    p: list[str] = []
    dep = one(docs, "Deployment", "aimesh-collector")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    for host in ("hostPID", "hostNetwork", "hostIPC"):
        if pod.get(host):
            p.append(f"collector: {host}")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        p.append("collector: hostPath volume")
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) or (sc.get("runAsUser", psc.get("runAsUser")) == 0):
        p.append("collector: must run as non-root")
    if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
        p.append("collector: must drop ALL capabilities and add none")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        p.append("collector: seccompProfile RuntimeDefault")
    if dep["spec"].get("replicas", 1) != 1 or dep["spec"].get("strategy", {}).get("type") != "Recreate":
        p.append("collector: one replica, Recreate (one SQLite writer on a ReadWriteOnce volume)")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in vols.values() if "persistentVolumeClaim" in v}
    for claim in claims:
        one(docs, "PersistentVolumeClaim", claim)
    db = arg_after(c["args"], "--db")
    if not any(m["name"] in vols and "persistentVolumeClaim" in vols[m["name"]]
               and db.startswith(m["mountPath"].rstrip("/") + "/") for m in c.get("volumeMounts", [])):
        p.append(f"collector: --db {db} must be on the PersistentVolumeClaim")
    if "--no-auth" in c["args"]:
        p.append("collector: --no-auth")
    tls = {flag: secret_file(pod, c, arg_after(c["args"], flag)) for flag in ("--tls-cert", "--tls-key")}
    token = secret_file(pod, c, arg_after(c["args"], "--token-file"))
    if None in tls.values() or token is None:
        p.append(f"collector: --tls-cert/--tls-key/--token-file must be files of mounted Secrets: {tls}, {token}")
    # the Service and the agent's view of it
    svc = one(docs, "Service", "aimesh-collector")
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}
    listen = int(arg_after(c["args"], "--listen").rsplit(":", 1)[1])
    grpc = next((sp for sp in svc["spec"]["ports"] if sp.get("targetPort") in ("grpc", listen)), None)
    if ports.get("grpc") != listen or grpc is None:
        p.append("collector: the Service must target the --listen port")
    if svc["spec"]["selector"].items() - dep["spec"]["template"]["metadata"]["labels"].items():
        p.append("collector: the Service selects no collector pod")
    ds = one(docs, "DaemonSet", "aimesh-agent")
    apod = ds["spec"]["template"]["spec"]
    (ac,) = apod["containers"]
    cfg = agent_config(docs)["collector"]
    host, port = cfg["address"].rsplit(":", 1)
    if host != f"aimesh-collector.{NAMESPACE}.svc" or grpc is None or int(port) != grpc["port"]:
        p.append(f"agent: collector.address {cfg['address']} must be the collector Service's name and gRPC port")
    ca = secret_file(apod, ac, cfg.get("tls_ca", ""))
    if ca is None or tls["--tls-cert"] is None or ca[0] != tls["--tls-cert"][0]:
        p.append(f"agent: collector.tls_ca {cfg.get('tls_ca')} must come from the collector's TLS Secret")
    atoken = secret_file(apod, ac, cfg.get("token_file", ""))
    if atoken is None or atoken != token:
        p.append(f"agent: collector.token_file must be the collector's token Secret: {atoken} vs {token}")
    spool = cfg.get("spool_dir", "")
    state = next((m for m in ac["volumeMounts"] if m["name"] == "state"), {})
    if not str(spool).startswith(state.get("mountPath", "?")):
        p.append(f"agent: collector.spool_dir {spool} must be on the state volume (writable, kept across restarts)")
    return p


def servicemonitor_problems(docs: Docs) -> list[str]:
    p: list[str] = []
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        name, spec = sm["metadata"]["name"], sm["spec"]
        if set(spec) - {"selector", "namespaceSelector", "endpoints", "jobLabel"}:
            p.append(f"ServiceMonitor/{name}: unexpected fields {sorted(set(spec) - {'selector', 'endpoints'})}")
        want = spec["selector"]["matchLabels"]
        svcs = [d for d in docs if d["kind"] == "Service" and want.items() <= d["metadata"].get("labels", {}).items()
                and d["metadata"]["namespace"] in spec.get("namespaceSelector", {}).get("matchNames", [])]
        if len(svcs) != 1:
            p.append(f"ServiceMonitor/{name}: selects {len(svcs)} Services, expected 1")
            continue
        names = {sp.get("name") for sp in svcs[0]["spec"]["ports"]}
        for ep in spec["endpoints"]:
            if ep.get("port") not in names or not str(ep.get("path", "/metrics")).startswith("/"):
                p.append(f"ServiceMonitor/{name}: endpoint port {ep.get('port')} not a port of {names}")
            if set(ep) - {"port", "path", "interval", "relabelings", "scheme", "scrapeTimeout"}:
                p.append(f"ServiceMonitor/{name}: unexpected endpoint fields {sorted(ep)}")
    if len([d for d in docs if d["kind"] == "ServiceMonitor"]) != 2:
        p.append("expected ServiceMonitors for the agents and the collector")
    return p


def agent_config(docs: Docs) -> dict[str, Any]:
    cm = one(docs, "ConfigMap", "aimesh-config")
    return yaml.safe_load(cm["data"]["aimesh.yaml"])


# ---- tests ----

def test_kustomize_is_recent_enough():
    assert kustomize_version() >= (5, 0, 0), "components and `labels:` need kustomize v5"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates_against_kubernetes_schemas(name):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (make setup)")
    docs = render(name)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                          "ConfigMap", "DaemonSet", "Deployment", "Service",
                                          "PersistentVolumeClaim", "ServiceMonitor"}
    for version in K8S_VERSIONS:
        for d in docs:
            label = f"{d['kind']}/{d['metadata']['name']} against {version}"
            if (d["apiVersion"], d["kind"]) in CRDS:
                with pytest.raises(kv.utils.SchemaNotFoundError):   # still no schema: checked structurally below
                    kv.validate(d, version, strict=True)
                continue
            try:
                kv.validate(d, version, strict=True)
            except kv.utils.ValidationError as e:
                pytest.fail(f"{name}: {label}: {e.message} at {'/'.join(map(str, e.path))}")
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_strict_validation_rejects_an_unknown_field():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (make setup)")
    ds = one(render("base"), "DaemonSet", "aimesh-agent")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(ds, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rules_schemas_cannot_check(name):
    docs = render(name)
    problems = (agent_problems(docs, CAPS_BY_RENDER[name]) + no_privileged_problems(docs) + rbac_problems(docs)
                + collector_problems(docs) + servicemonitor_problems(docs))
    assert problems == []


def mutate(path: str, fn: Callable[[dict[str, Any]], None]) -> Docs:
    docs = render("base")
    kind, name = path.split("/")
    fn(one(docs, kind, name))
    return docs


def _agent(d):   # the agent container of a DaemonSet
    return d["spec"]["template"]["spec"]["containers"][0]


MUTATIONS = {
    "privileged": ("DaemonSet/aimesh-agent", lambda d: _agent(d)["securityContext"].update(privileged=True)),
    "extra cap": ("DaemonSet/aimesh-agent",
                  lambda d: _agent(d)["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")),
    "missing cap": ("DaemonSet/aimesh-agent",
                    lambda d: _agent(d)["securityContext"]["capabilities"]["add"].remove("PERFMON")),
    "no drop": ("DaemonSet/aimesh-agent", lambda d: _agent(d)["securityContext"]["capabilities"].pop("drop")),
    "rw cgroup": ("DaemonSet/aimesh-agent",
                  lambda d: next(m for m in _agent(d)["volumeMounts"] if m["name"] == "cgroup").pop("readOnly")),
    "rw modules": ("DaemonSet/aimesh-agent",
                   lambda d: next(m for m in _agent(d)["volumeMounts"] if m["name"] == "modules").update(
                       readOnly=False)),
    "subPath config": ("DaemonSet/aimesh-agent",
                       lambda d: next(m for m in _agent(d)["volumeMounts"] if m["name"] == "config").update(
                           subPath="aimesh.yaml")),
    "NODE_NAME from metadata": ("DaemonSet/aimesh-agent",
                                lambda d: next(e for e in _agent(d)["env"] if e["name"] == "NODE_NAME")[
                                    "valueFrom"]["fieldRef"].update(fieldPath="metadata.name")),
    "no liveness": ("DaemonSet/aimesh-agent", lambda d: _agent(d).pop("livenessProbe")),
    "readiness on livez": ("DaemonSet/aimesh-agent",
                           lambda d: _agent(d)["readinessProbe"]["httpGet"].update(path="/livez")),
    "keyed toleration": ("DaemonSet/aimesh-agent",
                         lambda d: d["spec"]["template"]["spec"].update(
                             tolerations=[{"key": "gpu", "operator": "Exists"}])),
    "rw root": ("DaemonSet/aimesh-agent", lambda d: _agent(d)["securityContext"].update(readOnlyRootFilesystem=False)),
    "create verb": ("ClusterRole/aimesh-agent", lambda d: d["rules"][0]["verbs"].append("create")),
    "secrets": ("ClusterRole/aimesh-agent", lambda d: d["rules"][0]["resources"].append("secrets")),
    "wildcard group": ("ClusterRole/aimesh-agent", lambda d: d["rules"][1].update(apiGroups=["*"])),
    "collector as root": ("Deployment/aimesh-collector",
                          lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0)),
    "collector no auth": ("Deployment/aimesh-collector", lambda d: _agent(d)["args"].append("--no-auth")),
    "agent trusts another CA": ("ConfigMap/aimesh-config", lambda d: d["data"].update(
        {"aimesh.yaml": d["data"]["aimesh.yaml"].replace("/etc/aimesh/tls/ca.crt", "/etc/ssl/ca.crt")})),
}


@pytest.mark.parametrize("what", MUTATIONS)
def test_each_rule_catches_its_violation(what):
    path, fn = MUTATIONS[what]
    docs = mutate(path, fn)
    problems = (agent_problems(docs, AGENT_CAPS) + no_privileged_problems(docs) + rbac_problems(docs)
                + collector_problems(docs))
    assert problems, f"{what}: no rule noticed"


def test_the_configmap_is_the_checked_config_file():
    cm = one(render("base"), "ConfigMap", "aimesh-config")
    assert cm["data"]["aimesh.yaml"] == (K8S / "base" / "aimesh.yaml").read_text()
    cfg = yaml.safe_load(cm["data"]["aimesh.yaml"])
    for ident in cfg["identities"]:
        for entry in ident.get("select", {}).get("pods", []):
            assert set(entry) <= {"namespace", "namespaceSelector", "podSelector", "serviceAccount", "container"}
            assert set(entry.get("podSelector", {})) <= {"matchLabels", "matchExpressions"}
    assert cfg["kubernetes"]["unresolved"] in ("deny", "allow", "audit")


def test_the_configmap_config_loads():
    """The shipped config is a valid one of the real config model, and what its comments say holds: in audit mode,
    `unresolved: deny` only audits (governed, not enforced)."""
    from datetime import datetime, timezone

    from agent.config import UNRESOLVED, parse_config
    from agent.kernel import abi
    from agent.policy.compile import compile_image, unresolved_flags
    from agent.policy.identities import IdentityNumbering
    text = (K8S / "base" / "aimesh.yaml").read_text()
    cfg = parse_config(text, "deploy/k8s/base/aimesh.yaml")
    assert cfg.mode == "audit" and cfg.k8s.unresolved == "deny" and cfg.uses_kubernetes
    assert unresolved_flags(cfg) == abi.IdentityFlag.GOVERNED          # governed, not ENFORCE: audited
    enforcing = parse_config(text.replace("mode: audit", "mode: enforce"), "aimesh.yaml")
    assert unresolved_flags(enforcing) & abi.IdentityFlag.ENFORCE
    image = compile_image(cfg, IdentityNumbering(), 0, datetime.now(timezone.utc))
    assert UNRESOLVED in {m.name for m in image.identities.values()}
