"""Issue 10, kernel side without a kernel: the gateway parts of the config, and what the compiler makes of them
(POLICY_F_GATEWAY on the pairs that need L7, the reserved `gateway` identity, the redirect address)."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.kernel import abi
from agent.policy.compile import addr16, compile_image
from agent.policy.identities import IdentityNumbering

NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)
F, P = abi.IdentityFlag, abi.PolicyFlag


def cfg_text(openai_llm: str = "{protocol: openai, gateway: enforce}", policy: str = "models: ['gpt-4o*']",
             extra: str = "") -> str:
    return f"""
identities:
  - {{name: chat, kind: service, governed: true, select: {{cgroups: ["/t/chat"]}}}}
  - {{name: batch, kind: service, governed: true}}
  - name: openai
    kind: external
    endpoints: ["127.0.0.3:8443", "127.0.0.3:80"]
    llm: {openai_llm}
  - {{name: llama, kind: model, endpoints: ["127.0.0.4:8000"]}}
policies:
  - {{from: chat, to: openai, ports: [8443], {policy}}}
  - {{from: batch, to: openai, ports: [8443]}}
  - {{from: chat, to: llama}}
{extra}
"""


def _img(text: str):
    ids = IdentityNumbering()
    return compile_image(parse_config(text, now=NOW), ids, 1, NOW), ids


def _policies(img, ids) -> dict:
    names = {v: k for k, v in ids.to_state()["ids"].items()}
    return {(names[k.src], names[k.dst], k.port, k.proto): (v.rule_id, v.flags) for k, v in img.policies}


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, now=NOW)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_model_policy_pair_goes_to_the_gateway_others_keep_the_kernel_path():
    img, ids = _img(cfg_text())
    pol = _policies(img, ids)
    assert pol[("chat", "openai", 8443, 6)] == (0, P.GATEWAY)
    assert pol[("chat", "openai", 8443, 17)] == (0, 0)          # UDP never goes to the gateway
    assert pol[("batch", "openai", 8443, 6)] == (1, 0)          # no model fields, no lifecycle: kernel path
    assert pol[("chat", "llama", 0, 6)] == (2, 0)


def test_gateway_identity_runtime_address_and_allow_list():
    img, ids = _img(cfg_text())
    gid = ids.id_of("gateway")
    assert img.identities[gid].name == "gateway" and img.identities[gid].kind == "reserved"
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    assert flags["gateway"] == F.GOVERNED | F.ENFORCE | F.GATEWAY
    assert not flags["openai"] & F.GW_ORIGINATE
    pol = _policies(img, ids)
    assert pol[("gateway", "openai", 0, 6)] == (abi.RULE_ID_GATEWAY, 0)
    assert not any(k[0] == "gateway" and k[1] != "openai" for k in pol)   # only the gateway destinations
    assert img.gw_addr == addr16(__import__("ipaddress").ip_address("127.0.0.1")) and img.gw_port == 15001


def test_no_gateway_destination_means_no_gateway_identity_and_no_redirect_address():
    img, _ = _img(cfg_text("{protocol: openai}", "protocol: tcp"))
    assert "gateway" not in {m.name for m in img.identities.values()}
    assert img.gw_port == 0 and img.gw_addr == bytes(16)
    assert all(v.flags == 0 for _, v in img.policies)


def test_redirect_address_and_gateway_mode():
    img, _ = _img(cfg_text(extra='gateway: {listen: "0.0.0.0:15001", redirect_address: "[::1]:15002", mode: audit}'))
    assert img.gw_addr == bytes(15) + b"\x01" and img.gw_port == 15002
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    assert flags["gateway"] == F.GOVERNED | F.GATEWAY               # audit: not enforced


def test_destination_lifecycle_or_originate_puts_every_pair_through_the_gateway():
    llm = ('{protocol: openai, gateway: enforce, tls: originate, '
           'models: [{name: gpt-4-0613, deprecated: {sunset: "2026-06-30", successor: gpt-4o}}]}')
    img, ids = _img(cfg_text(llm, "protocol: tcp"))
    pol = _policies(img, ids)
    assert pol[("chat", "openai", 8443, 6)] == (0, P.GATEWAY)
    assert pol[("batch", "openai", 8443, 6)] == (1, P.GATEWAY)      # the policy itself has no model fields
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    assert flags["openai"] & F.GW_ORIGINATE
    sunset = parse_config(cfg_text(llm, "protocol: tcp"), now=NOW).identity("openai").llm.models[0].deprecated.sunset
    assert sunset == datetime(2026, 6, 30, tzinfo=timezone.utc) and sunset.tzinfo is not None


def test_intercept_marks_tls_expected():
    img, ids = _img(cfg_text("{protocol: openai, gateway: enforce, tls: intercept}"))
    assert _policies(img, ids)[("chat", "openai", 8443, 6)] == (0, P.GATEWAY | P.TLS)


def test_policy_fields_parse():
    c = parse_config(cfg_text(policy="models: ['gpt-4o*', 'text-embedding-3-*'], max_tokens: 4096, "
                                     "cap_max_tokens: true, tokens_per_minute: 20000, requests_per_minute: 600, "
                                     "tokens_per_day: 2000000"), now=NOW)
    p = c.policies[0]
    assert (p.models, p.max_tokens, p.cap_max_tokens, p.tokens_per_minute, p.requests_per_minute,
            p.tokens_per_day) == (["gpt-4o*", "text-embedding-3-*"], 4096, True, 20000, 600, 2000000)
    assert c.gateway.listen == "127.0.0.1:15001" and c.gateway.ca_dir == Path("/var/lib/aimesh/ca")
    assert c.uses_gateway and not c.pair_needs_l7(c.policies[1], "openai")


@pytest.mark.parametrize("policy, needle", [
    ("tokens_per_minute: 0", "policies.0.tokens_per_minute: must be > 0"),
    ("requests_per_minute: -5", "policies.0.requests_per_minute: must be > 0"),
    ("max_tokens: 0", "policies.0.max_tokens: must be > 0"),
    ("tokens_per_day: '100'", "policies.0.tokens_per_day"),
    ("cap_max_tokens: true", "cap_max_tokens: caps requests at max_tokens, which is not set"),
    ("models: []", "policies.0.models: an empty list allows no model"),
    ("models: ['gpt-[4o']", "is not closed"),
    ("models: ['gpt 4']", "has a space"),
    ("models: ['gpt-4o'], protocol: udp", "policies.0: protocol: udp cannot carry a model policy"),
    ("model: ['gpt-4o']", "policies.0.model: Extra inputs are not permitted"),
])
def test_bad_policy_fields_name_the_field(policy, needle):
    assert needle in _error(cfg_text(policy=policy))


def test_model_policy_to_a_destination_without_the_gateway_names_both():
    msg = _error(cfg_text("{protocol: openai}"))
    assert "policies.0" in msg and "'openai'" in msg and "identities.2.llm.gateway: enforce" in msg
    assert "world" in _error(cfg_text(extra="").replace("to: llama}", "to: world, models: [x]}"))


@pytest.mark.parametrize("llm, needle", [
    ("{protocol: openai, tls: originate}", "identities.2.llm: Value error, tls: takes effect in the L7 gateway only"),
    ("{protocol: openai, models: [{name: gpt-4}]}", "models: model lifecycle takes effect in the L7 gateway only"),
    ("{protocol: 'off', gateway: enforce}", "gateway: enforce needs a protocol"),
    ("{protocol: openai, gateway: on}", "identities.2.llm.gateway"),
    ("{protocol: openai, gateway: enforce, tls: both}", "identities.2.llm.tls"),
    ("{protocol: openai, gateway: enforce, models: [{name: 'gpt-*'}]}", "must be a name, not a glob"),
    ("{protocol: openai, gateway: enforce, models: [{name: a}, {name: a}]}", "model 'a' is listed twice"),
    ("{protocol: openai, gateway: enforce, models: [{name: a, deprecated: {sunset: 5}}]}", "not a number"),
    ("{protocol: openai, gateway: enforce, models: [{name: a, deprecated: {sunset: 2026-01-01, successor: a}}]}",
     "cannot succeed itself"),
    ("{protocol: openai, gateway: enforce, api_key_file: /nonexistent/key}", "'/nonexistent/key': No such file"),
    ("{protocol: openai, gateway: enforce, upstream_ca: /nonexistent/ca.pem}", "upstream_ca '/nonexistent/ca.pem'"),
])
def test_bad_llm_gateway_fields(llm, needle):
    msg = _error(cfg_text(llm))
    assert needle.replace("Value error, ", "") in msg, msg


def test_naive_model_sunset_is_utc():
    llm = "{protocol: openai, gateway: enforce, models: [{name: a, deprecated: {sunset: '2026-06-30T00:00:00'}}]}"
    d = parse_config(cfg_text(llm), now=NOW).identity("openai").llm.models[0].deprecated
    assert d.sunset.tzinfo is not None and d.sunset == datetime(2026, 6, 30, tzinfo=timezone.utc)


def test_api_key_file_must_be_0600_root_and_upstream_ca_must_exist(tmp_path):
    key, ca = tmp_path / "openai.key", tmp_path / "ca.pem"
    key.write_text("sk-test\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    os.chmod(key, 0o644)
    llm = f"{{protocol: openai, gateway: enforce, tls: originate, api_key_file: {key}, upstream_ca: {ca}}}"
    msg = _error(cfg_text(llm))
    assert "identities.2.llm.api_key_file" in msg and str(key) in msg and "mode 0644" in msg
    os.chmod(key, 0o600)
    if os.geteuid() == 0:
        os.chown(key, 0, 0)
        c = parse_config(cfg_text(llm), now=NOW)
        assert c.identity("openai").llm.api_key_file == key and c.identity("openai").llm.upstream_ca == ca
        os.chown(key, 1000, 1000)
        msg = _error(cfg_text(llm))
        assert str(key) in msg and "owned by uid 1000" in msg
    os.chmod(key, 0o600)
    assert "is not a regular file" in _error(cfg_text(llm.replace(str(ca), str(tmp_path))))


@pytest.mark.parametrize("gateway, needle", [
    ('{listen: "0.0.0.0:15001"}', "gateway: Value error, redirect_address: needed when listen"),
    ('{listen: "127.0.0.1"}', "gateway.listen: Value error, backend '127.0.0.1' needs a port"),
    ('{listen: "localhost:15001"}', "gateway.listen"),
    ('{redirect_address: "[::]:1"}', "is a wildcard address"),
    ('{ca_dir: relative/ca}', "gateway.ca_dir"),
    ('{mode: strict}', "gateway.mode"),
])
def test_bad_gateway_section(gateway, needle):
    assert needle.replace("Value error, ", "") in _error(cfg_text(extra=f"gateway: {gateway}"))


def test_gateway_is_a_reserved_name():
    assert "identities.0.name: name 'gateway' is reserved" in _error(
        "identities: [{name: gateway, kind: service}]")
    assert "unknown identity 'gateway'" in _error(cfg_text(extra="").replace("to: llama}", "to: gateway}"))


def test_origin_keys_and_values_as_the_kernel_writes_them():
    import socket

    from agent.gateway.origin import client_key, origin_of
    assert bytes(client_key("127.0.0.1", 40000).addr) == addr16(__import__("ipaddress").ip_address("127.0.0.1"))
    assert bytes(client_key("::ffff:127.0.0.1", 40000).addr) == bytes(client_key("127.0.0.1", 40000).addr)
    assert bytes(client_key("::1", 1).addr) == bytes(15) + b"\x01" and client_key("::1", 1).port == 1
    with pytest.raises(ValueError):
        client_key("127.0.0.1", 0)
    v = abi.GatewayOrigin(port=8443, family=2, flags=abi.GatewayOriginFlag.TLS, src_id=16, dst_id=17, policy_gen=1,
                          cookie=99, ts_ns=5)
    v.addr[:] = bytes(client_key("127.0.0.3", 1).addr)
    o = origin_of(v)
    assert (o.address, o.port, o.family, o.src_id, o.dst_id, o.tls_expected, o.cookie, o.ts_ns, o.policy_gen) == \
        ("127.0.0.3", 8443, socket.AF_INET, 16, 17, True, 99, 5, 1)
