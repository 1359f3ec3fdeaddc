"""Model calls as OTLP spans, following the OpenTelemetry GenAI client span conventions, with the OpenTelemetry SDK.

`OtlpCallSink` is a ModelCallSink (agent/l7/sink.py): one CLIENT span per call, named `{gen_ai.operation.name}
{gen_ai.request.model}`, timed from the record (kernel monotonic time + the caller's mono_to_wall_ns offset), with
the gen_ai.* attributes the record has (an unknown figure is left out, never sent as 0) plus the aimesh identity
attributes. Spans go through the SDK's BatchSpanProcessor to an OTLP/HTTP endpoint; its TracerProvider is the
sink's own (nothing global is set), so the agent's other telemetry is untouched.

The queue is bounded: a call that finds `max_queue_size` spans waiting is dropped and counted (stats()), instead of
the SDK silently evicting the oldest span. The count of spans in flight is taken at hand-over and given back when
the SDK hands a batch to the exporter, so the SDK's own queue never overflows.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from agent.export.genai_metrics import operation_name, provider_name
from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

INSTRUMENTATION_SCOPE = "aimesh.l7"


@dataclass(frozen=True)
class OtlpConfig:
    """Where and how spans are sent. endpoint: the full OTLP/HTTP traces URL (…/v1/traces)."""

    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    service_name: str = "aimesh-agent"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_ms: int = 5000

    def __post_init__(self) -> None:
        u = urlsplit(self.endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"otlp.endpoint: must be an http(s) URL like http://host:4318/v1/traces, got "
                             f"{self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"otlp.timeout_s: must be > 0, got {self.timeout_s}")
        if not self.service_name:
            raise ValueError("otlp.service_name: must not be empty")
        if self.max_queue_size < 1:
            raise ValueError(f"otlp.max_queue_size: must be >= 1, got {self.max_queue_size}")
        if not 1 <= self.max_export_batch_size <= self.max_queue_size:
            raise ValueError(f"otlp.max_export_batch_size: must be 1..max_queue_size ({self.max_queue_size}), got "
                             f"{self.max_export_batch_size}")
        if self.schedule_delay_ms < 1:
            raise ValueError(f"otlp.schedule_delay_ms: must be >= 1, got {self.schedule_delay_ms}")


@dataclass(frozen=True, slots=True)
class OtlpStats:
    emitted: int              # calls handed to the sink
    dropped_queue_full: int   # of which dropped: max_queue_size spans were waiting
    queued: int               # spans waiting for the exporter
    exported: int             # spans the endpoint accepted
    failed: int               # spans in batches the exporter gave up on


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.emitted = 0
        self.dropped = 0
        self.in_flight = 0
        self.exported = 0
        self.failed = 0


class _CountingExporter(SpanExporter):
    """Counts what leaves the SDK's queue and how the export went."""

    def __init__(self, inner: SpanExporter, counts: _Counts) -> None:
        self._inner = inner
        self._counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._counts.lock:
            self._counts.in_flight -= len(spans)
        try:
            result = self._inner.export(spans)
        except Exception:   # the SDK logs and swallows it too; count the batch as failed
            result = SpanExportResult.FAILURE
        with self._counts.lock:
            if result is SpanExportResult.SUCCESS:
                self._counts.exported += len(spans)
            else:
                self._counts.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def build_exporter(config: OtlpConfig) -> SpanExporter:
    return OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers), timeout=config.timeout_s)


def span_name(call: ModelCallRecord) -> str:
    op = operation_name(call.operation)
    return f"{op} {call.request_model}" if call.request_model else op


def span_error_type(call: ModelCallRecord) -> str | None:
    """error.type: the API's error (or http_<status>), else why the call did not finish; None when it succeeded."""
    if call.error_type:
        return call.error_type
    if call.status is None:
        return "no_response"
    if call.status >= 400:
        return f"http_{call.status}"
    if call.incomplete:
        return "incomplete"
    return None


# openai.api.type: the well-known values (chat_completions, responses), custom ones for the other OpenAI APIs
_OPENAI_API_TYPES = {Operation.CHAT: "chat_completions", Operation.RESPONSES: "responses",
                     Operation.COMPLETION: "completions", Operation.EMBEDDINGS: "embeddings"}


def openai_api_type(call: ModelCallRecord) -> str | None:
    return _OPENAI_API_TYPES.get(call.operation) if call.protocol is Protocol.OPENAI else None


def span_attributes(call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                    server_address: str = "", server_port: int = 0) -> dict[str, object]:
    """The span's attributes: GenAI semantic conventions (gen_ai.provider.name, which replaced gen_ai.system in
    semconv 1.37) where one applies, aimesh.* for what only aimesh knows. Unknown figures are left out."""
    a: dict[str, object] = {
        "gen_ai.operation.name": operation_name(call.operation),
        "gen_ai.provider.name": provider_name(call.protocol),
        "aimesh.source.identity": source.name,
        "aimesh.source.kind": source.kind,
        "aimesh.source.pid": pid,
        "aimesh.source.comm": comm,
        "aimesh.destination.identity": destination.name,
        "aimesh.destination.kind": destination.kind,
        "aimesh.l7.api": call.operation.value,
        "aimesh.l7.tls": call.tls,
        "aimesh.l7.request_bytes": call.request_bytes,
        "aimesh.l7.response_bytes": call.response_bytes,
        "aimesh.l7.request_digest": call.request_digest,
    }
    optional: tuple[tuple[str, object], ...] = (
        ("gen_ai.request.model", call.request_model),
        ("gen_ai.response.model", call.response_model),
        ("gen_ai.usage.input_tokens", call.input_tokens),
        ("gen_ai.usage.output_tokens", call.output_tokens),
        ("gen_ai.usage.cache_read.input_tokens", call.cached_tokens),
        ("gen_ai.request.max_tokens", call.max_tokens),
        ("gen_ai.request.temperature", call.temperature),
        ("gen_ai.response.time_to_first_chunk",          # "if the request was a streaming request" only
         call.time_to_first_chunk_ns / 1e9 if call.time_to_first_chunk_ns is not None and call.stream else None),
        ("gen_ai.request.choice.count", call.choice_count if call.choice_count != 1 else None),   # "and != 1"
        ("gen_ai.response.id", call.response_id),
        ("openai.api.type", openai_api_type(call)),
        ("http.response.status_code", call.status),
        ("error.type", span_error_type(call)),
        ("aimesh.l7.confidence_mean", call.confidence_mean),
        ("aimesh.l7.confidence_min", call.confidence_min),
    )
    for k, v in optional:
        if v is not None:
            a[k] = v
    if call.stream:     # "if and only if the request is streaming" (unset: assumed not)
        a["gen_ai.request.stream"] = True
    if call.finish_reasons:
        a["gen_ai.response.finish_reasons"] = tuple(call.finish_reasons)
    if call.truncated:
        a["aimesh.l7.truncated"] = True
    if call.incomplete:
        a["aimesh.l7.incomplete"] = True
    if call.gateway:   # the node gateway's judgement (issue 10)
        a["aimesh.gateway"] = True
        for k, v in (("aimesh.gateway.policy", call.policy), ("aimesh.gateway.decision", call.decision),
                     ("aimesh.gateway.reason", call.reason), ("aimesh.gateway.sent_model", call.sent_model)):
            if v is not None:
                a[k] = v
    if server_address:
        a["server.address"] = server_address
        if server_port:
            a["server.port"] = server_port
    a.update(k8s_attributes(source))
    return a


def k8s_attributes(source: IdentityData) -> dict[str, str]:
    """The caller's Kubernetes workload, where the identity names it: OpenTelemetry's k8s.* resource conventions
    (on the span: one agent's spans come from many pods), and the service account as aimesh.source.service_account
    (the k8s conventions have none). Empty fields are left out."""
    pairs = (("k8s.namespace.name", source.namespace), ("k8s.pod.name", source.pod),
             ("k8s.container.name", source.container), ("aimesh.source.service_account", source.service_account))
    return {k: v for k, v in pairs if v}


class OtlpCallSink:
    """ModelCallSink: one span per model call, batched to an OTLP/HTTP endpoint. Call shutdown() when done (it
    flushes what is queued)."""

    def __init__(self, config: OtlpConfig, mono_to_wall_ns: int, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self._offset = mono_to_wall_ns
        self._counts = _Counts()
        resource = Resource.create({**config.resource_attributes, "service.name": config.service_name})
        self._provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)   # not OTEL_TRACES_SAMPLER
        self._processor = BatchSpanProcessor(
            _CountingExporter(exporter if exporter is not None else build_exporter(config), self._counts),
            max_queue_size=config.max_queue_size, schedule_delay_millis=config.schedule_delay_ms,
            max_export_batch_size=config.max_export_batch_size,
            export_timeout_millis=config.timeout_s * 1000)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer(INSTRUMENTATION_SCOPE)

    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        c = self._counts
        with c.lock:
            c.emitted += 1
            if c.in_flight >= self.config.max_queue_size:
                c.dropped += 1
                return
            c.in_flight += 1
        start = call.start_ns + self._offset
        end = start + max(call.duration_ns or call.time_to_first_chunk_ns or 0, 0)
        attrs = span_attributes(call, source, destination, pid, comm, server_address, server_port)
        if dialed is not None and dialed.name != destination.name:
            attrs["aimesh.destination.dialed_identity"] = dialed.name   # a redirect sent the call elsewhere
        span = self._tracer.start_span(span_name(call), kind=SpanKind.CLIENT, start_time=start, attributes=attrs)
        err = attrs.get("error.type")
        if err is not None:
            span.set_status(Status(StatusCode.ERROR, str(err)))
        span.end(end_time=end)

    def stats(self) -> OtlpStats:
        c = self._counts
        with c.lock:
            return OtlpStats(c.emitted, c.dropped, max(c.in_flight, 0), c.exported, c.failed)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self._provider.shutdown()


__all__ = ["OtlpCallSink", "OtlpConfig", "OtlpStats", "build_exporter", "k8s_attributes", "span_attributes", "span_error_type",
           "span_name"]
