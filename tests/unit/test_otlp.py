"""Model calls as OTLP spans: attributes and times (SDK in-memory exporter), the bounded queue, the config."""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agent.export.otlp import OtlpCallSink, OtlpConfig
from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

WEB = IdentityData("chat-frontend", "workload", "v1")
LLAMA = IdentityData("llama", "model", "")
OFFSET = 1_700_000_000_000_000_000     # mono -> wall


def make_call(**kw: object) -> ModelCallRecord:
    base = ModelCallRecord(
        conn_key=1, sequence=0, start_ns=5_000_000_000, protocol=Protocol.OPENAI, operation=Operation.CHAT,
        request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18", stream=True, status=200,
        error_type=None, input_tokens=12, output_tokens=300, cached_tokens=4, time_to_first_chunk_ns=150_000_000,
        duration_ns=1_500_000_000, time_per_output_chunk_ns=5_000_000, output_chunks=300, finish_reasons=("stop",),
        request_bytes=900, response_bytes=40_000, tls=True, truncated=False, incomplete=False, confidence_mean=None,
        confidence_min=None, request_digest="ab" * 32, max_tokens=512, temperature=0.2, include_usage=True)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_one_client_span_per_call_with_genai_attributes() -> None:
    mem = InMemorySpanExporter()
    sink = OtlpCallSink(OtlpConfig(service_name="aimesh-test"), OFFSET, exporter=mem)
    sink.emit_call(make_call(), WEB, LLAMA, 4242, "python3", server_address="10.0.0.7", server_port=8000)
    sink.emit_call(make_call(operation=Operation.EMBEDDINGS, request_model=None, response_model=None, stream=False,
                             output_tokens=None, finish_reasons=(), max_tokens=None, temperature=None,
                             cached_tokens=None), WEB, LLAMA, 7, "curl")
    sink.shutdown()
    spans = mem.get_finished_spans()
    assert [s.name for s in spans] == ["chat gpt-4o-mini", "embeddings"]
    s = spans[0]
    assert s.kind is SpanKind.CLIENT
    assert s.start_time == OFFSET + 5_000_000_000 and s.end_time == OFFSET + 6_500_000_000
    assert s.resource.attributes["service.name"] == "aimesh-test"
    a = dict(s.attributes or {})
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini" and a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 300)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"]) == (512, 0.2)
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.15)
    assert (a["server.address"], a["server.port"]) == ("10.0.0.7", 8000)
    assert (a["aimesh.source.identity"], a["aimesh.destination.identity"], a["aimesh.source.pid"]) == \
        ("chat-frontend", "llama", 4242)
    assert "error.type" not in a and s.status.status_code is StatusCode.UNSET
    assert "gen_ai.system" not in a            # replaced by gen_ai.provider.name in semconv 1.37
    b = dict(spans[1].attributes or {})
    for absent in ("gen_ai.request.model", "gen_ai.usage.output_tokens", "gen_ai.response.finish_reasons",
                   "gen_ai.request.max_tokens", "server.address", "server.port"):
        assert absent not in b                 # unknown is left out, never sent as 0 or ""
    assert sink.stats().exported == 2 and sink.stats().dropped_queue_full == 0


def test_spans_name_the_callers_pod_when_the_identity_has_it() -> None:
    mem = InMemorySpanExporter()
    sink = OtlpCallSink(OtlpConfig(service_name="aimesh-test"), OFFSET, exporter=mem)
    in_pod = replace(WEB, namespace="shop", pod="chat-7d9f-x2k", container="app", service_account="chat")
    sink.emit_call(make_call(), in_pod, LLAMA, 4242, "python3")
    sink.emit_call(make_call(), replace(WEB, namespace="shop", pod="chat-7d9f-x2k"), LLAMA, 4242, "python3")
    sink.emit_call(make_call(), WEB, replace(LLAMA, namespace="models", pod="llama-0"), 4242, "python3")
    sink.shutdown()
    a, b, c = (dict(s.attributes or {}) for s in mem.get_finished_spans())
    assert (a["k8s.namespace.name"], a["k8s.pod.name"], a["k8s.container.name"]) == ("shop", "chat-7d9f-x2k", "app")
    assert a["aimesh.source.service_account"] == "chat"
    assert (b["k8s.namespace.name"], b["k8s.pod.name"]) == ("shop", "chat-7d9f-x2k")
    assert "k8s.container.name" not in b and "aimesh.source.service_account" not in b   # unknown: left out
    assert not [k for k in c if k.startswith("k8s.") or k == "aimesh.source.service_account"]   # the caller's only


def test_failures_carry_error_type_and_error_status() -> None:
    mem = InMemorySpanExporter()
    sink = OtlpCallSink(OtlpConfig(), OFFSET, exporter=mem)
    sink.emit_call(make_call(status=429, error_type="rate_limit_exceeded", input_tokens=None, output_tokens=None),
                   WEB, LLAMA, 1, "c")
    sink.emit_call(make_call(status=500, error_type=None), WEB, LLAMA, 1, "c")
    sink.emit_call(make_call(incomplete=True, output_tokens=None), WEB, LLAMA, 1, "c")
    sink.emit_call(make_call(status=None, duration_ns=None, time_to_first_chunk_ns=None), WEB, LLAMA, 1, "c")
    sink.shutdown()
    spans = mem.get_finished_spans()
    assert [(s.attributes or {})["error.type"] for s in spans] == ["rate_limit_exceeded", "http_500", "incomplete",
                                                                    "no_response"]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert spans[0].attributes["http.response.status_code"] == 429  # type: ignore[index]
    assert spans[3].end_time == spans[3].start_time     # nothing known after the request started


class _GatedExporter(SpanExporter):
    """Holds the first export until released, so the queue fills deterministically behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.names: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        assert self.release.wait(60)
        self.names.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_bounded_queue_drops_and_counts() -> None:
    gate = _GatedExporter()
    sink = OtlpCallSink(OtlpConfig(max_queue_size=2, max_export_batch_size=1, schedule_delay_ms=60_000), OFFSET,
                        exporter=gate)
    sink.emit_call(make_call(request_model="m0"), WEB, LLAMA, 1, "c")
    assert gate.entered.wait(60)              # the worker holds m0 in export: nothing else leaves the queue
    for i in range(1, 5):
        sink.emit_call(make_call(request_model=f"m{i}"), WEB, LLAMA, 1, "c")
    st = sink.stats()
    assert (st.emitted, st.dropped_queue_full, st.queued, st.exported) == (5, 2, 2, 0)
    gate.release.set()
    assert sink.flush(60)
    st = sink.stats()
    assert (st.exported, st.failed, st.queued, st.dropped_queue_full) == (3, 0, 0, 2)
    assert sorted(gate.names) == ["chat m0", "chat m1", "chat m2"]
    sink.shutdown()


def test_export_failures_are_counted() -> None:
    class Failing(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise ConnectionError("refused")

        def shutdown(self) -> None:
            pass

    sink = OtlpCallSink(OtlpConfig(), OFFSET, exporter=Failing())
    sink.emit_call(make_call(), WEB, LLAMA, 1, "c")
    sink.shutdown()
    assert (sink.stats().failed, sink.stats().exported) == (1, 0)


@pytest.mark.parametrize("kw, field", [
    ({"endpoint": "localhost:4318"}, "otlp.endpoint"),
    ({"endpoint": "grpc://x:4317"}, "otlp.endpoint"),
    ({"timeout_s": 0}, "otlp.timeout_s"),
    ({"max_queue_size": 0}, "otlp.max_queue_size"),
    ({"max_queue_size": 10, "max_export_batch_size": 11}, "otlp.max_export_batch_size"),
    ({"service_name": ""}, "otlp.service_name"),
])
def test_config_errors_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as e:
        OtlpConfig(**kw)
    assert "\n" not in str(e.value)
