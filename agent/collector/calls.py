"""Model calls on the collector side: aimesh.v1.ModelCall -> the row the store keeps, a CallQuery -> a CallFilter,
and the per-field checks a pushed call must pass. Pure functions; service.py wires them to the RPCs.

The checks follow the flows' (service.record_problem): text lengths and control characters, enum values, ranges of
numbers and times, the serialized size; each answer names the field.
"""

from __future__ import annotations

import math
import re

from agent._gen.aimesh.v1 import collector_pb2, flow_pb2, model_call_pb2
from agent.collector.store import CallFilter, CallRow, Ident

MAX_NAME = 253  # node, identity name/kind/version, model names, error type
MAX_COMM = 16  # the kernel's comm is 16 bytes with its NUL
MAX_PID = 1 << 22
MAX_FINISH_REASONS = 64
MAX_FINISH_REASON = 64
MAX_TEXT = 64 << 10  # characters of prompt or completion text (the agent's cap is 16 Ki by default)
MAX_CALL_BYTES = 512 << 10  # serialized, unknown fields and text included
MAX_TEMPERATURE = 100.0
MIN_TIME_NS = 946_684_800 * 10**9  # 2000-01-01
MAX_FUTURE_NS = 7 * 86400 * 10**9
_MAX_I64 = (1 << 63) - 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_ENUMS = {
    "protocol": frozenset(model_call_pb2.LlmProtocol.values()),
    "operation": frozenset(model_call_pb2.LlmOperation.values()),
}
_IDENTITIES = ("source", "destination", "actual_destination")
_OPTIONAL_TEXT = ("request_model", "response_model", "error_type", "policy", "sent_model", "response_id")
MAX_REASON = 1024  # the gateway's reason text
DECISIONS = frozenset({"served", "refused", "would_deny"})   # agent/gateway/policy.py Outcome
_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "time_to_first_chunk_ns", "duration_ns",
           "time_per_output_chunk_ns", "request_bytes", "response_bytes")  # fmt: skip


def _ident(i: flow_pb2.Identity) -> Ident:
    return Ident(name=i.name, kind=i.kind, version=i.version)


def call_time_ns(call: model_call_pb2.ModelCall, received_ns: int) -> int:
    """When a call happened, for queries: its end (start + duration), else its start, else its receive time."""
    if not call.start_time_unix_nano:
        return received_ns
    end = call.start_time_unix_nano + (call.duration_ns if call.HasField("duration_ns") else 0)
    return min(end, _MAX_I64)


def call_row(call: model_call_pb2.ModelCall, batch_agent_id: str, received_ns: int) -> CallRow:
    """A call (agent_id filled from the batch when empty) -> the row the store keeps."""
    if not call.agent_id:
        filled = model_call_pb2.ModelCall()
        filled.CopyFrom(call)
        filled.agent_id = batch_agent_id
        call = filled
    return CallRow(
        time_ns=call_time_ns(call, received_ns),
        agent_id=call.agent_id,
        source=_ident(call.source),
        destination=_ident(call.destination),
        actual_destination=_ident(call.actual_destination),
        request_model=call.request_model,
        response_model=call.response_model,
        status=call.status,
        payload=call.SerializeToString(deterministic=True),
    )


def call_filter(q: collector_pb2.CallQuery) -> CallFilter:
    return CallFilter(
        source=Ident(name=q.source.name, kind=q.source.kind, version=q.source.version),
        destination=Ident(name=q.destination.name, kind=q.destination.kind, version=q.destination.version),
        model=q.model,
        statuses=tuple((r.min, r.max) for r in q.statuses),
        since_ns=min(q.since_unix_nano, _MAX_I64),
        until_ns=min(q.until_unix_nano, _MAX_I64),
        agent_id=q.agent_id,
    )


def text_problem(name: str, value: str, limit: int, *, printable: bool = True) -> str | None:
    """A text field too long, or (printable) with control characters; None when fine. Pure."""
    if len(value) > limit:
        return f"{name} is {len(value)} characters, at most {limit}"
    if printable and not value.isprintable():
        return f"{name} contains control characters"
    return None



def origin_problems(msg, identities: tuple[str, ...]) -> list[str | None]:
    """The checks a flow record and a model call share: node, comm and each identity's name, kind and version."""
    checks = [text_problem("node", msg.node, MAX_NAME), text_problem("comm", msg.comm, MAX_COMM, printable=False)]
    for ident in identities:
        sub = getattr(msg, ident)
        checks += [text_problem(f"{ident}.{f}", getattr(sub, f), MAX_NAME) for f in ("name", "kind", "version")]
    return checks


def call_problem(call: model_call_pb2.ModelCall, now_ns: int) -> str | None:
    """What is wrong with one call ("field: why"), or None. Pure."""
    checks = origin_problems(call, _IDENTITIES)
    checks += [text_problem(name, getattr(call, name), MAX_NAME) for name in _OPTIONAL_TEXT]
    checks += [text_problem(name, getattr(call, name), MAX_TEXT, printable=False)
               for name in ("prompt_text", "completion_text")]  # fmt: skip
    checks.append(text_problem("reason", call.reason, MAX_REASON))
    if call.HasField("decision") and call.decision not in DECISIONS:
        checks.append(f"decision {call.decision[:32]!r} is not one of served, refused, would_deny")
    if len(call.finish_reasons) > MAX_FINISH_REASONS:
        checks.append(f"finish_reasons has {len(call.finish_reasons)} entries, at most {MAX_FINISH_REASONS}")
    checks += [text_problem(f"finish_reasons[{i}]", r, MAX_FINISH_REASON) for i, r in enumerate(call.finish_reasons)]
    for problem in checks:
        if problem is not None:
            return problem
    size = call.ByteSize()
    if size > MAX_CALL_BYTES:
        return f"(call) is {size} bytes, at most {MAX_CALL_BYTES} (unknown fields included)"
    for name, values in _ENUMS.items():
        if getattr(call, name) not in values:
            return f"{name} {getattr(call, name)} is not a known value"
    if call.HasField("status") and not 100 <= call.status <= 599:
        return f"status {call.status} is not an HTTP status (100-599)"
    if call.request_digest and not _DIGEST.fullmatch(call.request_digest):
        return "request_digest is not a sha256 digest (64 lower-case hex digits)"
    for name in _COUNTS:
        if getattr(call, name) > _MAX_I64:
            return f"{name} is out of range (at most 2^63-1)"
    for name in ("confidence_mean", "confidence_min"):
        if call.HasField(name) and not 0.0 <= getattr(call, name) <= 1.0:  # NaN fails too
            return f"{name} {getattr(call, name)} is not a probability (0-1)"
    if call.HasField("temperature") and not (math.isfinite(call.temperature)
                                             and 0.0 <= call.temperature <= MAX_TEMPERATURE):  # fmt: skip
        return f"temperature {call.temperature} is out of range (0-{MAX_TEMPERATURE:g})"
    if call.pid > MAX_PID:
        return f"pid {call.pid} is above {MAX_PID}"
    t = call.start_time_unix_nano
    if t > _MAX_I64:
        return "start_time_unix_nano is out of range"
    if t and t < MIN_TIME_NS:
        return f"start_time_unix_nano {t} is before 2000-01-01"
    if t > now_ns + MAX_FUTURE_NS:
        return "start_time_unix_nano is more than 7 days after the collector's clock"
    return None
