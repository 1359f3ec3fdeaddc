"""The model-call sinks an agent runs, built from its config, and what the agent needs to hand a call to them.

    sinks = build_call_sinks(config.telemetry, exporter_config, node=..., mono_to_wall_ns=..., records_log=...,
                             tally=ModelCallTally(...))
    for sink in sinks.sinks:            # every ModelCallSink (agent/l7/sink.py) gets every call
        sink.emit_call(record, source, destination, pid, comm, dialed=dialed)
    sinks.commit()                      # once per drain turn: the calls emitted meanwhile to the spool (fsync'd)
    sinks.collectors()                  # Prometheus collectors to register (GenAI metrics, exporter counters)
    sinks.close()                       # at stop: the collector exporter spools what it could not send, OTLP flushes

Which sinks there are: the aimesh_model_calls_total tally and the gen_ai_client_* metrics always; the collector
exporter (PushCalls, its own spool subdirectory; durable like the flow exporter when there is a spool: every
completed call is group-committed to disk before it is sent) when the agent exports to a collector; OTLP spans when
`telemetry.otlp` is set; the records log (`--records-log`) when it is on.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client.registry import Collector

from agent.config import Telemetry
from agent.export.collector_client import CALLS_SPOOL, ExporterConfig, ModelCallExporter
from agent.export.flow_metrics import ExportMetrics
from agent.export.genai_metrics import GenAiTally, ModelLabel
from agent.export.model_metrics import ModelCallTally
from agent.flows.log import FlowLog
from agent.flows.model import IdentityData, WorkloadData
from agent.flows.records import identity_data, with_workload
from agent.l7.capture import CapturedCall
from agent.l7.record import ModelCallRecord
from agent.l7.sink import ModelCallSink

COMM_CACHE_ENTRIES = 4096
IDENTITY_CACHE_ENTRIES = 65536


class CommCache:
    """pid -> comm, read from /proc/PID/comm once per pid; at most max_entries pids (least recently used out).
    `prune(alive)` forgets pids that exited, so a reused pid is read again. "" when the process is gone."""

    def __init__(self, max_entries: int = COMM_CACHE_ENTRIES, proc: str = "/proc") -> None:
        self._max = max_entries
        self._proc = proc
        self._comms: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._comms)

    def __call__(self, pid: int) -> str:
        comm = self._comms.get(pid)
        if comm is not None:
            self._comms.move_to_end(pid)
            return comm
        try:
            with open(f"{self._proc}/{pid}/comm", "rb") as f:
                comm = f.read(64).rstrip(b"\n").decode(errors="replace")
        except OSError:
            return ""          # gone (or not ours to read): not cached, so a reused pid is read again
        self._comms[pid] = comm
        while len(self._comms) > self._max:
            self._comms.popitem(last=False)
        return comm

    def prune(self, alive: Callable[[int], bool]) -> int:
        gone = [pid for pid in self._comms if not alive(pid)]
        for pid in gone:
            del self._comms[pid]
        return len(gone)


class CallDispatch:
    """The agent's per-call step: each CapturedCall to every sink, with its source, destination (as reached) and
    dialed identity and the caller's comm. `identities()` is the current id -> IdentityMeta map (an entry's
    IdentityData is made once per IdentityMeta object: a reload that changes it is seen), `sinks()` the current sinks; `on_error(sink, exc)` hears of
    a sink that raised (the others still get the call)."""

    def __init__(self, identities: Callable[[], Mapping[int, object]], comm: Callable[[int], str],
                 sinks: Callable[[], Sequence[ModelCallSink]],
                 on_error: Optional[Callable[[ModelCallSink, Exception], None]] = None,
                 workload: Callable[[int], Optional[WorkloadData]] = lambda _pid: None) -> None:
        """workload(pid): the caller's pod and container where known (Kubernetes), named on the source."""
        self._identities = identities
        self._workload = workload
        self._comm = comm
        self._sinks = sinks
        self._on_error = on_error
        self._cache: dict[int, tuple[object, IdentityData]] = {}   # id -> (the IdentityMeta it was made from, it)
        self.calls = 0

    def identity(self, iid: int) -> IdentityData:
        m = self._identities().get(iid)
        hit = self._cache.get(iid)
        if hit is not None and hit[0] is m:
            return hit[1]
        d = identity_data({iid: m} if m is not None else {}, iid)   # type: ignore[dict-item]
        if len(self._cache) >= IDENTITY_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[iid] = (m, d)
        return d

    def __call__(self, calls: Iterable[CapturedCall]) -> None:
        sinks = self._sinks()
        for c in calls:
            self.calls += 1
            source = self.identity(c.src_id)
            w = self._workload(c.pid)
            if w is not None:
                source = with_workload(source, w)
            dialed = self.identity(c.dst_id)
            actual = self.identity(c.actual_dst_id) if c.actual_dst_id else dialed
            comm = self._comm(c.pid)
            for sink in sinks:
                try:
                    sink.emit_call(c.record, source, actual, c.pid, comm, dialed=dialed,
                                   server_address=c.server_address, server_port=c.server_port)
                except Exception as e:  # noqa: BLE001 - one sink's bug must not keep the call from the others
                    if self._on_error is not None:
                        self._on_error(sink, e)


def call_json(call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
              dialed: Optional[IdentityData], wall: Callable[[int], str], server_address: str = "",
              server_port: int = 0) -> dict:
    """One JSON line of the records log: the record's fields and who called whom (destination: as dialed, with the
    address and port dialed when known; actual: as reached)."""
    out: dict = {"kind": "model_call", "time": wall(call.start_ns),
                 "source": {"name": source.name, "kind": source.kind, "pid": pid, "comm": comm},
                 "destination": {"name": (dialed or destination).name, "kind": (dialed or destination).kind,
                                 **({"address": server_address, "port": server_port} if server_address else {})},
                 "actual": {"name": destination.name, "kind": destination.kind},
                 "cookie": call.conn_key}
    if source.pod:   # the caller's Kubernetes workload, where known
        out["source"].update(namespace=source.namespace, pod=source.pod, container=source.container,
                             service_account=source.service_account)
    for f in dataclasses.fields(call):
        if f.name == "conn_key":
            continue
        v = getattr(call, f.name)
        out[f.name] = v.value if hasattr(v, "value") else list(v) if isinstance(v, tuple) else v
    return out


class ModelCallLogSink:
    """ModelCallSink: every call as one JSON line of the records log (`--records-log`)."""

    def __init__(self, log: FlowLog, wall: Callable[[int], str]) -> None:
        self.log = log
        self._wall = wall

    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        self.log.write(call_json(call, source, destination, pid, comm, dialed, self._wall, server_address, server_port))


@dataclass
class CallSinks:
    sinks: list[ModelCallSink]
    tally: ModelCallTally
    genai: GenAiTally
    exporter: Optional[ModelCallExporter] = None
    otlp: Optional[object] = None            # OtlpCallSink (imported only when configured: the SDK is heavy)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def collectors(self) -> list[Collector]:
        out: list[Collector] = [self.tally, self.genai]
        if self.exporter is not None:
            out.append(ExportMetrics(self.exporter.stats, "aimesh_model_call_export", "Model calls"))
        return out

    def start(self) -> None:
        if self.exporter is not None:
            self.exporter.start()

    def commit(self) -> None:
        """The calls emitted since the last commit to the collector exporter's spool writer (durable: one fsync'd
        batch for all of them, before they are sent); the caller never waits for the disk."""
        if self.exporter is not None:
            self.exporter.commit()

    def close(self) -> None:
        for close in self.closers:
            close()


def calls_exporter_config(flows: ExporterConfig) -> ExporterConfig:
    """The model-call exporter's settings from the flow exporter's: same collector, credentials, agent id and sizes;
    its own spool in the CALLS_SPOOL subdirectory; durable when the flow exporter is (completed calls go to disk
    before they are sent; the capture ring itself is released once decoded)."""
    spool = flows.spool_dir / CALLS_SPOOL if flows.spool_dir is not None else None
    return dataclasses.replace(flows, spool_dir=spool, durable=flows.durable and spool is not None)


def build_call_sinks(telemetry: Telemetry, exporter: Optional[ExporterConfig], *, node: str,
                     mono_to_wall_ns: Callable[[], int], records_log: FlowLog, tally: ModelCallTally,
                     wall: Callable[[int], str]) -> CallSinks:
    """The sinks from the config. `exporter`: the flow exporter's settings (None: no collector). Raises ValueError
    naming the setting when one cannot be used."""
    genai = GenAiTally(ModelLabel(telemetry.genai.model_labels, telemetry.genai.max_models))
    out = CallSinks(sinks=[tally, genai], tally=tally, genai=genai)
    if exporter is not None:
        out.exporter = ModelCallExporter(calls_exporter_config(exporter), node, mono_to_wall_ns)
        out.sinks.append(out.exporter)
        out.closers.append(out.exporter.close)
    if telemetry.otlp is not None:
        from agent.export.otlp import OtlpCallSink, OtlpConfig
        o = telemetry.otlp
        otlp = OtlpCallSink(OtlpConfig(endpoint=o.endpoint, headers=dict(o.headers), timeout_s=o.timeout,
                                       service_name=o.service_name, resource_attributes={"host.name": node},
                                       max_queue_size=o.max_queue_size,
                                       max_export_batch_size=o.max_export_batch_size,
                                       schedule_delay_ms=max(1, int(o.schedule_delay * 1000))),
                            mono_to_wall_ns())
        out.otlp = otlp
        out.sinks.append(otlp)
        out.closers.append(otlp.shutdown)
    if records_log.enabled:
        out.sinks.append(ModelCallLogSink(records_log, wall))
    return out


__all__ = ["COMM_CACHE_ENTRIES", "CallDispatch", "CallSinks", "CommCache", "ModelCallLogSink", "build_call_sinks", "call_json",
           "calls_exporter_config"]
