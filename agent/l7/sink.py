"""Where model-call records go: every sink (GenAI Prometheus metrics, OTLP spans, later the collector and a JSON log)
takes them through one small interface, the way flow records go through agent/flows/sink.py's RecordSink."""
from __future__ import annotations

from typing import Protocol

from agent.flows.model import IdentityData
from agent.l7.record import ModelCallRecord


class ModelCallSink(Protocol):
    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        """One decoded model call of the process `pid` (`comm`) in `source`, to `destination` (as reached).
        server_address/server_port: the peer as dialed, when the caller knows it ("" / 0: not known).
        dialed: the identity as dialed, when a redirect sent the call elsewhere (None: the same as destination)."""
