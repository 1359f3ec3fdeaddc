"""Flow records as plain data, so the agent builds them without protobuf; one pure function maps them to the wire.

FlowRecordData mirrors aimesh.v1.FlowRecord (proto/aimesh/v1/flow.proto) field for field; change them together.
verdict, hook and reason hold the numbers of bpf/include/abi.h (the kernel's IntEnums in agent/kernel/abi.py are
ints and can be passed as they are); protocol holds the IP protocol number (6 TCP, 17 UDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from agent._gen.aimesh.v1 import flow_pb2


class RecordKind(IntEnum):
    """Mirrors aimesh.v1.RecordKind."""

    UNSPECIFIED = 0
    CONNECTION = 1
    UDP_AGGREGATE = 2
    DECISION = 3


PROTO_TCP = 6
PROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class IdentityData:
    """Mirrors aimesh.v1.Identity. An empty name: not a known identity."""

    name: str = ""
    kind: str = ""
    version: str = ""


_NO_IDENTITY = IdentityData()


@dataclass(frozen=True, slots=True)
class FlowRecordData:
    """Mirrors aimesh.v1.FlowRecord. Times are Unix nanoseconds (UTC); 0 = unknown."""

    agent_id: str = ""
    node: str = ""
    cookie: int = 0
    kind: int = RecordKind.CONNECTION
    interim: bool = False
    start_time_unix_nano: int = 0
    end_time_unix_nano: int = 0
    source: IdentityData = field(default=_NO_IDENTITY)
    destination: IdentityData = field(default=_NO_IDENTITY)
    actual_destination: IdentityData = field(default=_NO_IDENTITY)
    source_address: str = ""
    source_port: int = 0
    destination_address: str = ""
    destination_port: int = 0
    dialed_address: str = ""
    dialed_port: int = 0
    protocol: int = PROTO_TCP
    hook: int = 0
    verdict: int = 0
    reason: int = 0
    rule_id: int = 0
    deprecated: bool = False
    redirected: bool = False
    lifecycle: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    duration_ns: int = 0
    srtt_us: int = 0
    retransmits: int = 0
    pid: int = 0
    comm: str = ""
    count: int = 0  # decisions this record stands for (aggregated DECISION records); 0 means 1


_IDENTITY_FIELDS = ("source", "destination", "actual_destination")
_SCALAR_FIELDS = tuple(f for f in FlowRecordData.__dataclass_fields__ if f not in _IDENTITY_FIELDS)


def _identity_to_proto(identity: IdentityData, out: flow_pb2.Identity) -> None:
    if identity == _NO_IDENTITY:
        return  # leave the field unset rather than an empty message
    out.name = identity.name
    out.kind = identity.kind
    out.version = identity.version


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
        values[name] = IdentityData(name=ident.name, kind=ident.kind, version=ident.version)
    return FlowRecordData(**values)  # type: ignore[arg-type]
