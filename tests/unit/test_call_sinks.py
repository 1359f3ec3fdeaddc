"""The model-call sinks an agent builds from its config; the telemetry config section; the comm cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import ConfigError, parse_config
from agent.export.call_sinks import CommCache, ModelCallLogSink, build_call_sinks, calls_exporter_config
from agent.export.collector_client import CALLS_SPOOL, ExporterConfig, ModelCallExporter
from agent.export.model_metrics import ModelCallTally
from agent.flows.log import FlowLog
from agent.flows.model import IdentityData
from tests.unit.test_otlp import LLAMA, WEB, make_call

DIALED = IdentityData("llama-vip", "model", "")


def sinks_for(text: str, tmp_path: Path, exporter: ExporterConfig | None = None, log: str | None = None):
    cfg = parse_config(text)
    return build_call_sinks(cfg.telemetry, exporter, node="n1", mono_to_wall_ns=lambda: 0,
                            records_log=FlowLog(log, what="--records-log"), tally=ModelCallTally(),
                            wall=lambda ts: str(ts))


def kinds(sinks) -> list[str]:
    return [type(s).__name__ for s in sinks.sinks]


def test_metrics_always_the_rest_from_config(tmp_path: Path) -> None:
    s = sinks_for("{}", tmp_path)
    assert kinds(s) == ["ModelCallTally", "GenAiTally"]
    exp = ExporterConfig(target="127.0.0.1:4317", agent_id="a", spool_dir=tmp_path / "spool", durable=True)
    s = sinks_for("telemetry: {otlp: {endpoint: 'http://127.0.0.1:9/v1/traces'}}", tmp_path, exp,
                  str(tmp_path / "records.jsonl"))
    try:
        assert kinds(s) == ["ModelCallTally", "GenAiTally", "ModelCallExporter", "OtlpCallSink", "ModelCallLogSink"]
        assert isinstance(s.exporter, ModelCallExporter)
        assert s.exporter.config.spool_dir == tmp_path / "spool" / CALLS_SPOOL and s.exporter.config.durable
        assert [type(c).__name__ for c in s.collectors()] == ["ModelCallTally", "GenAiTally", "ExportMetrics"]
    finally:
        s.close()


def test_every_sink_gets_the_call(tmp_path: Path) -> None:
    log = tmp_path / "records.jsonl"
    s = sinks_for("telemetry: {genai: {model_labels: ['gpt-4o-*'], max_models: 5}}", tmp_path, log=str(log))
    for sink in s.sinks:
        sink.emit_call(make_call(), WEB, LLAMA, 4242, "python3", dialed=DIALED)
        sink.emit_call(make_call(request_model="made-up"), WEB, LLAMA, 4242, "python3")
    reg = CollectorRegistry()
    for c in s.collectors():
        reg.register(c)
    text = generate_latest(reg).decode()
    assert 'aimesh_model_calls_total{destination="llama-vip",operation="chat",protocol="openai",source="chat-frontend"' \
        in text
    tokens = [ln for ln in text.splitlines() if ln.startswith("gen_ai_client_token_usage_sum")]
    assert any('gen_ai_request_model="gpt-4o-mini"' in ln and 'gen_ai_token_type="output"' in ln and
               ln.endswith(" 300.0") for ln in tokens), tokens
    assert any('gen_ai_request_model="other"' in ln for ln in tokens)
    s.close()
    import json
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [ln["destination"]["name"] for ln in lines] == ["llama-vip", "llama"]
    assert lines[0]["actual"]["name"] == "llama" and lines[0]["source"] == {"name": "chat-frontend",
                                                                           "kind": "workload", "pid": 4242,
                                                                           "comm": "python3"}
    assert lines[0]["kind"] == "model_call" and lines[0]["request_model"] == "gpt-4o-mini"


def test_calls_exporter_config_derives_from_the_flow_exporter(tmp_path: Path) -> None:
    flows = ExporterConfig(target="c:4317", agent_id="a", token="t", spool_dir=tmp_path, durable=True)
    calls = calls_exporter_config(flows)
    assert (calls.target, calls.token, calls.agent_id) == ("c:4317", "t", "a")
    assert calls.spool_dir == tmp_path / CALLS_SPOOL and calls.durable   # completed calls on disk before sent
    assert not calls_exporter_config(ExporterConfig(target="c:4317", agent_id="a", spool_dir=tmp_path)).durable
    assert calls_exporter_config(ExporterConfig(target="c:4317", agent_id="a")).spool_dir is None


@pytest.mark.parametrize("text, needle", [
    ("telemetry: {otlp: {}}", "telemetry.otlp.endpoint: Field required"),
    ("telemetry: {otlp: {endpoint: 'ftp://x/v1/traces'}}", "telemetry.otlp.endpoint: 'ftp://x/v1/traces' must be"),
    ("telemetry: {otlp: {endpoint: 'http://h:4318', headers: {'a b': x}}}", "telemetry.otlp.headers: header name"),
    ("telemetry: {otlp: {endpoint: 'http://h:4318', headers: {a: 1}}}", "telemetry.otlp.headers.a"),
    ("telemetry: {otlp: {endpoint: 'http://h:4318', max_queue_size: 2}}", "telemetry.otlp: max_export_batch_size"),
    ("telemetry: {otlp: {endpoint: 'http://h:4318', timeout: 0}}", "telemetry.otlp.timeout"),
    ("telemetry: {otlp: {endpoint: 'http://h:4318', insecure: true}}", "telemetry.otlp.insecure: Extra inputs"),
    ("telemetry: {genai: {model_labels: ['']}}", "telemetry.genai.model_labels: model_labels[0] is empty"),
    ("telemetry: {genai: {model_labels: 'llama-*'}}", "telemetry.genai.model_labels: Input should be a valid list"),
    ("telemetry: {genai: {max_models: -1}}", "telemetry.genai.max_models"),
])
def test_bad_telemetry_names_the_field(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_telemetry_defaults_and_what_a_reload_cannot_change() -> None:
    base = parse_config("{}").telemetry
    assert base.otlp is None and base.genai.model_labels == ["*"] and base.genai.max_models == 50
    otlp = parse_config("telemetry: {otlp: {endpoint: 'http://127.0.0.1:4318/v1/traces', "
                        "headers: {x-api-key: k}}}").telemetry
    assert otlp.otlp.headers == {"x-api-key": "k"}
    assert base.sinks_differ(otlp) == "otlp"
    assert base.sinks_differ(parse_config("telemetry: {genai: {max_models: 3}}").telemetry) == "genai"
    assert base.sinks_differ(parse_config("telemetry: {udp_window: 3}").telemetry) is None   # applies live


def test_comm_cache_reads_once_and_is_bounded(tmp_path: Path) -> None:
    for pid, comm in ((1, "init"), (2, "python3"), (3, "curl")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    cache = CommCache(max_entries=2, proc=str(tmp_path))
    assert cache(1) == "init" and cache(2) == "python3"
    (tmp_path / "1" / "comm").write_text("changed\n")
    assert cache(1) == "init"              # read once per pid
    assert cache(3) == "curl" and len(cache) == 2     # 2, the least recently used, is out
    assert cache(99) == "" and len(cache) == 2        # gone: not cached
    assert cache.prune(lambda pid: pid != 1) == 1
    assert cache(1) == "changed"           # a pid read again after it was forgotten


def test_comm_cache_on_this_process() -> None:
    with open(f"/proc/{os.getpid()}/comm") as f:
        assert CommCache()(os.getpid()) == f.read().strip()


def test_log_sink_is_off_when_the_log_is(tmp_path: Path) -> None:
    sink = ModelCallLogSink(FlowLog(None), str)
    sink.emit_call(make_call(), WEB, LLAMA, 1, "x")   # nothing to write to: no error
