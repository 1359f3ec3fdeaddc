"""Config validation: good configs parse, bad ones fail with the field and the value named."""
from __future__ import annotations

import ipaddress

import pytest

from agent.config import ConfigError, parse_backend, parse_config, parse_endpoint

GOOD = """
mode: enforce
identities:
  - name: chat-frontend
    kind: service
    select:
      cgroups: ["/demo/chat*"]
      processes: [{exe: "*/python3*", cmdline: "*chat_app*"}]
  - name: llama
    kind: model
    version: 3.1
    mode: audit
    select: {cgroups: ["/demo/llama*"]}
    endpoints: ["10.0.0.0/24:8000", "[fd00::/64]:8000"]
    deprecated: {sunset: "2026-12-31T00:00:00Z", successor: llama-next}
  - name: llama-next
    kind: model
  - name: openai
    kind: external
    endpoints: ["162.159.140.0/24:443"]
policies:
  - {from: chat-frontend, to: llama, ports: [8000]}
redirects:
  - {from: [chat-frontend], to: llama, backends: [{address: "127.0.0.1:8001", weight: 90}, {address: "127.0.0.1:8002", weight: 10}]}
"""


def test_good_config():
    cfg = parse_config(GOOD)
    assert [i.name for i in cfg.identities] == ["chat-frontend", "llama", "llama-next", "openai"]
    llama = cfg.identity("llama")
    assert llama.version == "3.1" and llama.mode == "audit" and llama.is_governed
    assert not cfg.identity("chat-frontend").is_governed
    assert cfg.policies[0].from_ == ["chat-frontend"] and cfg.policies[0].protocol == "any"
    assert cfg.redirects[0].backends[0].weight == 90


def test_empty_config_is_valid_enforce():
    cfg = parse_config("")
    assert cfg.mode == "enforce" and cfg.identities == []


@pytest.mark.parametrize("text, needle", [
    ("mode: enforse", "mode: Input should be 'enforce' or 'audit' (got 'enforse')"),
    ("identities: [{name: Bad_Name, kind: model}]", "identities.0.name: name 'Bad_Name' must match"),
    ("identities: [{name: a, kind: modle}]", "identities.0.kind"),
    ("identities: [{name: world, kind: model}]", "'world' is reserved"),
    ("identities: [{name: a, kind: model}, {name: a, kind: model}]", "identities.1.name: 'a' is defined twice"),
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.0/33:80']}]", "identities.0.endpoints"),
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1:99999']}]", "port '99999'"),
    ("identities: [{name: a, kind: model, select: {cgroups: ['demo']}}]", "must start with '/'"),
    ("identities: [{name: a, kind: model, deprecated: {sunset: 2026-01-01, successor: b}}]",
     "identities.0.deprecated.successor: unknown identity 'b'"),
    ("policies: [{from: x, to: world}]", "policies.0.from: unknown identity 'x'"),
    ("identities: [{name: a, kind: model}]\npolicies: [{from: a, to: a, ports: [0]}]", "policies.0.ports"),
    ("identities: [{name: a, kind: model}]\nredirects: [{to: a, backends: []}]", "at least one backend"),
    ("identities: [{name: a, kind: model}]\nredirects: [{to: a, backends: [{address: '10.0.0.0/24:80'}]}]",
     "must be one address"),
    ("identities: [{name: a, kind: model}]\nredirects: [{to: a, backends: [{address: '10.0.0.1'}]}]",
     "needs a port"),
    ("identities: [{name: a, kind: model}]\nredirects: [{to: a, backends: [{address: '10.0.0.1:1', weight: 0}]}]",
     "add up to 0"),
    ("bogus: 1", "bogus: Extra inputs are not permitted"),
    ("- a list", "top level must be a mapping"),
    ("mode: [", "not valid YAML"),
])
def test_bad_configs_name_the_field(text, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "cfg.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("cfg.yaml: ")


def test_parse_endpoint_forms():
    assert parse_endpoint("10.0.0.0/24:8000") == (ipaddress.ip_network("10.0.0.0/24"), 8000)
    assert parse_endpoint("[fd00::/64]:8000") == (ipaddress.ip_network("fd00::/64"), 8000)
    assert parse_endpoint("10.0.0.5") == (ipaddress.ip_network("10.0.0.5/32"), 0)
    assert parse_endpoint("[::1]") == (ipaddress.ip_network("::1/128"), 0)
    assert parse_endpoint("fd00::/8") == (ipaddress.ip_network("fd00::/8"), 0)
    assert parse_backend("[::1]:80") == (ipaddress.ip_address("::1"), 80)
