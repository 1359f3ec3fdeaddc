"""Issue 23 without a kernel: a policy's `fast_path: true` compiles to POLICY_F_FAST_PATH on its TCP entries only (the
node-wide flag stays off), and the bench's conformance comparison counts what differs from no agent."""
from __future__ import annotations

from datetime import datetime, timezone

from agent.config import parse_config
from agent.kernel import abi
from agent.policy.compile import compile_image
from agent.policy.identities import IdentityNumbering
from bench import conformance

NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)
TEXT = """
identities:
  - {name: chat, kind: service, select: {cgroups: ["/t/chat"]}}
  - {name: batch, kind: service, select: {cgroups: ["/t/batch"]}}
  - {name: llama, kind: model, select: {cgroups: ["/t/llama"]}}
policies:
  - {from: chat, to: llama, ports: [8000], fast_path: true}
  - {from: batch, to: llama, ports: [8000]}
"""


def test_policy_fast_path_marks_its_tcp_entries_only():
    ids = IdentityNumbering()
    cfg = parse_config(TEXT, now=NOW)
    img = compile_image(cfg, ids, 1, NOW)
    names = {v: k for k, v in ids.to_state()["ids"].items()}
    flags = {(names[k.src], k.proto): v.flags for k, v in img.policies}
    assert flags[("chat", 6)] == abi.PolicyFlag.FAST_PATH
    assert flags[("chat", 17)] == 0                 # UDP never takes the fast path
    assert flags[("batch", 6)] == 0
    assert not img.config_flags & abi.ConfigFlag.FAST_PATH
    assert cfg.fast_path is False and cfg.policies[1].fast_path is False


def test_bench_conformance_compare():
    seen = {"none": {"a": 1, "b": [2]}, "enforce": {"a": 1, "b": [2]}, "fast": {"a": 1, "b": "EAGAIN"}}
    got = conformance.compare(seen, "none")
    assert got == {"enforce": {"identical": 2, "scenarios": 2, "differ": []},
                   "fast": {"identical": 1, "scenarios": 2, "differ": ["b"]}}
    assert conformance.line("3 fast", got["fast"]) == \
        "  conformance, 3 fast: 1/2 scenarios identical to no agent (differ: b)"
