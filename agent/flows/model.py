"""Records as plain data, owned by the decoding layer: what the kernel reported, with no wire format attached.

FlowRecordData mirrors aimesh.v1.FlowRecord (proto/aimesh/v1/flow.proto) field for field (agent/export/records.py
maps it to the wire); change them together. verdict, hook and reason hold the numbers of bpf/include/abi.h (the
kernel's IntEnums in agent/kernel/abi.py are ints and can be passed as they are); protocol holds the IP protocol
number (6 TCP, 17 UDP). Sinks (agent/flows/sink.py) consume these; nothing here imports export/ or protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class RecordKind(IntEnum):
    """Mirrors aimesh.v1.RecordKind."""

    UNSPECIFIED = 0
    CONNECTION = 1
    UDP_AGGREGATE = 2
    DECISION = 3


PROTO_TCP = 6
PROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class WorkloadData:
    """The Kubernetes workload a local end runs in, where the agent knows it (a cgroup matched to a pod of the API):
    the pod's namespace and name, the container's name ("" for the pod level or a container not in the status) and
    the pod's service account."""

    namespace: str = ""
    pod: str = ""
    container: str = ""
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class IdentityData:
    """Mirrors aimesh.v1.Identity. An empty name: not a known identity. namespace, pod, container and
    service_account: the local end's Kubernetes workload where known (WorkloadData), else empty; metrics never use
    them as labels (one series per identity, not per pod)."""

    name: str = ""
    kind: str = ""
    version: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""
    service_account: str = ""


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
