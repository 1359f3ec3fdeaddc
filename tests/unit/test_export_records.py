"""FlowRecordData mirrors aimesh.v1.FlowRecord and maps to it with one pure function."""

from __future__ import annotations

import dataclasses
from enum import IntEnum

import pytest

import tests.unit.collector_testlib  # noqa: F401  (generates the protobuf code)
from agent._gen.aimesh.v1 import flow_pb2
from agent.export.records import FlowRecordData, IdentityData, RecordKind, from_proto, to_proto


def test_every_proto_field_is_mirrored() -> None:
    proto_fields = {f.name for f in flow_pb2.FlowRecord.DESCRIPTOR.fields}
    data_fields = {f.name for f in dataclasses.fields(FlowRecordData)}
    assert data_fields == proto_fields
    assert {f.name for f in dataclasses.fields(IdentityData)} == {f.name for f in flow_pb2.Identity.DESCRIPTOR.fields}


def test_record_kind_mirrors_the_proto() -> None:
    assert {f"RECORD_KIND_{k.name}": int(k) for k in RecordKind} == dict(flow_pb2.RecordKind.items())


def test_round_trip() -> None:
    class Verdict(IntEnum):  # like agent/kernel/abi.py's
        REDIRECTED = 4

    rec = FlowRecordData(
        agent_id="node-a", node="host1", cookie=2**64 - 1, kind=RecordKind.UDP_AGGREGATE, interim=True,
        start_time_unix_nano=1, end_time_unix_nano=2**63, source=IdentityData("ui", "agent", "v1"),
        destination=IdentityData("llm", "model", "v1"), actual_destination=IdentityData("llm", "model", "v2"),
        source_address="::1", source_port=40000, destination_address="10.0.0.2", destination_port=8001,
        dialed_address="10.0.0.1", dialed_port=8000, protocol=17, hook=2, verdict=Verdict.REDIRECTED, reason=1,
        rule_id=3, deprecated=True, redirected=True, lifecycle=True, bytes_sent=10, bytes_received=20,
        packets_sent=1, packets_received=2, duration_ns=5, srtt_us=7, retransmits=1, pid=42, comm="python3",
    )  # fmt: skip
    msg = to_proto(rec)
    assert msg.verdict == flow_pb2.VERDICT_REDIRECTED and msg.kind == flow_pb2.RECORD_KIND_UDP_AGGREGATE
    assert msg.actual_destination.version == "v2"
    back = from_proto(flow_pb2.FlowRecord.FromString(msg.SerializeToString()))
    assert back == dataclasses.replace(rec, verdict=4)


def test_unset_identities_stay_unset() -> None:
    msg = to_proto(FlowRecordData(cookie=1))
    assert not msg.HasField("source") and not msg.HasField("actual_destination")
    assert from_proto(msg).source == IdentityData()


@pytest.mark.parametrize(("field", "value"), [("bytes_sent", -1), ("srtt_us", 2**32), ("cookie", 2**64), ("comm", 5)])
def test_out_of_range_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"FlowRecordData.{field}="):
        to_proto(dataclasses.replace(FlowRecordData(), **{field: value}))
