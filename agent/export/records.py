"""The wire side of flow records: FlowRecordData (agent/flows/model.py) <-> aimesh.v1.FlowRecord, pure functions.

The record types are re-exported here for callers that only deal with the wire."""

from __future__ import annotations

from dataclasses import fields
from enum import IntEnum

from agent._gen.aimesh.v1 import flow_pb2
from agent.flows.model import (  # noqa: F401
    _NO_IDENTITY,
    PROTO_TCP,
    PROTO_UDP,
    FlowRecordData,
    IdentityData,
    RecordKind,
)

_IDENTITY_FIELDS = ("source", "destination", "actual_destination")
_SCALAR_FIELDS = tuple(f for f in FlowRecordData.__dataclass_fields__ if f not in _IDENTITY_FIELDS)
_IDENTITY_DATA_FIELDS = tuple(f.name for f in fields(IdentityData))   # aimesh.v1.Identity has the same names


def _identity_to_proto(identity: IdentityData, out: flow_pb2.Identity) -> None:
    if identity == _NO_IDENTITY:
        return  # leave the field unset rather than an empty message
    for name in _IDENTITY_DATA_FIELDS:
        setattr(out, name, getattr(identity, name))


def to_proto(record: FlowRecordData) -> flow_pb2.FlowRecord:
    """FlowRecordData -> aimesh.v1.FlowRecord. Raises ValueError naming the field whose value does not fit."""
    msg = flow_pb2.FlowRecord()
    for name in _SCALAR_FIELDS:
        value = getattr(record, name)
        try:
            setattr(msg, name, int(value) if isinstance(value, IntEnum) else value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"FlowRecordData.{name}={value!r}: {e}") from None
    for name in _IDENTITY_FIELDS:
        _identity_to_proto(getattr(record, name), getattr(msg, name))
    return msg


def from_proto(msg: flow_pb2.FlowRecord) -> FlowRecordData:
    """aimesh.v1.FlowRecord -> FlowRecordData (fields unknown to this version are dropped)."""
    values: dict[str, object] = {name: getattr(msg, name) for name in _SCALAR_FIELDS}
    for name in _IDENTITY_FIELDS:
        ident = getattr(msg, name)
        values[name] = IdentityData(**{f: getattr(ident, f) for f in _IDENTITY_DATA_FIELDS})
    return FlowRecordData(**values)  # type: ignore[arg-type]
