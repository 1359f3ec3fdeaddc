"""Where records go: every sink (Prometheus tally, JSON records log, collector exporter, later OTLP) takes records
through one small interface, so the agent fans each record out without knowing what the sinks are."""
from __future__ import annotations

from dataclasses import asdict
from typing import Protocol

from agent.flows.log import FlowLog
from agent.flows.model import FlowRecordData


class RecordSink(Protocol):
    def emit(self, record: FlowRecordData, counted: bool) -> None:
        """counted: the record is the one side of a connection that metrics count (the client's, or the server's
        when the client is remote); sinks that store every record ignore it."""


class RecordsLogSink:
    """Every record as one JSON line (`--records-log`)."""

    def __init__(self, log: FlowLog) -> None:
        self.log = log

    def emit(self, record: FlowRecordData, counted: bool) -> None:
        self.log.write(asdict(record))
