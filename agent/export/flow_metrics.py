"""Prometheus metrics from flow records: connections, bytes, duration and RTT by identity; exporter self-metrics.

Labels are identity names/kinds/versions and verdicts only: bounded by the config, never by addresses or ports.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from agent.export.collector_client import SPOOL_DAMAGE_REASONS
from agent.flows.model import FlowRecordData, IdentityData, RecordKind
from agent.kernel.abi import Verdict

PAIR_LABELS = ["source", "source_kind", "source_version", "destination", "destination_kind", "destination_version"]
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600)
RTT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass
class _Hist:
    buckets: tuple
    counts: list = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        counts = self.counts or [0] * len(self.buckets)
        for b, c in zip(self.buckets, counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", self.n))
        return out


def _ident(i: IdentityData) -> list[str]:
    return [i.name or "unknown", i.kind or "unknown", i.version]


class FlowTally(Collector):
    """Aggregates flow records as they arrive; Prometheus reads the aggregates at scrape time.

    Connection and byte totals count final records only (interim records are partial: their bytes are counted when
    the connection closes), and each connection once (observed_by_client: the caller passes True for the client's
    side, or for the server's when the client is remote). Records are client-relative, so direction "sent" is
    client -> server whichever side was counted.
    """

    def __init__(self, exporter_stats: Optional[Callable[[], object]] = None,
                 flow_counters: Optional[Callable[[], dict]] = None) -> None:
        self._lock = threading.Lock()
        self._flows: dict[tuple, int] = {}
        self._bytes: dict[tuple, int] = {}
        self._duration: dict[tuple, _Hist] = {}
        self._rtt: dict[tuple, _Hist] = {}
        self._exporter_stats = exporter_stats
        self._flow_counters = flow_counters

    def emit(self, record: FlowRecordData, counted: bool) -> None:
        """RecordSink: count the record in the metrics."""
        self.add(record, counted)

    def add(self, r: FlowRecordData, observed_by_client: bool) -> None:
        if r.interim or not observed_by_client:
            return
        pair = tuple(_ident(r.source) + _ident(r.destination))
        proto = "udp" if r.kind == RecordKind.UDP_AGGREGATE else "tcp"
        verdict = Verdict(r.verdict).name.lower() if r.verdict in Verdict._value2member_map_ else str(r.verdict)
        with self._lock:
            k = pair + (verdict, proto)
            self._flows[k] = self._flows.get(k, 0) + 1
            for direction, n in (("sent", r.bytes_sent), ("received", r.bytes_received)):
                bk = pair + (direction, proto)
                self._bytes[bk] = self._bytes.get(bk, 0) + n
            if proto == "tcp":
                self._duration.setdefault(pair, _Hist(DURATION_BUCKETS)).observe(r.duration_ns / 1e9)
                if r.srtt_us:
                    self._rtt.setdefault(pair, _Hist(RTT_BUCKETS)).observe(r.srtt_us / 1e6)

    def collect(self) -> Iterable:
        with self._lock:
            flows, byts = dict(self._flows), dict(self._bytes)
            dur = {k: (v.cumulative(), v.total) for k, v in self._duration.items()}
            rtt = {k: (v.cumulative(), v.total) for k, v in self._rtt.items()}
        f = CounterMetricFamily("aimesh_flows", "Completed flows (TCP connections, UDP aggregates) by identities",
                                labels=PAIR_LABELS + ["verdict", "protocol"])
        for k, n in sorted(flows.items()):
            f.add_metric(list(k), n)
        yield f
        b = CounterMetricFamily("aimesh_flow_bytes",
                                "Payload bytes of completed flows; direction sent: client to server, received: back",
                                labels=PAIR_LABELS + ["direction", "protocol"])
        for k, n in sorted(byts.items()):
            b.add_metric(list(k), n)
        yield b
        for name, doc, data in (("aimesh_flow_duration_seconds", "TCP connection duration", dur),
                                ("aimesh_flow_rtt_seconds", "Smoothed TCP round-trip time at close", rtt)):
            h = HistogramMetricFamily(name, doc, labels=PAIR_LABELS)
            for k, (buckets, total) in sorted(data.items()):
                h.add_metric(list(k), buckets, total)
            yield h
        if self._flow_counters is not None:
            fc = self._flow_counters()
            lost = CounterMetricFamily("aimesh_flow_records_lost", "Flow records lost before export, by where",
                                       labels=["stage"])
            for stage, n in sorted(fc.items()):
                lost.add_metric([stage], n)
            yield lost
        if self._exporter_stats is not None:
            st = self._exporter_stats()
            if st is not None:
                yield from _exporter_metrics(st)


class ExportMetrics(Collector):
    """A collector exporter's counters (ExporterStats, read at scrape time) under `prefix`: the model-call exporter's
    as aimesh_model_call_export_* beside the flow exporter's aimesh_export_* (which FlowTally yields)."""

    def __init__(self, stats: Callable[[], object], prefix: str, what: str) -> None:
        self._stats, self._prefix, self._what = stats, prefix, what

    def collect(self) -> Iterable:
        st = self._stats()
        if st is not None:
            yield from _exporter_metrics(st, self._prefix, self._what)


def _exporter_metrics(st, prefix: str = "aimesh_export", what: str = "Flow records") -> Iterable:
    rec = CounterMetricFamily(f"{prefix}_records", f"{what} handed to the collector exporter, by outcome",
                              labels=["outcome"])
    rec.add_metric(["submitted"], st.submitted)
    rec.add_metric(["sent"], st.sent_records)
    rec.add_metric(["dropped_queue_full"], st.dropped_queue_full)
    rec.add_metric(["dropped_spool_full"], st.dropped_spool_full)
    rec.add_metric(["rejected"], st.rejected_records)
    rec.add_metric(["invalid"], st.invalid_records)
    yield rec
    yield CounterMetricFamily(f"{prefix}_errors", "Failed pushes to the collector", value=st.export_errors)
    yield GaugeMetricFamily(f"{prefix}_queue_records", "Records waiting to be batched", value=st.queued_records)
    spool = GaugeMetricFamily(f"{prefix}_backlog_bytes", "Sealed batches waiting to be sent", labels=["where"])
    spool.add_metric(["memory"], st.memory_bytes)
    spool.add_metric(["spool"], st.spool_bytes)
    yield spool
    batches = GaugeMetricFamily(f"{prefix}_backlog_batches", "Sealed batches waiting to be sent", labels=["where"])
    batches.add_metric(["memory"], st.memory_batches)
    batches.add_metric(["spool"], st.spool_batches)
    yield batches
    # a damaged spool file is set aside, never sent: its batch and the records it held, by reason
    kept = dict(st.spool_discarded_batches), dict(st.spool_discarded_records)
    for i, unit in enumerate(("batches", "records")):
        fam = CounterMetricFamily(f"{prefix}_spool_discarded_{unit}", f"Damaged spool {unit}, set aside unsent",
                                  labels=["reason"])
        for reason in SPOOL_DAMAGE_REASONS:
            fam.add_metric([reason], kept[i].get(reason, 0))
        yield fam
