"""aimesh_model_calls_total from model-call records.

Labels are identity names, protocol, operation and status class only: bounded by the config and the decoder's enums,
never by model names (a client inventing model names cannot grow the series).
"""
from __future__ import annotations

import threading
from typing import Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.flows.model import IdentityData
from agent.l7.capture import status_class
from agent.l7.record import ModelCallRecord

CALL_LABELS = ["source", "destination", "protocol", "operation", "status_class"]


class ModelCallTally(Collector):
    """aimesh_model_calls_total. The kernel's capture counters and the undecoded connections are exported by
    agent/export/metrics.py (capture_metrics), once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, ...], int] = {}

    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        """ModelCallSink: count the call under its source and destination as dialed."""
        self.add(source.name, (dialed or destination).name, call.protocol.value, call.operation.value,
                 status_class(call.status))

    def add(self, source: str, destination: str, protocol: str, operation: str, status_class: str) -> None:
        k = (source, destination, protocol, operation, status_class)
        with self._lock:
            self._calls[k] = self._calls.get(k, 0) + 1

    def collect(self) -> Iterable:
        with self._lock:
            calls = dict(self._calls)
        f = CounterMetricFamily("aimesh_model_calls", "LLM API calls seen by the plaintext capture", labels=CALL_LABELS)
        for k, n in sorted(calls.items()):
            f.add_metric(list(k), n)
        yield f
