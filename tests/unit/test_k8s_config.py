"""The Kubernetes parts of the config: select.pods, service/pods endpoints, the kubernetes section, `unresolved`."""
from __future__ import annotations

import pytest

from agent.config import ConfigError, PodsEndpoint, ServiceEndpoint, parse_config

ISSUE_EXAMPLE = """
identities:
  - name: chat-frontend
    kind: service
    select:
      pods:
        - namespace: shop
          podSelector: {matchLabels: {app: chat}, matchExpressions: [{key: tier, operator: In, values: [web]}]}
          serviceAccount: chat
          container: app
  - name: llama
    kind: model
    version: "3.1-8b"
    select: {pods: [{namespace: models, podSelector: {matchLabels: {model: llama, version: "3.1-8b"}}}]}
    endpoints:
      - {service: {namespace: models, name: llama}, ports: [8000]}
      - {pods: {namespace: models, podSelector: {matchLabels: {model: llama}}}}
      - "10.0.0.0/8:80"
kubernetes:
  unresolved: deny
"""


def test_the_issue_example_loads():
    cfg = parse_config(ISSUE_EXAMPLE)
    chat, llama = cfg.identities
    entry = chat.select.pods[0]
    assert (entry.namespace, entry.service_account, entry.container) == ("shop", "chat", "app")
    assert entry.pod_selector.match_labels == {"app": "chat"}
    assert entry.pod_selector.match_expressions[0].values == ["web"]
    svc, pods, cidr = llama.endpoints
    assert isinstance(svc, ServiceEndpoint) and svc.service.name == "llama" and svc.ports == [8000]
    assert isinstance(pods, PodsEndpoint) and pods.ports == []
    assert llama.cidr_endpoints == ["10.0.0.0/8:80"] and llama.k8s_endpoints == [svc, pods]
    assert cfg.uses_kubernetes and cfg.k8s.unresolved == "deny"


def test_defaults_and_node_name():
    cfg = parse_config("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {}}]}}]")
    assert cfg.kubernetes is None and cfg.uses_kubernetes
    assert cfg.k8s.unresolved == "deny" and cfg.k8s.kubeconfig is None
    assert cfg.k8s.node({"NODE_NAME": "node-a"}) == "node-a" and cfg.k8s.node({}) is None
    assert parse_config("kubernetes: {node_name: n1}").k8s.node({"NODE_NAME": "x"}) == "n1"
    plain = parse_config("identities: [{name: a, kind: service, select: {cgroups: ['/x']}}]")
    assert not plain.uses_kubernetes


@pytest.mark.parametrize("text,where", [
    ("identities: [{name: a, kind: service, select: {pods: [{podSelector: {}}]}}]",
     "identities.0.select.pods.0: give exactly one of namespace and namespaceSelector"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, namespaceSelector: {}, podSelector: {}}]}}]",
     "identities.0.select.pods.0: give exactly one of namespace and namespaceSelector"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x}]}}]",
     "identities.0.select.pods.0.podSelector: Field required"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: Shop, podSelector: {}}]}}]",
     "identities.0.select.pods.0.namespace: namespace 'Shop' is not a Kubernetes name"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {matchExpressions: "
     "[{key: a, operator: In}]}}]}}]",
     "identities.0.select.pods.0.podSelector.matchExpressions.0: operator In needs at least one value"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {matchExpressions: "
     "[{key: a, operator: Exists, values: [b]}]}}]}}]",
     "identities.0.select.pods.0.podSelector.matchExpressions.0: operator Exists takes no values"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {matchLabels: {a: 1}}}]}}]",
     "identities.0.select.pods.0.podSelector.matchLabels.a: Input should be a valid string"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {matchLabels: {'-a': b}}}]}}]",
     "identities.0.select.pods.0.podSelector.matchLabels: label key '-a' is not a label name"),
    ("identities: [{name: a, kind: service, select: {pods: [{namespace: x, podSelector: {}, container: App}]}}]",
     "identities.0.select.pods.0.container: container 'App' is not a Kubernetes name"),
    ("identities: [{name: a, kind: service, endpoints: [{service: {namespace: x, name: y}, pods: {}}]}]",
     "identities.0.endpoints.0: an endpoint is a CIDR string or a mapping with exactly one of service and pods"),
    ("identities: [{name: a, kind: service, endpoints: ['10.0.0.1', {service: {namespace: x}}]}]",
     "identities.0.endpoints.1.service.name: Field required"),
    ("identities: [{name: a, kind: service, endpoints: [{pods: {namespace: x, podSelector: {}}, ports: [0]}]}]",
     "identities.0.endpoints.0.ports: port 0 must be 1-65535"),
    ("identities: [{name: a, kind: service, endpoints: ['10.0.0.1', '10.0.0.1:x']}]",
     "identities.0.endpoints.1: port 'x'"),
    ("identities: [{name: unresolved, kind: service}]", "identities.0.name: name 'unresolved' is reserved"),
    ("identities: [{name: a, kind: service}]\npolicies: [{from: unresolved, to: a}]",
     "policies.0.from: unknown identity 'unresolved'"),
    ("kubernetes: {unresolved: maybe}", "kubernetes.unresolved: Input should be 'deny', 'allow' or 'audit'"),
    ("kubernetes: {watch: all}", "kubernetes.watch: Extra inputs are not permitted"),
    ("kubernetes: {node_name: 'a b'}", "kubernetes.node_name: node_name 'a b' is not a Kubernetes name"),
])
def test_errors_are_one_line_naming_the_field(text, where):
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="c.yaml")
    msg = str(e.value)
    assert msg.startswith(f"c.yaml: {where}"), msg
    assert "\n" not in msg


def test_policies_may_name_unresolved_when_kubernetes_is_used():
    cfg = parse_config("identities: [{name: a, kind: service}]\npolicies: [{from: unresolved, to: a}]\n"
                       "kubernetes: {unresolved: deny}")
    assert cfg.policies[0].from_ == ["unresolved"]
