"""Config validation: good configs parse, bad ones fail with the field and the value named, in one line."""
from __future__ import annotations

import ipaddress
import os
import signal
from pathlib import Path

import pytest
import yaml

from agent.config import (LOADERS, MAX_CONFIG_BYTES, ConfigError, LimitSettings, _parse_yaml, limits_of, load_config,
                          parse_backend, parse_config, parse_endpoint, parse_hostport)
from agent.kernel import abi

GOOD = """
mode: enforce
identities:
  - name: chat-frontend
    kind: service
    select:
      cgroups: ["/demo/chat*"]
      processes: [{exe: "*/python3*", cmdline: "*chat_app*", uids: [1000]}]
  - name: llama
    kind: model
    version: "3.1"
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


def test_empty_mapping_is_valid_enforce():
    cfg = parse_config("{}")
    assert cfg.mode == "enforce" and cfg.identities == []
    assert limits_of(cfg) == abi.Limits()


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
    ("identities: [{name: a, kind: model, select: {processes: [{cmdline: '*app*'}]}}]",
     "identities.0.select.processes.0: cmdline: any local user can put any command line in argv"),
    ("identities: [{name: a, kind: model, select: {processes: [{cmdline: '*app*', uids: []}]}}]",
     "identities.0.select.processes.0.uids"),
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


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "cfg.yaml")
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: ") and "\n" not in msg and len(msg) < 500, msg
    return msg


ONE = "identities: [{name: a, kind: model}, {name: b, kind: model}]\n"


@pytest.mark.parametrize("text, needle", [
    # versions are YAML strings: 3.10 would silently be 3.1
    ("identities: [{name: a, kind: model, version: 3.10}]", 'version must be a string: quote it (version: "3.10")'),
    ("identities: [{name: a, kind: model, version: 3}]", "version must be a string"),
    ("identities: [{name: a, kind: model, version: 2026-10-01}]", "version must be a string"),
    ("identities: [{name: a, kind: model, version: [1, 2]}]", "identities.0.version: Input should be a valid string"),
    ("identities: [{name: a, kind: model, version: {a: 1}}]", "identities.0.version: Input should be a valid string"),
    ("identities: [{name: a, kind: model, version: ''}]", "version is empty"),
    (f"identities: [{{name: a, kind: model, version: '{'v' * 65}'}}]", "version has 65 characters, at most 64"),
    ('identities: [{name: a, kind: model, version: "1\\n2"}]', "version has a non-printable character"),
    # names fullmatch: `$` would take a trailing newline
    ('identities: [{name: "a\\n", kind: model}]', "identities.0.name: name 'a\\n' must match"),
    (f"identities: [{{name: {'a' * 64}, kind: model}}]", "at most 63 characters"),
    ("identities: [{name: 5, kind: model}]", "identities.0.name: Input should be a valid string (got 5)"),
    # ports: ASCII digits, numbers not strings
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1:\uff18\uff10']}]", "is not an address or CIDR"),
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1: 80']}]", "is not an address or CIDR"),
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1:80\\n']}]", "must be 1-65535"),
    ("identities: [{name: a, kind: model, endpoints: ['[fe80::1%eth0]:80']}]", "no spaces or zone ids"),
    (ONE + "policies: [{from: a, to: b, ports: ['80']}]", "policies.0.ports.0: Input should be a valid integer"),
    (ONE + "policies: [{from: a, to: b, ports: [true]}]", "policies.0.ports.0: Input should be a valid integer"),
    (ONE + "redirects: [{to: a, backends: [{address: '127.0.0.1:\u0668\u0660'}]}]", "is not an address or CIDR (ASCII"),
    # collector.address: HOST:PORT
    ("collector: {address: collector}", "collector.address: 'collector' must be HOST:PORT"),
    ("collector: {address: 'collector:0'}", "port '0' in 'collector:0' must be 1-65535"),
    ("collector: {address: 'collector:65536'}", "must be 1-65535"),
    ("collector: {address: '::1:4317'}", "write IPv6 addresses in brackets"),
    ("collector: {address: '[10.0.0.1]:4317'}", "is not an IPv6 address"),
    ("collector: {address: 'bad_host:4317'}", "is not a host name or IPv4 address"),
    ("collector: {address: '300.1.1.1:4317'}", "is not an IPv4 address"),
    ("collector: {address: 'h\u00e9:4317'}", "must be HOST:PORT in ASCII"),
    ("collector: {address: 'host:４３１７'}", "must be HOST:PORT in ASCII"),
    ("collector: {agent_id: \"a\\nb\"}", "agent_id has a non-printable character"),
    ("collector: {tls_ca: \"/a\\u0000b\"}", "collector.tls_ca: the path has a non-printable character"),
    ("collector: {queue_records: 100000000000}", "collector.queue_records"),
    # duplicates that would silently overwrite each other in the maps
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.0/24:80']},"
     " {name: b, kind: model, endpoints: ['10.0.0.9/24:80']}]",
     "identities.1.endpoints.0: '10.0.0.9/24:80' is the same endpoint as '10.0.0.0/24:80' of identities.0 (a)"),
    ("identities: [{name: a, kind: model, endpoints: ['10.0.0.1:80', '[::ffff:10.0.0.1]:80']}]",
     "identities.0.endpoints.1: '[::ffff:10.0.0.1]:80' is the same endpoint as '10.0.0.1:80' of identities.0 (a)"),
    (ONE + "redirects: [{to: a, backends: [{address: '127.0.0.1:1'}]}, {to: a, backends: [{address: '127.0.0.1:2'}]}]",
     "redirects.1: the redirect from any source to 'a' is also redirects.0"),
    (ONE + "redirects: [{from: [b, b], to: a, backends: [{address: '127.0.0.1:1'}]}]",
     "redirects.0: the redirect from 'b' to 'a' is also redirects.0"),
    # successor cycles
    ("identities: [{name: a, kind: model, deprecated: {sunset: 2030-01-01, successor: b}},"
     " {name: b, kind: model, deprecated: {sunset: 2030-01-01, successor: a}}]",
     "identities.0.deprecated.successor: successors form a cycle (a -> b -> a)"),
    ("identities: [{name: a, kind: model, deprecated: {sunset: 2030-01-01, successor: b}},"
     " {name: b, kind: model, deprecated: {sunset: 2030-01-01, successor: c}},"
     " {name: c, kind: model, deprecated: {sunset: 2030-01-01, successor: b}}]",
     "identities.1.deprecated.successor: successors form a cycle (b -> c -> b)"),
    ("identities: [{name: a, kind: model, deprecated: {sunset: 1700000000}}]", "sunset must be a date"),
    # documents that used to be "ok"
    ("", "the file holds no YAML document"),
    ("  \n \n", "the file holds no YAML document"),
    ("# only a comment\n", "the file holds no YAML document"),
    ("~", "the document is empty (null)"),
    ("---\n", "the document is empty (null)"),
    ("policies: []\npolicies: []", "line 2 column 1: not valid YAML: duplicate key 'policies'"),
    ("identities: [{name: a, kind: model, kind: service}]", "duplicate key 'kind'"),
    ("collector: {tls: true, tls: false}", "duplicate key 'tls'"),
    ("mode: enforce\n---\nmode: audit\n", "expected a single document in the stream"),
    # YAML features that expand or hide what the file says
    ("x: &a [1]\nmode: *a", "YAML anchors are not allowed (&a)"),
    ("mode: *a", "YAML aliases are not allowed (*a)"),
    ("mode: !!str enforce", "YAML tags are not allowed"),
    ("mode: !!python/object:os.system x", "YAML tags are not allowed"),
    ("collector: {<<: {tls: true}}", "keys must be strings, not a merge key (<<)"),
    ("1: x", "keys must be strings, not '1'"),
    ("? [a]\n: x", "keys must be strings, not a collection"),
    ("mode: " + "[" * 65 + "]" * 65, "nested deeper than 64 levels"),
    ("[" * 200_000, "nest"),   # libyaml's scanner stops at 1000 levels, before our composer sees 65
    ("identities: [{name: a, kind: model, deprecated: {sunset: 2026-13-45}}]", "'2026-13-45' is not a valid timestamp"),
    ("identities: [{name: a, kind: model, deprecated: {sunset: '2026-02-30T00:00:00Z'}}]",
     "identities.0.deprecated.sunset"),
    ("telemetry: {udp_window: " + "9" * 5000 + "}", "is not a valid int"),
    ("telemetry: {udp_window: .nan}", "telemetry.udp_window: Input should be a finite number"),
    ("mode: \x07", "character U+0007 at offset 6 is not allowed"),
    ('"bo\\ngus": 1', "'bo\\ngus': Extra inputs are not permitted"),
    # limits
    ("limits: {max_policies: 0}", "limits.max_policies: Input should be greater than or equal to 1"),
    ("limits: {max_policies: 2000000}", "limits.max_policies: Input should be less than or equal to 1048576"),
    ("limits: {max_policies: '1000'}", "limits.max_policies: Input should be a valid integer"),
    ("limits: {ringbuf_pages: 3}", "limits.ringbuf_pages: ring buffer pages must be a power of two"),
    ("limits: {max_maps: 3}", "limits.max_maps: Extra inputs are not permitted"),
    (ONE + "policies: [{from: a, to: b}]\nlimits: {max_policies: 3}",
     "map policy_verdict: the config needs 2 entries; a reload holds two generations at once, so 2 x 2 = 4 must fit "
     "in capacity 3 (limits.max_policies)"),
    (ONE + "policies: [{from: [a, b], to: [a, b], ports: [1, 2, 3]}]\nlimits: {max_policies: 20}",
     "policies: map policy_verdict: the config needs 24 entries, capacity 20"),
])
def test_hostile_and_sloppy_configs_are_one_line_errors(text, needle):
    assert needle in _error(text)


@pytest.mark.parametrize("text", ["x: &a [1]\nmode: *a", "mode: *a", "mode: !!str x", "a: 1\na: 2", "1: x",
                                  "mode: " + "[" * 65 + "]" * 65, "a: 2026-13-45", "a: x\n---\nb: y", "mode: \x07",
                                  "{a: [1, {b: c}]}", ""])
def test_both_yaml_loaders_refuse_alike(text):
    """libyaml's parser (used when present) and PyYAML's own go through the same composer checks."""
    outcomes = []
    for loader in LOADERS:
        try:
            outcomes.append(("ok", _parse_yaml(text, loader)))
        except (ConfigError, yaml.YAMLError) as e:
            outcomes.append(("error", type(e).__name__ if isinstance(e, yaml.YAMLError) else str(e)))
    assert all(o == outcomes[0] for o in outcomes), outcomes
    assert (outcomes[0][0] == "ok") == (text == "{a: [1, {b: c}]}")


def test_long_values_are_cut_in_errors():
    msg = _error(f"identities: [{{name: '{'X' * 10_000}', kind: model}}]")
    assert "..." in msg and len(msg) < 500


def test_many_errors_are_summarised():
    msg = _error("mode: x\ndns: y\nfast_path: z")
    assert msg.startswith("cfg.yaml: mode: ") and "(and 2 more errors)" in msg


def test_limits_section():
    cfg = parse_config("limits: {max_policies: 1024, ringbuf_pages: 64}")
    lim = limits_of(cfg)
    assert lim.max_policies == 1024 and lim.ringbuf_pages == 64 and lim.max_identities == abi.Limits().max_identities
    assert cfg.limits.max_policies == 1024


def test_limit_settings_mirror_abi_limits():
    import dataclasses
    from agent.config import RUNTIME_LIMITS   # runtime settings (runtime_config), not map capacities
    assert [f for f in LimitSettings.model_fields if f not in RUNTIME_LIMITS] == \
        [f.name for f in dataclasses.fields(abi.Limits)]
    assert limits_of(parse_config("{}")) == abi.Limits()


def test_parse_hostport():
    assert parse_hostport("collector.example.com:4317") == ("collector.example.com", 4317)
    assert parse_hostport("10.0.0.1:1") == ("10.0.0.1", 1)
    assert parse_hostport("[fd00::1]:65535") == ("fd00::1", 65535)
    for bad in ("", "x", ":80", "x:", "[::1]", "[::1]80", "a..b:1", "-a:1", "x:+80", "x:000080"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_good_examples_still_load():
    good = """
identities:
  - {name: a, kind: model, version: "3.10", endpoints: ["10.0.0.0/24:80", "10.0.0.0/24:81", "10.0.1.0/24:80"]}
  - {name: b, kind: service, deprecated: {sunset: 2030-01-01, successor: c}}
  - {name: c, kind: model, deprecated: {sunset: "2031-01-01T00:00:00+02:00", successor: a}}
policies: [{from: b, to: [a, c], ports: [80, 81]}]
redirects:
  - {from: b, to: a, backends: [{address: "[::1]:8000"}]}
  - {to: a, backends: [{address: "127.0.0.1:8000"}]}
collector: {address: "[::1]:4317", agent_id: node-1, tls_server_name: collector.example, spool_dir: null}
telemetry: {interim_interval: 0}
"""
    cfg = parse_config(good)
    assert cfg.identity("a").version == "3.10" and cfg.collector.address == "[::1]:4317"
    assert cfg.telemetry.interim_interval == 0.0


# ---- the file itself

@pytest.fixture
def alarm():
    """Fail instead of hanging: a read that blocks is a bug."""
    def on_alarm(*_):
        raise TimeoutError("load_config blocked")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _load_error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500, msg
    return msg


def test_fifo_is_refused_without_blocking(tmp_path: Path, alarm):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    assert _load_error(fifo) == f"{fifo}: not a regular file"


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/proc/self"])
def test_devices_and_directories_are_refused(path, alarm):
    assert _load_error(path) == f"{path}: not a regular file"


def test_missing_and_unreadable(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    assert _load_error(missing) == f"{missing}: cannot read: No such file or directory"
    assert "cannot read" in _load_error(str(tmp_path / "a\x00b"))


def test_oversize_file_is_refused_before_parsing(tmp_path: Path):
    p = tmp_path / "big.yaml"
    p.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    assert _load_error(p) == f"{p}: the file is larger than {MAX_CONFIG_BYTES} bytes"
    p.write_bytes(b"mode: audit\n" + b"#" * (MAX_CONFIG_BYTES - 20) + b"\n")
    assert load_config(p).mode == "audit"


def test_non_utf8_file(tmp_path: Path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("mode: enforce # caf\u00e9\n".encode("latin-1"))
    assert _load_error(p) == f"{p}: not UTF-8: byte 0xe9 at offset 19"


def test_bom_and_symlink_to_regular_file(tmp_path: Path):
    p = tmp_path / "real.yaml"
    p.write_bytes(b"\xef\xbb\xbfmode: audit\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(p)
    assert load_config(link).mode == "audit"


def test_examples_in_the_repo_load():
    import yaml
    repo = Path(__file__).resolve().parents[2]
    demo = yaml.safe_load((repo / "deploy/examples/demo.yaml").read_text())
    demo.pop("demo")
    assert parse_config(yaml.safe_dump(demo, sort_keys=False)).identity("llama").version == "3.1-8b"
    # The Kubernetes config (deploy/k8s/base/aimesh.yaml) is loaded by tests/unit/test_k8s_manifests.py.


def test_long_successor_chain_and_cycle():
    n = 5000
    dep = "deprecated: {{sunset: 2030-01-01, successor: a{}}}"
    lines = ["identities:"] + [f"  - {{name: a{i}, kind: model, {dep.format(i + 1)}}}" for i in range(n)]
    assert len(parse_config("\n".join(lines + [f"  - {{name: a{n}, kind: model}}"])).identities) == n + 1
    msg = _error("\n".join(lines + [f"  - {{name: a{n}, kind: model, {dep.format(7)}}}"]))
    assert "identities.7.deprecated.successor: successors form a cycle (a7 -> a8 -> " in msg and msg.endswith("...")


def test_llm_capture_settings():
    cfg = parse_config("identities: [{name: m, kind: model}, {name: s, kind: service},"
                       " {name: e, kind: external, llm: {protocol: anthropic, capture_content: true}}]")
    m, s, e = cfg.identities
    assert m.llm_capture.protocol == "auto" and m.llm_capture.enabled and not m.llm_capture.capture_content
    assert s.llm_capture.protocol == "off" and not s.llm_capture.enabled
    assert e.llm_capture.protocol == "anthropic" and e.llm_capture.capture_content
    for bad in ("{protocol: grpc}", "{capture_content: 1}", "{protocol: auto, extra: 1}"):
        with pytest.raises(ConfigError, match="llm"):
            parse_config(f"identities: [{{name: m, kind: model, llm: {bad}}}]")


def test_process_selectors_by_any_user_are_opt_in_and_warned_by_check():
    """issue 15: a cmdline selector needs uids: or an explicit allow_any_user; `aimesh check` names every selector
    any local user can satisfy."""
    from datetime import datetime, timezone

    from agent.policy.compile import compile_image
    from agent.policy.identities import IdentityNumbering
    cfg = parse_config("""
identities:
  - {name: a, kind: model, select: {processes: [{cmdline: "*app*", uids: [0]}, {exe: /usr/bin/true}]}}
  - {name: b, kind: model, select: {processes: [{cmdline: "*app*", allow_any_user: true}]}}
""")
    warnings = compile_image(cfg, IdentityNumbering(), 0, datetime.now(timezone.utc)).warnings
    assert [w for w in warnings if "any local user" in w] == [
        "identities 'a' select.processes[1]: any local user can run a process it matches and carry this identity "
        "(no uids:)",
        "identities 'b' select.processes[0]: any local user can run a process it matches and carry this identity "
        "(no uids:)"]
