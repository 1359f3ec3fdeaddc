"""`aimesh calls` against a real in-process collector (table, JSON, filters, summary), and the JSON names of `flows`."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import pytest

from tests.unit.calls_testlib import T0, TOKEN, call, call_batch, ident, tmp_dir  # noqa: F401  (fixture)
from tests.unit.collector_testlib import batch, record, stub_for
from agent._gen.aimesh.v1 import flow_pb2, model_call_pb2
from agent.collector.calls_cli import call_cells, parse_statuses, percentile, run_calls, summarize
from agent.collector.channel import ConfigError
from agent.collector.cli import add_commands, message_json, run_flows
from agent.collector.server import CollectorConfig, CollectorServer

AUTH = (("authorization", f"Bearer {TOKEN}"),)
CALLS = [
    call(1, request_model="gpt-4o", response_model="gpt-4o-2024-08-06", stream=True, finish_reasons=["stop"],
         cached_tokens=2, confidence_mean=0.91, duration_ns=100_000_000, time_to_first_chunk_ns=10_000_000),
    call(2, request_model="gpt-4o", status=429, error_type="rate_limit_exceeded", input_tokens=None,
         output_tokens=None, duration_ns=20_000_000, time_to_first_chunk_ns=None),
    call(3, request_model="gpt-4o", input_tokens=30, output_tokens=7, duration_ns=300_000_000,
         time_to_first_chunk_ns=30_000_000),
    call(4, source=ident("batch", "agent"), request_model="llama3", protocol=model_call_pb2.LLM_PROTOCOL_OLLAMA,
         tls=True, incomplete=True, input_tokens=None, output_tokens=None, status=None, duration_ns=None,
         time_to_first_chunk_ns=None),
]  # fmt: skip


@pytest.fixture
def server(tmp_dir: Path) -> Iterator[CollectorServer]:  # noqa: F811
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token=TOKEN, grace_s=0.2))
    srv.start()
    ch, stub = stub_for(str(srv.address))
    with ch:
        stub.PushCalls(call_batch("node-a", 1, CALLS), metadata=AUTH, timeout=5)
        stub.Push(batch("node-a", 1, [record(9, kind=flow_pb2.RECORD_KIND_DECISION, verdict=flow_pb2.VERDICT_DENIED,
                                             hook=flow_pb2.HOOK_CONNECT, reason=flow_pb2.REASON_NO_POLICY_SRC,
                                             count=3)]), metadata=AUTH, timeout=5)  # fmt: skip
    yield srv
    srv.stop(0)


def run(command: str, argv: list[str]) -> tuple[int, str]:
    p = argparse.ArgumentParser(prog="aimesh")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args([command, *argv])
    out = io.StringIO()
    fn = run_calls if command == "calls" else run_flows
    return fn(args, out=out, tz=timezone.utc), out.getvalue()


def test_statuses() -> None:
    assert parse_statuses("429") == ((429, 429),)
    assert parse_statuses("5xx,ok") == ((500, 599), (100, 399))
    assert parse_statuses("error") == ((400, 599), (0, 0))
    for bad in ("", "700", "6xx", "fine"):
        with pytest.raises(ConfigError, match="--status"):
            parse_statuses(bad)


def test_call_cells() -> None:
    cells = call_cells(CALLS[0], timezone.utc)
    assert cells[1:5] == ["chat-ui", "->", "llm(v1)", "gpt-4o->gpt-4o-2024-08-06"]
    assert cells[5:9] == ["200", "10/5", "10ms", "100ms"]
    assert cells[9].split() == ["openai/chat", "stream", "finish=stop", "cached=2", "conf=0.91"]
    unknown = call_cells(CALLS[3], timezone.utc)
    assert unknown[4:9] == ["llama3", "-", "-", "-", "-"]
    assert unknown[9].split() == ["ollama/chat", "tls", "incomplete"]
    assert call_cells(CALLS[1], timezone.utc)[6] == "-"
    assert call_cells(model_call_pb2.ModelCall(response_model="x"))[4] == "?->x"


def test_percentile_and_summary() -> None:
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4 and percentile([7], 99) == 7
    rows = summarize(CALLS)
    assert [(r.source, r.model, r.calls, r.errors, r.input_tokens, r.output_tokens) for r in rows] == [
        ("chat-ui", "gpt-4o", 3, 1, 40, 12), ("batch", "llama3", 1, 1, 0, 0)]
    assert rows[0].cells()[6:] == ["100ms/300ms", "10ms/30ms"]
    assert rows[1].cells()[6:] == ["-", "-"]


def test_calls_table_and_filters(server: CollectorServer) -> None:
    base = ["--collector", str(server.address), "--token", TOKEN]
    rc, out = run("calls", base)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "SOURCE", "DESTINATION", "MODEL(REQ->RESP)"] and len(lines) == 5
    assert "rate_limit_exceeded" in lines[2] and "429" in lines[2]

    def cookies(*extra: str) -> list[int]:
        rc, out = run("calls", [*base, "-o", "json", *extra])
        assert rc == 0
        return [int(json.loads(line)["cookie"]) for line in out.splitlines()]

    assert cookies() == [1, 2, 3, 4]
    assert cookies("--from", "batch") == [4]
    assert cookies("--model", "gpt-4o-2024-08-06") == [1]
    assert cookies("--status", "error") == [2, 4]
    assert cookies("--status", "2xx") == [1, 3]
    assert cookies("--limit", "1") == [4]
    assert cookies("--since", "1h") == []  # these calls are from 2025


def test_calls_json_reads_like_the_flow_log(server: CollectorServer) -> None:
    rc, out = run("calls", ["--collector", str(server.address), "--token", TOKEN, "-o", "json", "--from", "batch"])
    assert rc == 0
    (obj,) = [json.loads(line) for line in out.splitlines()]
    assert obj["protocol"] == "ollama" and obj["operation"] == "chat" and obj["tls"] is True
    assert "input_tokens" not in obj and "status" not in obj  # unknown: absent, not 0
    rc, out = run("calls", ["--collector", str(server.address), "--token", TOKEN, "-o", "json", "--limit", "4"])
    first = json.loads(out.splitlines()[0])
    assert first["input_tokens"] == 10 and first["duration_ns"] == 100_000_000  # numbers, not strings
    assert first["finish_reasons"] == ["stop"] and first["source"] == {"name": "chat-ui", "kind": "agent"}


def test_summary(server: CollectorServer) -> None:
    base = ["--collector", str(server.address), "--token", TOKEN, "--summary"]
    rc, out = run("calls", base)
    assert rc == 0
    head, first, second = out.splitlines()
    assert head.split() == ["SOURCE", "MODEL", "CALLS", "ERRORS", "TOKENS(IN/OUT)", "DURATION(P50/P99)",
                            "TTFC(P50/P99)"]  # fmt: skip
    assert first.split() == ["chat-ui", "->", "gpt-4o", "3", "1", "40/12", "100ms/300ms", "10ms/30ms"]
    assert second.split()[:5] == ["batch", "->", "llama3", "1", "1"]
    rc, out = run("calls", [*base, "-o", "json", "--model", "llama3"])
    assert rc == 0 and json.loads(out) == {
        "source": "batch", "model": "llama3", "calls": 1, "errors": 1, "input_tokens": 0, "output_tokens": 0,
        "duration_p50_ns": None, "duration_p99_ns": None, "ttfc_p50_ns": None, "ttfc_p99_ns": None}


def test_usage_errors_are_one_line(server: CollectorServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("calls", ["--collector", str(server.address), "--token", TOKEN, "--summary", "-f"])
    assert rc == 2 and "--summary cannot be combined with --follow" in capsys.readouterr().err
    rc, _ = run("calls", ["--collector", str(server.address), "--token", TOKEN, "--status", "fine"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--status" in err
    rc, _ = run("calls", ["--collector", str(server.address)])
    assert rc == 1 and "refused the credentials" in capsys.readouterr().err


def test_flows_json_uses_flow_log_names(server: CollectorServer) -> None:
    rc, out = run("flows", ["--collector", str(server.address), "--token", TOKEN, "-o", "json"])
    assert rc == 0
    (obj,) = [json.loads(line) for line in out.splitlines()]
    assert (obj["kind"], obj["verdict"], obj["hook"], obj["reason"], obj["protocol"]) == (
        "decision", "denied", "connect", "no_policy_src", "tcp")
    assert obj["count"] == 3


def test_unknown_enum_values_stay_numbers() -> None:
    obj = message_json(flow_pb2.FlowRecord(verdict=9, protocol=flow_pb2.PROTOCOL_UDP))  # type: ignore[arg-type]
    assert obj == {"verdict": 9, "protocol": "udp"}
