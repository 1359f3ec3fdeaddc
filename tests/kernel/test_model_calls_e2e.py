"""Model calls end to end, every sink at once: the official openai SDK in a governed cgroup calls a local
OpenAI-compatible server; the agent decodes the captured bytes and hands each call to the collector (PushCalls, read
back with `aimesh calls -o json` and `--summary`), to its Prometheus metrics (scraped by a real Prometheus), to an
OTLP/HTTP receiver (the SDK's exporter; the receiver decodes the protobuf request) and to the records log."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.kernel.harness import REPO, metric_value
from tests.kernel.test_capture import model_calls, run_openai, start_llm_server
from tests.kernel.test_collector_e2e import collector  # noqa: F401  (fixture)
from tests.kernel.test_prometheus import _query, prometheus  # noqa: F401  (fixture)
from tests.otlp_receiver import OtlpReceiver


def calls_cli(collector, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "agent", "calls", "--collector", f"127.0.0.1:{collector.port}",
                           "--token-file", str(collector.token_file), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def wait_calls(collector, want: int, timeout: float = 20.0) -> list[dict]:  # noqa: F811
    deadline = time.monotonic() + timeout
    while True:
        r = calls_cli(collector, "-o", "json", "--limit", "0")
        assert r.returncode == 0, r.stderr
        calls = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        if len(calls) >= want or time.monotonic() > deadline:
            return calls
        time.sleep(0.3)


def test_model_calls_reach_every_sink(cgroups, agents, collector, prometheus, tmp_path):  # noqa: F811
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    records = tmp_path / "records.jsonl"
    with OtlpReceiver() as otlp:
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
                {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(llama)]}},
            ],
            "policies": [{"from": "chat", "to": "llama"}],
            "collector": {"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.2,
                          "token_file": str(collector.token_file)},
            "telemetry": {"otlp": {"endpoint": otlp.url, "schedule_delay": 0.2, "service_name": "aimesh-e2e"},
                          "genai": {"model_labels": ["llama-3.1-8b"]}},
        }
        agent = agents(cfg, ["--collector", f"127.0.0.1:{collector.port}", "--agent-id", "node-a",
                             "--records-log", str(records)])
        srv, url = start_llm_server(llama)
        try:
            seen = run_openai(chat, url)     # one plain call, one stream with include_usage
            calls = wait_calls(collector, 2)
            spans = otlp.wait_spans(2)
        finally:
            srv.kill()
            srv.wait()

        # the collector, through the CLI
        assert len(calls) == 2, calls
        calls.sort(key=lambda c: c["stream"] if "stream" in c else False)
        got = [{"model": c["response_model"], "in": c["input_tokens"], "out": c["output_tokens"],
                "stream": c.get("stream", False)} for c in calls]
        assert got == seen
        assert [c["request_model"] for c in calls] == ["llama-3.1-8b", "llama-3.1-8b-s"]
        for c in calls:
            assert c["source"]["name"] == "chat" and c["destination"]["name"] == "llama"
            assert c["actual_destination"]["name"] == "llama"
            assert c["protocol"] == "openai" and c["operation"] == "chat" and c["status"] == 200
            assert c["agent_id"] == "node-a" and int(c["pid"]) > 0 and c["comm"]
        summary = calls_cli(collector, "--summary")
        assert summary.returncode == 0, summary.stderr
        rows = {ln.split()[2]: ln.split() for ln in summary.stdout.splitlines()[1:]}
        plain, stream = seen
        assert rows["llama-3.1-8b"][:6] == ["chat", "->", "llama-3.1-8b", "1", "0", f"{plain['in']}/{plain['out']}"]
        assert rows["llama-3.1-8b-s"][:6] == ["chat", "->", "llama-3.1-8b-s", "1", "0",
                                              f"{stream['in']}/{stream['out']}"]

        # OTLP: one CLIENT span per call, decoded from the protobuf the SDK sent
        assert otlp.bad_requests == 0
        by_name = {s["name"]: s for s in spans}
        assert sorted(by_name) == ["chat llama-3.1-8b", "chat llama-3.1-8b-s"]
        a = by_name["chat llama-3.1-8b"]["attributes"]
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (plain["in"], plain["out"])
        assert a["gen_ai.response.model"] == plain["model"] and a["aimesh.source.identity"] == "chat"
        assert by_name["chat llama-3.1-8b"]["resource"]["service.name"] == "aimesh-e2e"

        # Prometheus: the agent's /metrics over HTTP, then a real Prometheus scraping it
        _, m = agent.get("/metrics")
        assert metric_value(m, "gen_ai_client_token_usage_sum", source="chat", destination="llama",
                            gen_ai_request_model="llama-3.1-8b", gen_ai_token_type="input") == plain["in"]
        assert metric_value(m, "gen_ai_client_token_usage_sum", gen_ai_request_model="other",
                            gen_ai_token_type="output") == stream["out"]     # not in the allow-list
        assert metric_value(m, "aimesh_model_call_export_records_total", outcome="sent") == 2
        assert metric_value(m, "aimesh_identity_cpu_seconds_total", identity="chat") > 0
        base = prometheus(agent.metrics_port)
        deadline = time.monotonic() + 60
        got_tokens: dict[str, float] = {}
        while True:
            try:
                res = _query(base, 'sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum{source="chat"})')
                got_tokens = {r["metric"]["gen_ai_token_type"]: float(r["value"][1]) for r in res}
            except OSError:
                pass  # not listening yet
            if got_tokens or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got_tokens == {"input": plain["in"] + stream["in"], "output": plain["out"] + stream["out"]}

        # the records log has them too
        assert len(model_calls(records, want=2)) == 2
