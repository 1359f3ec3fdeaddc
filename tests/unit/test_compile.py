"""The policy compiler: config -> map image, without a kernel."""
from __future__ import annotations

from datetime import datetime, timezone

from agent.config import parse_config
from agent.kernel import abi
from agent.policy.compile import addr16, compile_image
from agent.policy.identities import IdentityNumbering

NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)

CFG = """
mode: enforce
identities:
  - {name: chat, kind: service}
  - {name: llama, kind: model, version: "3.1", mode: audit, endpoints: ["10.0.0.0/24:8000", "[fd00::/64]"],
     deprecated: {sunset: "2026-12-31T00:00:00Z", successor: next}}
  - {name: next, kind: model, endpoints: ["10.0.1.5:9000"]}
  - {name: svc, kind: service, governed: true}
policies:
  - {from: chat, to: llama, ports: [8000, 8001], protocol: tcp}
  - {from: [chat, svc], to: next}
redirects:
  - {from: [chat], to: llama, backends: [{address: "127.0.0.1:8001", weight: 3}, {address: "[::1]:8002", weight: 1}]}
"""


def _img(text=CFG, now=NOW, gen=1):
    ids = IdentityNumbering()
    return compile_image(parse_config(text), ids, gen, now), ids


def test_identity_flags_and_ids():
    img, ids = _img()
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    F = abi.IdentityFlag
    assert flags["chat"] == F.ENFORCE                       # service: not governed
    # audit override: no ENFORCE; sunset not reached; models have LLM capture on by default
    assert flags["llama"] == F.GOVERNED | F.DEPRECATED | F.LLM_CAPTURE
    assert flags["next"] == F.GOVERNED | F.ENFORCE | F.LLM_CAPTURE
    assert flags["svc"] == F.GOVERNED | F.ENFORCE            # governed: true on a service
    assert flags["unmanaged"] == F.ENFORCE and flags["world"] == F.ENFORCE
    assert ids.id_of("chat") >= abi.ID_FIRST_USER
    assert all(k.gen == 1 for k, _ in img.identity_info)
    assert img.next_transition == datetime(2026, 12, 31, tzinfo=timezone.utc)


def test_policies_expand_ports_and_protocols():
    img, ids = _img()
    keys = {(k.src, k.dst, k.port, k.proto, v.rule_id) for k, v in img.policies}
    c, l, n, s = (ids.id_of(x) for x in ("chat", "llama", "next", "svc"))
    assert {(c, l, 8000, 6, 0), (c, l, 8001, 6, 0)} <= keys
    assert {(c, n, 0, 6, 1), (c, n, 0, 17, 1), (s, n, 0, 6, 1), (s, n, 0, 17, 1)} <= keys
    assert len(keys) == 6


def test_endpoints_are_lpm_keys_in_16_byte_form():
    img, ids = _img()
    eps = {(k.prefixlen, k.port, bytes(k.addr)): v for k, v in img.endpoints}
    import ipaddress
    assert eps[(32 + 96 + 24, 8000, addr16(ipaddress.ip_address("10.0.0.0")))] == ids.id_of("llama")
    assert eps[(32 + 64, 0, ipaddress.ip_address("fd00::").packed)] == ids.id_of("llama")
    assert eps[(32 + 128, 9000, addr16(ipaddress.ip_address("10.0.1.5")))] == ids.id_of("next")


def test_redirect_backends_have_cumulative_weights():
    img, ids = _img()
    [(key, svc)] = img.redirects
    assert (key.src, key.dst) == (ids.id_of("chat"), ids.id_of("llama"))
    assert (svc.count, svc.total_weight, svc.first_backend, svc.flags) == (2, 4, 0, 0)
    b = [v for _, v in img.backends]
    assert [x.cum_weight for x in b] == [3, 4] and [x.port for x in b] == [8001, 8002]
    assert [x.is_v4 for x in b] == [1, 0]


def test_after_sunset_lifecycle_redirect_to_successor_endpoints():
    img, ids = _img(now=datetime(2027, 1, 2, tzinfo=timezone.utc))
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    assert flags["llama"] & abi.IdentityFlag.SUNSET
    # the user redirect to llama is superseded; the lifecycle redirect goes to next's single-host endpoint
    [(key, svc)] = img.redirects
    assert (key.src, key.dst, svc.target_id, svc.flags) == (abi.ID_NONE, ids.id_of("llama"), ids.id_of("next"),
                                                            abi.EventFlag.LIFECYCLE)
    [(_, b)] = img.backends
    assert b.port == 9000
    assert any("superseded" in w for w in img.warnings)
    assert img.next_transition is None


def test_after_sunset_without_concrete_successor_warns():
    text = CFG.replace('endpoints: ["10.0.1.5:9000"]', 'endpoints: ["10.0.1.0/24:9000"]')
    img, _ = _img(text, now=datetime(2027, 1, 2, tzinfo=timezone.utc))
    assert img.redirects == []
    assert any("no concrete backends" in w for w in img.warnings)


def test_numbering_is_stable_across_compiles():
    ids = IdentityNumbering()
    a = compile_image(parse_config(CFG), ids, 0, NOW)
    b = compile_image(parse_config(CFG.replace("- {name: chat, kind: service}\n", "- {name: new, kind: service}\n"
                                                                                  "  - {name: chat, kind: service}\n")),
                      ids, 1, NOW)
    name_to_id = lambda img: {m.name: i for i, m in img.identities.items()}
    assert name_to_id(a)["chat"] == name_to_id(b)["chat"]
    assert name_to_id(b)["new"] not in name_to_id(a).values()


def test_config_flags():
    img, _ = _img()
    assert img.config_flags == abi.ConfigFlag.DNS_ALLOW | abi.ConfigFlag.LLM_CAPTURE   # fast_path off by default
    img, _ = _img(CFG + "fast_path: true\n")
    assert img.config_flags == abi.ConfigFlag.DNS_ALLOW | abi.ConfigFlag.FAST_PATH | abi.ConfigFlag.LLM_CAPTURE
    img, _ = _img("dns: deny\nfast_path: false\n"
                  "identities: [{name: a, kind: service, select: {processes: [{exe: '*x'}]}}]")
    assert img.config_flags == abi.ConfigFlag.WATCH_EXEC


def test_hundred_thousand_rules_compile():
    names = [f"m{i}" for i in range(100)]
    lines = ["identities:"] + [f"  - {{name: {n}, kind: model}}" for n in names] + ["policies:"]
    lines += [f"  - {{from: {a}, to: {b}, ports: [{p}], protocol: tcp}}" for a in names for b in names
              for p in range(8000, 8010)]
    img, _ = _img("\n".join(lines))
    assert len(img.policies) == 100_000


def test_llm_capture_flags():
    text = """
identities:
  - {name: chat, kind: service}
  - {name: ext, kind: external, endpoints: ["10.0.0.1"]}
  - {name: quiet, kind: model, llm: {protocol: "off"}}
  - {name: svc, kind: service, llm: {protocol: openai, capture_content: true}}
"""
    img, _ = _img(text)
    flags = {img.identities[k.id].name: v.flags for k, v in img.identity_info}
    F = abi.IdentityFlag
    assert not flags["chat"] & F.LLM_CAPTURE and not flags["quiet"] & F.LLM_CAPTURE
    assert flags["ext"] & F.LLM_CAPTURE and flags["svc"] & F.LLM_CAPTURE
    assert img.config_flags & abi.ConfigFlag.LLM_CAPTURE
    img, _ = _img("identities: [{name: chat, kind: service}]")
    assert not img.config_flags & abi.ConfigFlag.LLM_CAPTURE
