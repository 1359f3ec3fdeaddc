"""Prometheus metrics from model-call records (plaintext capture), and the kernel's capture counters.

Labels are identity names, protocol, operation and status class only: bounded by the config and the decoder's enums,
never by model names (a client inventing model names cannot grow the series).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.flows.model import IdentityData
from agent.kernel import abi
from agent.l7.capture import status_class
from agent.l7.record import ModelCallRecord

CALL_LABELS = ["source", "destination", "protocol", "operation", "status_class"]
KERNEL_LOSSES = {"ring_full": abi.COUNTER_CAPTURE_EVENTS_LOST, "truncated": abi.COUNTER_CAPTURE_TRUNCATED,
                 "not_captured_syscall": abi.COUNTER_CAPTURE_NOT_CAPTURED,
                 "socket_table_full": abi.COUNTER_CAPTURE_SOCKETS_FULL,
                 "read_failed": abi.COUNTER_CAPTURE_READ_FAILED}


class ModelCallTally(Collector):
    def __init__(self, counters: Optional[Callable[[], list[int]]] = None) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, ...], int] = {}
        self._counters = counters

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
        if self._counters is None:
            return
        c = self._counters()
        yield CounterMetricFamily("aimesh_capture_chunks", "Chunks the kernel copied into capture_events",
                                  value=c[abi.COUNTER_CAPTURE_CHUNKS])
        lost = CounterMetricFamily("aimesh_capture_losses", "Sends, receives and chunks the capture did not copy whole",
                                   labels=["reason"])
        for reason, slot in KERNEL_LOSSES.items():
            lost.add_metric([reason], c[slot])
        yield lost
