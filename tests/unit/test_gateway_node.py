"""The agent's side of the node gateway (agent/gateway/node.py): gateway records -> ModelCallRecords for the sinks,
the policy file, reload refusals; and the new record fields on the wire, in OTLP and in `aimesh calls --summary`."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import stat
from pathlib import Path

from agent.collector.calls import call_problem
from agent.collector.calls_cli import SummaryPrinter, call_cells, summarize
from agent.config import Config
from agent.export.model_calls import from_proto, to_proto
from agent.export.otlp import span_attributes
from agent.flows.model import IdentityData
from agent.gateway.node import GatewayNode, reload_refusal, to_call, write_policy
from agent.gateway.supervisor import SupervisorCounters
from agent.l7.llm import Operation, Protocol

CFG = {
    "identities": [
        {"name": "chat", "kind": "service", "governed": True, "select": {"cgroups": ["/chat"]}},
        {"name": "openai", "kind": "external", "endpoints": ["127.0.0.3:443"],
         "llm": {"protocol": "openai", "gateway": "enforce", "tls": "intercept"}},
    ],
    "policies": [{"from": "chat", "to": "openai", "ports": [443], "models": ["gpt-4o*"]}],
}
SERVED = {"gateway": True, "ts": 1764590000.5, "start_ns": 123, "source": "chat", "destination": "openai",
          "protocol": "openai", "operation": "chat", "request_model": "gpt-4-0613", "sent_model": "gpt-4o",
          "response_model": "gpt-4o", "stream": True, "policy": "policies[0]", "decision": "served",
          "reason": "model_retired: rewritten to gpt-4o", "status": 200, "error_type": None, "input_tokens": 5,
          "output_tokens": 7, "cached_tokens": None, "time_to_first_chunk_ns": 10, "duration_ns": 20,
          "output_chunks": 3, "finish_reasons": ["stop"], "request_bytes": 90, "response_bytes": 300,
          "incomplete": False, "max_tokens": 64, "temperature": 0.5, "include_usage": True, "tls": True, "seq": 0}
BAD_HTTP = {"gateway": True, "ts": 1764590001.0, "source": "chat", "destination": "openai", "protocol": "openai",
            "decision": "refused", "reason": "bad_http: 400", "status": 400, "error_type": "invalid_request_error",
            "policy": None, "request_model": None, "sent_model": None, "seq": 1}


def test_a_gateway_record_becomes_a_model_call_with_its_judgement():
    c = to_call(SERVED, {"chat": 7, "openai": 9}, 0)
    assert (c.src_id, c.dst_id, c.pid) == (7, 9, 0)
    r = c.record
    assert r.gateway and (r.policy, r.decision, r.sent_model) == ("policies[0]", "served", "gpt-4o")
    assert (r.request_model, r.response_model, r.protocol, r.operation) == ("gpt-4-0613", "gpt-4o", Protocol.OPENAI,
                                                                          Operation.CHAT)
    assert (r.input_tokens, r.output_tokens, r.finish_reasons, r.tls, r.start_ns) == (5, 7, ("stop",), True, 123)
    bad = to_call(BAD_HTTP, {"chat": 7}, mono_to_wall_ns=1764590000 * 10**9).record
    assert (bad.operation, bad.decision, bad.status, bad.start_ns) == (Operation.CHAT, "refused", 400, 10**9)
    assert to_call({"destination": "openai"}, {}, 0) is None


def test_gateway_fields_cross_the_wire_and_reach_otlp_and_the_summary():
    r = to_call(SERVED, {}, 0).record
    msg = to_proto(r, IdentityData(name="chat"), IdentityData(name="openai"))
    assert msg.gateway and msg.policy == "policies[0]" and msg.decision == "served" and msg.sent_model == "gpt-4o"
    back, _ = from_proto(msg)
    assert back == r
    msg.start_time_unix_nano = 1764590000 * 10**9
    assert call_problem(msg, now_ns=1764590000 * 10**9) is None
    msg.decision = "maybe"
    assert call_problem(msg, now_ns=1764590000 * 10**9).startswith("decision")
    refused = to_proto(to_call(BAD_HTTP, {}, 0).record, IdentityData(name="chat"), IdentityData(name="openai"))
    rows = summarize([to_proto(r, IdentityData(name="chat"), IdentityData()), refused])
    assert sum(x.refused for x in rows) == 1
    assert "gateway=served policy=policies[0] sent=gpt-4o" in call_cells(to_proto(r, IdentityData(name="chat"), IdentityData()))[-1]
    out = io.StringIO()
    printer = SummaryPrinter(out, json_output=True)
    printer.add(refused)
    printer.finish()
    assert json.loads(out.getvalue())["refused"] == 1
    a = span_attributes(r, IdentityData(name="chat"), IdentityData(name="openai"), 0, "")
    assert a["aimesh.gateway"] is True and a["aimesh.gateway.policy"] == "policies[0]"
    assert a["aimesh.gateway.sent_model"] == "gpt-4o" and a["aimesh.gateway.decision"] == "served"
    plain = dataclasses.replace(r, gateway=False, policy=None, sent_model=None, decision=None, reason=None)
    captured = to_proto(plain, IdentityData(), IdentityData())   # a captured call: the fields stay unset
    assert not captured.gateway and not captured.HasField("decision") and not captured.HasField("policy")
    assert "aimesh.gateway" not in span_attributes(plain, IdentityData(), IdentityData(), 0, "")


def test_policy_file_is_private_and_reloads_that_touch_the_gateway_section_are_refused(tmp_path: Path):
    cfg = Config.model_validate(CFG)
    p = tmp_path / "gateway-policy.json"
    write_policy(p, cfg, {"chat": 3, "openai": 4})
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert json.loads(p.read_text())["identity_numbers"] == {"chat": 3, "openai": 4}
    moved = Config.model_validate({**CFG, "gateway": {"listen": "127.0.0.1:15999"}})
    assert "restart" in reload_refusal(cfg, moved)
    off = Config.model_validate({**CFG, "identities": [CFG["identities"][0], {**CFG["identities"][1], "llm": {
        "protocol": "openai"}}], "policies": [{"from": "chat", "to": "openai", "ports": [443]}]})
    assert "restart" in reload_refusal(cfg, off)
    narrower = Config.model_validate({**CFG, "policies": [{**CFG["policies"][0], "models": ["gpt-4o-mini"]}]})
    assert reload_refusal(cfg, narrower) is None


class FakeSupervisor:
    def __init__(self, argv, policy_path, cgroup_dir=None, env=None) -> None:
        self.argv, self.env, self.running, self.closed = argv, env, False, False

    def start(self) -> None:
        self.running = True

    def alive(self) -> bool:
        return self.running

    @property
    def counters(self) -> SupervisorCounters:
        return SupervisorCounters(1, 0, 0, None)

    def close(self) -> None:
        self.closed = True


def test_node_hands_records_to_the_dispatch_and_reports_a_dead_gateway(tmp_path: Path):
    got: list = []
    sups: list[FakeSupervisor] = []
    node = GatewayNode(tmp_path / "state", "/sys/fs/bpf/none", tmp_path / "aimesh-gateway", got.extend,
                       mono_to_wall_ns=lambda: 0, supervisor=lambda *a, **k: sups.append(FakeSupervisor(*a, **k))
                       or sups[-1])
    cfg = Config.model_validate(CFG)
    node.start(cfg, {"chat": 3, "openai": 4})
    sup = sups[0]
    assert "--origin-pin" in sup.argv and str(node.records_path) in sup.argv
    assert sup.env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[2])
    assert (tmp_path / "aimesh-gateway").is_dir() and node.health() is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for rec in (SERVED, BAD_HTTP):
            s.sendto(json.dumps(rec).encode(), str(node.records_path))
        s.sendto(b"not json", str(node.records_path))
    assert node.tick() == 2 and [c.src_id for c in got] == [3, 3] and got[1].record.decision == "refused"
    metrics = {m.name: m.samples[0].value for m in node.collect()}
    assert metrics["aimesh_gateway_records_received"] == 2 and metrics["aimesh_gateway_records_dropped"] == 1
    assert metrics["aimesh_gateway_up"] == 1
    sup.running = False
    assert "not running" in node.health()
    node.stop()
    assert sup.closed and not node.records_path.exists() and not (tmp_path / "aimesh-gateway").exists()
    assert not node.state_dir.exists()
