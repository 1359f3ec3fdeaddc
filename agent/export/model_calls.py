"""The wire side of model calls: ModelCallRecord (agent/l7/record.py) <-> aimesh.v1.ModelCall, pure functions.

The record knows the call; the capture knows where it happened. to_proto takes both: the identities (as dialed and
as reached), the process, the socket cookie (when the record's conn_key is not the cookie itself) and the offset
from the kernel's monotonic clock (the record's start_ns) to Unix time. from_proto gives both back.

Every `X | None` of the record is a proto3 `optional` field: unset means unknown, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from agent._gen.aimesh.v1 import model_call_pb2
from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

_NO_IDENTITY = IdentityData()
_IDENTITY_FIELDS = tuple(f.name for f in fields(IdentityData))   # aimesh.v1.Identity has the same names
# Record fields copied as they are; None leaves the optional field unset.
_OPTIONAL = ("request_model", "response_model", "status", "error_type", "input_tokens", "output_tokens",
             "cached_tokens", "time_to_first_chunk_ns", "duration_ns", "time_per_output_chunk_ns", "confidence_mean",
             "confidence_min", "max_tokens", "temperature", "include_usage", "prompt_text", "completion_text", "policy", "sent_model",
             "decision", "reason", "choice_count", "response_id")  # fmt: skip
_PLAIN = ("stream", "output_chunks", "request_bytes", "response_bytes", "tls", "truncated", "incomplete",
          "request_digest", "gateway")  # fmt: skip


@dataclass(frozen=True, slots=True)
class CallContext:
    """Where a call happened: what ModelCall carries beyond the record."""

    source: IdentityData = _NO_IDENTITY
    destination: IdentityData = _NO_IDENTITY         # as dialed
    actual_destination: IdentityData = _NO_IDENTITY  # as reached
    cookie: int = 0
    pid: int = 0
    comm: str = ""
    agent_id: str = ""
    node: str = ""


def _identity(ident: IdentityData, out: object) -> None:
    if ident == _NO_IDENTITY:
        return  # unset rather than an empty message
    for name in _IDENTITY_FIELDS:
        setattr(out, name, getattr(ident, name))


def _protocol(p: Protocol) -> int:
    return model_call_pb2.LlmProtocol.Value(f"LLM_PROTOCOL_{p.name}")


def _operation(o: Operation) -> int:
    return model_call_pb2.LlmOperation.Value(f"LLM_OPERATION_{o.name}")


def to_proto(
    rec: ModelCallRecord,
    source: IdentityData,
    destination: IdentityData,
    actual: IdentityData | None = None,
    *,
    cookie: int | None = None,
    pid: int = 0,
    comm: str = "",
    agent_id: str = "",
    node: str = "",
    mono_to_wall_ns: int = 0,
) -> model_call_pb2.ModelCall:
    """ModelCallRecord + where it happened -> aimesh.v1.ModelCall. cookie defaults to rec.conn_key when that is an
    int; actual defaults to destination. Raises ValueError naming the field whose value does not fit."""
    if cookie is None:
        if not isinstance(rec.conn_key, int):
            raise ValueError(f"ModelCallRecord.conn_key={rec.conn_key!r} is not a socket cookie: pass cookie=")
        cookie = rec.conn_key
    msg = model_call_pb2.ModelCall()
    values: list[tuple[str, object]] = [
        ("agent_id", agent_id), ("node", node), ("cookie", cookie), ("sequence", rec.sequence),
        ("start_time_unix_nano", rec.start_ns + mono_to_wall_ns if rec.start_ns else 0), ("pid", pid),
        ("comm", comm), ("protocol", _protocol(rec.protocol)), ("operation", _operation(rec.operation)),
    ]  # fmt: skip
    values += [(name, getattr(rec, name)) for name in _PLAIN]
    values += [(name, getattr(rec, name)) for name in _OPTIONAL if getattr(rec, name) is not None]
    for name, value in values:
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ModelCall.{name}={value!r}: {e}") from None
    msg.finish_reasons.extend(rec.finish_reasons)
    _identity(source, msg.source)
    _identity(destination, msg.destination)
    _identity(actual if actual is not None else destination, msg.actual_destination)
    return msg


def _identity_of(ident: object) -> IdentityData:
    return IdentityData(**{name: getattr(ident, name) for name in _IDENTITY_FIELDS})


def from_proto(msg: model_call_pb2.ModelCall, mono_to_wall_ns: int = 0) -> tuple[ModelCallRecord, CallContext]:
    """aimesh.v1.ModelCall -> (ModelCallRecord, CallContext); the record's conn_key is the cookie. Raises ValueError
    for a protocol or operation this version does not know."""
    try:
        protocol = Protocol[model_call_pb2.LlmProtocol.Name(msg.protocol).removeprefix("LLM_PROTOCOL_")]
        operation = Operation[model_call_pb2.LlmOperation.Name(msg.operation).removeprefix("LLM_OPERATION_")]
    except (KeyError, ValueError):
        raise ValueError(f"ModelCall protocol {msg.protocol} / operation {msg.operation}: not known here") from None
    optional = {name: getattr(msg, name) if msg.HasField(name) else None for name in _OPTIONAL}
    rec = ModelCallRecord(
        conn_key=msg.cookie,
        sequence=msg.sequence,
        start_ns=msg.start_time_unix_nano - mono_to_wall_ns if msg.start_time_unix_nano else 0,
        protocol=protocol,
        operation=operation,
        finish_reasons=tuple(msg.finish_reasons),
        **{name: getattr(msg, name) for name in _PLAIN},
        **optional,  # type: ignore[arg-type]
    )
    ctx = CallContext(source=_identity_of(msg.source), destination=_identity_of(msg.destination),
                      actual_destination=_identity_of(msg.actual_destination), cookie=msg.cookie, pid=msg.pid,
                      comm=msg.comm, agent_id=msg.agent_id, node=msg.node)  # fmt: skip
    return rec, ctx


__all__ = ["CallContext", "from_proto", "to_proto"]
