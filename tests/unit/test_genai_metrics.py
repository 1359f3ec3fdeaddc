"""GenAI client metrics from model-call records (bounded labels) and per-identity compute read from real cgroups."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.export.genai_metrics import (OTHER_MODEL, UNKNOWN_MODEL, GenAiTally, IdentityCompute, ModelLabel,
                                        outermost, read_usage_usec)
from agent.flows.model import IdentityData
from agent.identity.cgroups import cgroup2_mount_from
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

WEB = IdentityData("chat-frontend", "workload", "v1")
LLAMA = IdentityData("llama", "model", "")


def make_call(**kw: object) -> ModelCallRecord:
    base = ModelCallRecord(
        conn_key=1, sequence=0, start_ns=1_000_000_000, protocol=Protocol.OPENAI, operation=Operation.CHAT,
        request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18", stream=True, status=200,
        error_type=None, input_tokens=12, output_tokens=300, cached_tokens=None, time_to_first_chunk_ns=150_000_000,
        duration_ns=1_500_000_000, time_per_output_chunk_ns=5_000_000, output_chunks=300, finish_reasons=("stop",),
        request_bytes=900, response_bytes=40_000, tls=False, truncated=False, incomplete=False, confidence_mean=None,
        confidence_min=None, request_digest="ab" * 32, max_tokens=512, temperature=0.2, include_usage=True)
    return replace(base, **kw)  # type: ignore[arg-type]


def registry_with(*collectors: object) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)  # type: ignore[arg-type]
    return reg


CALL = {"source": "chat-frontend", "source_kind": "workload", "destination": "llama", "destination_kind": "model",
        "gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-4o-mini",
        "gen_ai_response_model": "gpt-4o-mini-2024-07-18", "server_address": "", "server_port": ""}


def test_token_duration_and_first_chunk_histograms() -> None:
    tally = GenAiTally(ModelLabel(["gpt-4o*"]))
    reg = registry_with(tally)
    tally.emit_call(make_call(), WEB, LLAMA, 42, "python3")
    tally.emit_call(make_call(input_tokens=5000, output_tokens=None, duration_ns=20_000_000), WEB, LLAMA, 42, "python3")
    g = reg.get_sample_value
    # tokens: input 12 and 5000; output only the first call (None is not observed as 0)
    assert g("gen_ai_client_token_usage_count", {**CALL, "gen_ai_token_type": "input"}) == 2
    assert g("gen_ai_client_token_usage_sum", {**CALL, "gen_ai_token_type": "input"}) == 5012
    assert g("gen_ai_client_token_usage_bucket", {**CALL, "gen_ai_token_type": "input", "le": "16.0"}) == 1
    assert g("gen_ai_client_token_usage_bucket", {**CALL, "gen_ai_token_type": "input", "le": "16384.0"}) == 2
    assert g("gen_ai_client_token_usage_count", {**CALL, "gen_ai_token_type": "output"}) == 1
    ok = {**CALL, "error_type": ""}
    assert g("gen_ai_client_operation_duration_seconds_count", ok) == 2
    assert g("gen_ai_client_operation_duration_seconds_bucket", {**ok, "le": "0.02"}) == 1
    assert g("gen_ai_client_operation_duration_seconds_bucket", {**ok, "le": "2.56"}) == 2
    assert g("gen_ai_client_operation_time_to_first_chunk_seconds_count", CALL) == 2
    assert g("gen_ai_client_operation_time_to_first_chunk_seconds_bucket", {**CALL, "le": "0.08"}) == 0
    assert g("gen_ai_client_operation_time_to_first_chunk_seconds_bucket", {**CALL, "le": "0.16"}) == 2
    text = generate_latest(reg).decode()
    assert "# TYPE gen_ai_client_token_usage histogram" in text


def test_first_chunk_only_for_streams_and_error_type_from_status() -> None:
    tally = GenAiTally(ModelLabel(["*"]))
    reg = registry_with(tally)
    tally.emit_call(make_call(stream=False), WEB, LLAMA, 1, "c")
    # the API's error type is server-chosen text: the label comes from the status instead
    tally.emit_call(make_call(status=429, error_type="rate_limit_exceeded_for_user_8812"), WEB, LLAMA, 1, "c")
    tally.emit_call(make_call(incomplete=True, output_tokens=None), WEB, LLAMA, 1, "c")
    tally.emit_call(make_call(status=None, duration_ns=None, time_to_first_chunk_ns=None), WEB, LLAMA, 1, "c")
    g = reg.get_sample_value
    assert g("gen_ai_client_operation_time_to_first_chunk_seconds_count", CALL) == 2   # the 429 and the cut stream
    assert g("gen_ai_client_operation_duration_seconds_count", {**CALL, "error_type": ""}) == 1
    assert g("gen_ai_client_operation_duration_seconds_count", {**CALL, "error_type": "http_429"}) == 1
    assert g("gen_ai_client_operation_duration_seconds_count", {**CALL, "error_type": "incomplete"}) == 1
    text = generate_latest(reg).decode()
    assert "rate_limit_exceeded" not in text
    assert "no_response" not in text   # no duration known: nothing observed


def test_operations_and_providers_use_the_conventions_names() -> None:
    tally = GenAiTally(ModelLabel(["*"]))
    reg = registry_with(tally)
    tally.emit_call(make_call(operation=Operation.COMPLETION), WEB, LLAMA, 1, "c")
    tally.emit_call(make_call(protocol=Protocol.ANTHROPIC, operation=Operation.MESSAGES, request_model="claude-x"),
                    WEB, LLAMA, 1, "c")
    tally.emit_call(make_call(request_model=None), IdentityData(), LLAMA, 1, "c")
    g = reg.get_sample_value
    d = "gen_ai_client_operation_duration_seconds_count"
    assert g(d, {**CALL, "gen_ai_operation_name": "text_completion", "error_type": ""}) == 1
    assert g(d, {**CALL, "gen_ai_provider_name": "anthropic", "gen_ai_request_model": "claude-x", "error_type": ""}) == 1
    assert g(d, {**CALL, "source": "unknown", "source_kind": "unknown", "gen_ai_request_model": UNKNOWN_MODEL,
                 "error_type": ""}) == 1


def test_ten_thousand_invented_model_names_give_bounded_series() -> None:
    label = ModelLabel(["gpt-4o*", "llama-3*"], max_models=5)
    tally = GenAiTally(label)
    reg = registry_with(tally)
    tally.emit_call(make_call(request_model="llama-3.1-8b"), WEB, LLAMA, 1, "c")
    for i in range(10_000):
        # half match a glob (a client inventing gpt-4o-<n> names), half match none
        name = f"gpt-4o-fake-{i}" if i % 2 else f"made-up-{i}"
        tally.emit_call(make_call(request_model=name), WEB, LLAMA, 1, "c")
    models = set()
    for fam in reg.collect():
        for s in fam.samples:
            models.add(s.labels.get("gen_ai_request_model"))
    models.discard(None)
    assert "llama-3.1-8b" in models          # an allowed name keeps its own series
    assert OTHER_MODEL in models
    assert len(models) == 6                  # 5 admitted names + other, whatever the client sends
    assert label("llama-3.1-8b") == "llama-3.1-8b" and label("llama-3-new") == OTHER_MODEL   # cap reached
    assert ModelLabel([])("gpt-4o") == OTHER_MODEL
    one = GenAiTally(ModelLabel(["*"]))
    one.emit_call(make_call(), WEB, LLAMA, 1, "c")
    per_model = sum(1 for fam in registry_with(one).collect() for _ in fam.samples)
    assert sum(1 for fam in reg.collect() for _ in fam.samples) == 6 * per_model


def test_model_label_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"model_globs\[1\]"):
        ModelLabel(["gpt-*", ""])
    with pytest.raises(ValueError, match="max_models"):
        ModelLabel(["*"], max_models=-1)


def test_outermost_drops_duplicates_and_descendants() -> None:
    assert outermost(["/a/b", "/a", "/a/", "/c/d", "/cd", "/c/d/e"]) == ["/a", "/c/d", "/cd"]
    assert outermost(["/x", "/"]) == ["/"]


def test_memory_and_cpu_sum_over_a_cgroup_file_layout(tmp_path: Path) -> None:
    """The summing and the missing-file rules on the cgroup v2 file layout (this host's memory controller is on
    cgroup v1, so its real cgroup2 directories have no memory.current: see the real-cgroup test below)."""
    for rel, usec, mem in (("a", 2_000_000, 100), ("a/x", 1_000_000, 60), ("b", 500_000, None)):
        d = tmp_path / rel
        d.mkdir(parents=True)
        (d / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec 1\nsystem_usec 2\n")
        if mem is not None:
            (d / "memory.current").write_text(f"{mem}\n")
    comp = IdentityCompute(lambda: {"web": ["/a", "/a/x", "/b", "/gone"], "none": ["/gone"]}, tmp_path)
    reg = registry_with(comp)
    g = reg.get_sample_value
    assert g("aimesh_identity_cpu_seconds_total", {"identity": "web"}) == 2.5      # /a/x is inside /a
    assert g("aimesh_identity_memory_bytes", {"identity": "web"}) == 100
    assert g("aimesh_identity_compute_cgroups", {"identity": "web", "resource": "cpu"}) == 2
    assert g("aimesh_identity_compute_cgroups", {"identity": "web", "resource": "memory"}) == 1
    assert g("aimesh_identity_cpu_seconds_total", {"identity": "none"}) is None    # never a fake 0
    assert g("aimesh_identity_compute_cgroups", {"identity": "none", "resource": "cpu"}) == 0


def _cgroup2() -> Path | None:
    try:
        return cgroup2_mount_from(Path("/proc/mounts").read_text())
    except OSError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root")
def test_compute_from_real_cgroups() -> None:
    mount = _cgroup2()
    if mount is None:
        pytest.skip("no cgroup2 mount in /proc/mounts")
    top = mount / f"aimesh-test-genai-{os.getpid()}"
    dirs = [top, top / "a", top / "b", top / "a" / "inner"]
    made: list[Path] = []
    try:
        for d in dirs:
            d.mkdir()
            made.append(d)
        for d in (top / "b", top / "a" / "inner"):   # burn a fixed amount of CPU inside each cgroup, then exit
            procs = str(d / "cgroup.procs")
            subprocess.run([sys.executable, "-c", "sum(i * i for i in range(2_000_000))"], check=True,
                           preexec_fn=lambda p=procs: Path(p).write_text(str(os.getpid())))
        rel = lambda p: "/" + str(p.relative_to(mount))  # noqa: E731
        comp = IdentityCompute(lambda: {"web": [rel(top / "a"), rel(top / "a" / "inner"), rel(top / "b")],
                                        "idle": [rel(top)], "missing": ["/aimesh-test-genai-no-such"]}, mount)
        reg = registry_with(comp)
        g = reg.get_sample_value
        ua, ub, utop = (read_usage_usec(top / "a"), read_usage_usec(top / "b"), read_usage_usec(top))
        assert ua and ub and utop                                  # the children ran there
        # nobody is left in these cgroups: the counters are fixed, and the scrape must equal the files
        assert g("aimesh_identity_cpu_seconds_total", {"identity": "web"}) == pytest.approx((ua + ub) / 1e6)
        assert g("aimesh_identity_cpu_seconds_total", {"identity": "idle"}) == pytest.approx(utop / 1e6)
        assert utop >= ua + ub                                    # the parent counts its subtree
        assert g("aimesh_identity_cpu_seconds_total", {"identity": "missing"}) is None
        assert g("aimesh_identity_compute_cgroups", {"identity": "web", "resource": "cpu"}) == 2
        if (top / "a" / "memory.current").exists():
            want = sum(int((top / p / "memory.current").read_text()) for p in ("a", "b"))
            assert g("aimesh_identity_memory_bytes", {"identity": "web"}) == want
        else:   # memory controller not on cgroup v2 here (hybrid layout): no sample, and the count says why
            assert g("aimesh_identity_memory_bytes", {"identity": "web"}) is None
            assert g("aimesh_identity_compute_cgroups", {"identity": "web", "resource": "memory"}) == 0
    finally:
        for d in reversed(made):
            d.rmdir()


def test_first_chunk_buckets_are_the_client_conventions_duration_buckets() -> None:
    """semconv gen_ai.client.operation.time_to_first_chunk: [0.01, 0.02, ..., 81.92] (not the server TTFT ones)."""
    tally = GenAiTally(ModelLabel(["*"]))
    reg = registry_with(tally)
    tally.emit_call(make_call(), WEB, LLAMA, 1, "c")
    les = [s.labels["le"] for fam in reg.collect() if fam.name == "gen_ai_client_operation_time_to_first_chunk_seconds"
           for s in fam.samples if s.name.endswith("_bucket")]
    assert les == ["0.01", "0.02", "0.04", "0.08", "0.16", "0.32", "0.64", "1.28", "2.56", "5.12", "10.24", "20.48",
                   "40.96", "81.92", "+Inf"]


def test_response_model_and_server_address_labels_are_recommended_and_bounded() -> None:
    tally = GenAiTally(ModelLabel(["gpt-4o*"], max_models=3))
    reg = registry_with(tally)
    tally.emit_call(make_call(), WEB, LLAMA, 1, "c", server_address="10.0.0.7", server_port=443)
    g = reg.get_sample_value
    lab = {**CALL, "server_address": "10.0.0.7", "server_port": "443", "error_type": ""}
    assert g("gen_ai_client_operation_duration_seconds_count", lab) == 1
    tally.emit_call(make_call(response_model=None), WEB, LLAMA, 1, "c")       # none reported: an empty label
    assert g("gen_ai_client_operation_duration_seconds_count", {**CALL, "gen_ai_response_model": "",
                                                                 "error_type": ""}) == 1
    for i in range(1000):     # invented response models and server addresses stay bounded
        tally.emit_call(make_call(response_model=f"gpt-4o-{i}"), WEB, LLAMA, 1, "c", server_address=f"10.1.{i}.1",
                        server_port=80)
    labels = [s.labels for fam in reg.collect() for s in fam.samples]
    assert len({x.get("gen_ai_response_model") for x in labels} - {None}) <= 3 + 2     # 3 admitted, other, ""
    assert len({x.get("server_address") for x in labels} - {None}) <= 256 + 3
