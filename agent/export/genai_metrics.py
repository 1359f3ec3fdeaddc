"""Prometheus metrics of model calls, named after the OpenTelemetry GenAI client metrics, and per-identity compute.

`GenAiTally` is a ModelCallSink (agent/l7/sink.py): it aggregates each call as it arrives and Prometheus reads the
aggregates at scrape time. The OpenTelemetry names map to Prometheus the usual way (dots to underscores, unit `s` to
`_seconds`, `{token}` dropped):

    gen_ai.client.token.usage                    -> gen_ai_client_token_usage (label gen_ai_token_type input/output)
    gen_ai.client.operation.duration             -> gen_ai_client_operation_duration_seconds
    gen_ai.client.operation.time_to_first_chunk  -> gen_ai_client_operation_time_to_first_chunk_seconds (streams only,
                                                    as the convention says)

Each carries the convention's recommended gen_ai_response_model (bounded like the request model, with its own cap)
and server_address / server_port (the address the client dialed, bounded: `MAX_SERVERS` distinct, then `other`).

Every label is bounded: identities come from the config, operation and provider from our enums, error_type from the
HTTP status (never from the response body), and the request model through `ModelLabel`: an allow-list of globs and a
cap on how many distinct names it admits, everything else `other`, so a client inventing model names cannot grow
the series. Buckets are the convention's ExplicitBucketBoundaries (the client's time to first chunk has the same
ones as the operation duration; gen_ai.server.time_to_first_token's finer ones are the server's metric, not ours).

`IdentityCompute` reads CPU time (cpu.stat usage_usec) and memory (memory.current) of each identity's cgroups when
scraped, the way prometheus_client's ProcessCollector reads /proc. Nothing here registers itself anywhere: the
caller builds a CollectorRegistry and registers these.
"""
from __future__ import annotations

import bisect
import fnmatch
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

# gen_ai.client.token.usage, gen_ai.client.operation.duration, gen_ai.server.time_to_first_token (semconv 1.37+)
TOKEN_BUCKETS: tuple[float, ...] = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
                                    67108864)
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                                       40.96, 81.92)
TIME_TO_FIRST_CHUNK_BUCKETS: tuple[float, ...] = DURATION_BUCKETS    # gen_ai.client.operation.time_to_first_chunk
MAX_SERVERS = 256            # distinct server_address label values; the rest are `other`

OTHER_MODEL = "other"        # a model name outside the allow-list, or past its cap
UNKNOWN_MODEL = "unknown"    # the request named no model we could read

# gen_ai.operation.name: the convention's well-known values where one applies (it says they MUST be used)
OPERATION_NAMES: Mapping[Operation, str] = {
    Operation.CHAT: "chat",
    Operation.COMPLETION: "text_completion",
    Operation.EMBEDDINGS: "embeddings",
    Operation.RESPONSES: "chat",      # OpenAI Responses API: a chat generation
    Operation.MESSAGES: "chat",       # Anthropic Messages API
}


def operation_name(op: Operation) -> str:
    return OPERATION_NAMES.get(op, op.value)


def provider_name(protocol: Protocol) -> str:
    """gen_ai.provider.name: the wire protocol we decoded ("openai", "anthropic"; "ollama" is a custom value). An
    OpenAI-compatible server (vLLM, llama.cpp, a gateway) reads as "openai": the convention calls the attribute the
    telemetry flavor discriminator, and the destination identity and server.address say who actually served it."""
    return protocol.value


def status_error_type(call: ModelCallRecord) -> str:
    """A bounded error.type for metric labels, from the status only: "" when the call succeeded."""
    if call.status is None:
        return "no_response"
    if call.status >= 400:
        return f"http_{call.status}" if call.status < 1000 else "http_invalid"
    if call.incomplete:
        return "incomplete"
    return ""


class ModelLabel:
    """The gen_ai_request_model label: a model name matching one of `globs` (fnmatch, case-sensitive) is kept as it
    is, up to `max_models` distinct names; every other name, and every name past the cap, is `other`."""

    def __init__(self, globs: Sequence[str], max_models: int = 100) -> None:
        for i, g in enumerate(globs):
            if not isinstance(g, str) or not g:
                raise ValueError(f"model_globs[{i}]: must be a non-empty glob, got {g!r}")
        if max_models < 0:
            raise ValueError(f"max_models: must be >= 0, got {max_models}")
        self._globs = tuple(globs)
        self._max = max_models
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def fresh(self) -> "ModelLabel":
        """The same allow-list and cap, admitting names of its own (the response model's label)."""
        return ModelLabel(self._globs, self._max)

    def __call__(self, model: str | None) -> str:
        if not model:
            return UNKNOWN_MODEL
        with self._lock:
            if model in self._admitted:
                return model
            if len(self._admitted) < self._max and any(fnmatch.fnmatchcase(model, g) for g in self._globs):
                self._admitted.add(model)
                return model
        return OTHER_MODEL


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, v)     # the first bucket with le >= v
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts or [0] * len(self.buckets)):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", self.n))
        return out


PAIR_LABELS = ["source", "source_kind", "destination", "destination_kind"]
CALL_LABELS = PAIR_LABELS + ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                             "gen_ai_response_model", "server_address", "server_port"]


def _ident(i: IdentityData) -> tuple[str, str]:
    return i.name or "unknown", i.kind or "unknown"


class GenAiTally(Collector):
    """ModelCallSink + Collector: GenAI client metrics by source and destination identity, operation, provider and
    (bounded) request model."""

    def __init__(self, model_label: ModelLabel) -> None:
        self._model = model_label
        self._response_model = model_label.fresh()
        self._server = ModelLabel(["*"], MAX_SERVERS)
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, ...], _Histogram] = {}
        self._duration: dict[tuple[str, ...], _Histogram] = {}
        self._ttfc: dict[tuple[str, ...], _Histogram] = {}

    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        key = _ident(source) + _ident(destination) + (
            operation_name(call.operation), provider_name(call.protocol), self._model(call.request_model),
            self._response_model(call.response_model) if call.response_model else "",
            self._server(server_address) if server_address else "",
            str(server_port) if server_address and server_port else "")
        with self._lock:
            for kind, n in (("input", call.input_tokens), ("output", call.output_tokens)):
                if n is not None:
                    self._tokens.setdefault(key + (kind,), _Histogram(TOKEN_BUCKETS)).observe(n)
            if call.duration_ns is not None:
                self._duration.setdefault(key + (status_error_type(call),),
                                          _Histogram(DURATION_BUCKETS)).observe(call.duration_ns / 1e9)
            if call.stream and call.time_to_first_chunk_ns is not None:
                self._ttfc.setdefault(key, _Histogram(TIME_TO_FIRST_CHUNK_BUCKETS)).observe(
                    call.time_to_first_chunk_ns / 1e9)

    def collect(self) -> Iterable:
        with self._lock:
            data = [{k: (h.cumulative(), h.total) for k, h in d.items()}
                    for d in (self._tokens, self._duration, self._ttfc)]
        families = (
            ("gen_ai_client_token_usage", "Number of input and output tokens used", CALL_LABELS + ["gen_ai_token_type"]),
            ("gen_ai_client_operation_duration_seconds", "GenAI operation duration (request start to last byte)",
             CALL_LABELS + ["error_type"]),
            ("gen_ai_client_operation_time_to_first_chunk_seconds",
             "Time from the request start to the first chunk of a streamed response", CALL_LABELS),
        )
        for (name, doc, labels), series in zip(families, data):
            h = HistogramMetricFamily(name, doc, labels=labels)
            for k, (buckets, total) in sorted(series.items()):
                h.add_metric(list(k), buckets, total)
            yield h


# -- compute per identity -------------------------------------------------------------------------------------------

def read_usage_usec(cgroup_dir: Path) -> int | None:
    """usage_usec from a cgroup v2 cpu.stat (the cgroup and its descendants); None if not readable."""
    try:
        text = (cgroup_dir / "cpu.stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == "usage_usec" and v.strip().isdigit():
            return int(v)
    return None


def read_memory_current(cgroup_dir: Path) -> int | None:
    """memory.current of a cgroup v2 (the cgroup and its descendants); None if the memory controller is not enabled
    for it (on a hybrid host the memory controller may be on v1) or it is gone."""
    try:
        v = (cgroup_dir / "memory.current").read_text().strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None


def outermost(paths: Iterable[str]) -> list[str]:
    """The paths (relative to the cgroup2 mount) with duplicates and descendants of another listed path removed:
    cpu.stat and memory.current already count the whole subtree, so a nested cgroup must not be counted twice."""
    norm = sorted({"/" + p.strip("/") if p.strip("/") else "/" for p in paths})
    out: list[str] = []
    for p in norm:
        if not any(p == q or q == "/" or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


class IdentityCompute(Collector):
    """aimesh_identity_cpu_seconds_total and aimesh_identity_memory_bytes, summed over each identity's cgroups, read
    at scrape time. `cgroups()` returns {identity name: [cgroup paths relative to `mount`, like "/aimesh/web"]}.

    An identity whose cgroups have no readable figure gets no sample for it (never a fake 0);
    aimesh_identity_compute_cgroups says how many cgroups each figure was read from. The CPU counter is a sum over
    cgroups that come and go: it can drop when one is removed (Prometheus' rate() treats that as a counter reset)."""

    def __init__(self, cgroups: Callable[[], Mapping[str, Sequence[str]]], mount: Path) -> None:
        self._cgroups = cgroups
        self._mount = Path(mount)

    def _dir(self, rel: str) -> Path:
        return self._mount / rel.lstrip("/") if rel.strip("/") else self._mount

    def collect(self) -> Iterable:
        cpu = CounterMetricFamily("aimesh_identity_cpu_seconds", "CPU time of the identity's cgroups (cpu.stat "
                                  "usage_usec, summed)", labels=["identity"])
        mem = GaugeMetricFamily("aimesh_identity_memory_bytes", "Memory of the identity's cgroups (memory.current, "
                                "summed)", labels=["identity"])
        seen = GaugeMetricFamily("aimesh_identity_compute_cgroups", "Cgroups each compute figure was read from",
                                 labels=["identity", "resource"])
        for name, paths in sorted(self._cgroups().items()):
            usec, nbytes, n_cpu, n_mem = 0, 0, 0, 0
            for rel in outermost(paths):
                d = self._dir(rel)
                u = read_usage_usec(d)
                if u is not None:
                    usec, n_cpu = usec + u, n_cpu + 1
                m = read_memory_current(d)
                if m is not None:
                    nbytes, n_mem = nbytes + m, n_mem + 1
            if n_cpu:
                cpu.add_metric([name], usec / 1e6)
            if n_mem:
                mem.add_metric([name], nbytes)
            seen.add_metric([name, "cpu"], n_cpu)
            seen.add_metric([name, "memory"], n_mem)
        yield cpu
        yield mem
        yield seen


__all__ = ["DURATION_BUCKETS", "GenAiTally", "IdentityCompute", "ModelLabel", "OTHER_MODEL", "TIME_TO_FIRST_CHUNK_BUCKETS",
           "TOKEN_BUCKETS", "UNKNOWN_MODEL", "operation_name", "outermost", "provider_name", "read_memory_current",
           "read_usage_usec", "status_error_type"]
