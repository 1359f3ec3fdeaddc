"""The gRPC side of the collector: aimesh.v1.FlowCollector and grpc.health.v1.Health over a FlowStore.

Flows (Push, ListFlows, Follow) and model calls (PushCalls, ListCalls, FollowCalls; their mapping and checks in
agent/collector/calls.py) follow the same rules: one guard, exactly-once batches, per-field validation.

Handlers are built from the service descriptors (service_handler) rather than the generated add_*_to_server, so
that every call goes through one CallGuard first: authentication and authorization (agent/collector/auth.py), a
request that does not parse answered INVALID_ARGUMENT (instead of gRPC's logged INTERNAL error), and a cap on
concurrent server streams (Follow, ListFlows, Health/Watch) so that streams can never take every worker thread
from Push. Stored records are streamed back as the bytes they were stored as.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent._gen.aimesh.v1 import collector_pb2, flow_pb2
from agent._gen.grpc.health.v1 import health_pb2
from agent.collector.auth import Authenticator, Denial, Principal
from agent.collector.auth import bearer_token as bearer_token  # re-exported: it used to live here
from agent.collector.calls import MAX_COMM, MAX_NAME, call_filter, call_problem, call_row, origin_problems  # noqa: F401 (re-exported)
from agent.collector.store import (CallFilter, FlowFilter, FlowRow, FlowStore, Ident, InsertResult, StoreError,
                                   StoredFlow)

log = logging.getLogger(__name__)

FLOW_SERVICE = collector_pb2.DESCRIPTOR.services_by_name["FlowCollector"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
# Per-field limits of a stored record; a batch with one record over a limit is refused, naming record and field.
MAX_AGENT_ID = 253
MAX_ADDRESS = 45  # the longest textual IPv6 address
MAX_PORT = 65535
MAX_PID = 1 << 22  # PID_MAX_LIMIT
MAX_PROTOCOL = 255  # IANA protocol numbers
MAX_RECORD_BYTES = 4096  # serialized, unknown fields included
MIN_TIME_NS = 946_684_800 * 10**9  # 2000-01-01: a non-zero time before that is a broken clock or a made-up value
MAX_FUTURE_NS = 7 * 86400 * 10**9  # how far past the collector's clock a record time may be
_MAX_I64 = (1 << 63) - 1
_ENUMS = {
    "kind": frozenset(flow_pb2.RecordKind.values()),
    "hook": frozenset(flow_pb2.Hook.values()),
    "verdict": frozenset(flow_pb2.Verdict.values()),
    "reason": frozenset(flow_pb2.Reason.values()),
}
_COUNTS = ("bytes_sent", "bytes_received", "packets_sent", "packets_received", "duration_ns", "count")
_PORTS = ("source_port", "destination_port", "dialed_port")
_ADDRESSES = ("source_address", "destination_address", "dialed_address")
_IDENTITIES = ("source", "destination", "actual_destination")
# Trailing metadata of a RESOURCE_EXHAUSTED answer to an oversized batch: the limits, so an agent can split.
from agent.collector.channel import MD_MAX_BYTES, MD_MAX_RECORDS  # noqa: E402  (shared with the exporter)

Serving = health_pb2.HealthCheckResponse.ServingStatus


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_batch_records: int = 10_000
    max_batch_bytes: int = 8 << 20
    max_followers: int = 8  # concurrent Follow streams (counted in max_streams too)
    max_streams: int = 8  # concurrent server streams of any method; each holds a server thread
    follow_wait_s: float = 1.0  # a follower re-checks for cancellation at least this often


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands for a request whose bytes did not parse as the method's message."""

    message_type: str
    error: str


@dataclass(frozen=True, slots=True)
class Rejection:
    code: grpc.StatusCode
    reason: str  # metrics label
    message: str
    trailing: tuple[tuple[str, str], ...] = ()


# --- pure mapping -------------------------------------------------------------------------------------------------


def _ident(i: flow_pb2.Identity) -> Ident:
    return Ident(name=i.name, kind=i.kind, version=i.version)


def record_time_ns(rec: flow_pb2.FlowRecord, received_ns: int) -> int:
    """When a record happened: its end, else its start, else when the collector got it. Used for queries only;
    retention goes by the receive time."""
    return rec.end_time_unix_nano or rec.start_time_unix_nano or received_ns


def flow_row(rec: flow_pb2.FlowRecord, batch_agent_id: str, received_ns: int) -> FlowRow:
    """A record (agent_id filled from the batch when empty) -> the row the store keeps."""
    if not rec.agent_id:
        filled = flow_pb2.FlowRecord()
        filled.CopyFrom(rec)
        filled.agent_id = batch_agent_id
        rec = filled
    return FlowRow(
        time_ns=record_time_ns(rec, received_ns),
        agent_id=rec.agent_id,
        verdict=int(rec.verdict),
        source=_ident(rec.source),
        destination=_ident(rec.destination),
        actual_destination=_ident(rec.actual_destination),
        payload=rec.SerializeToString(deterministic=True),
    )


def query_filter(q: collector_pb2.FlowQuery) -> FlowFilter:
    return FlowFilter(
        source=Ident(name=q.source.name, kind=q.source.kind, version=q.source.version),
        destination=Ident(name=q.destination.name, kind=q.destination.kind, version=q.destination.version),
        verdicts=frozenset(int(v) for v in q.verdicts if v != flow_pb2.VERDICT_UNSPECIFIED),
        since_ns=min(q.since_unix_nano, _MAX_I64),
        until_ns=min(q.until_unix_nano, _MAX_I64),
        agent_id=q.agent_id,
    )


def validate_batch(
    batch: collector_pb2.FlowBatch | collector_pb2.ModelCallBatch, limits: ServiceLimits, received_ns: int | None = None
) -> Rejection | None:
    """Why a batch (of flows or of model calls) cannot be stored, or None. Pure given received_ns (the collector's
    clock)."""
    agent_id = batch.agent_id
    if not agent_id.strip():
        return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", "agent_id is required")
    if len(agent_id) > MAX_AGENT_ID:
        return Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid",
            f"agent_id is {len(agent_id)} characters, at most {MAX_AGENT_ID}",
        )
    if not agent_id.isprintable():
        return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", "agent_id contains control characters")
    limits_md = ((MD_MAX_RECORDS, str(limits.max_batch_records)), (MD_MAX_BYTES, str(limits.max_batch_bytes)))
    is_calls = isinstance(batch, collector_pb2.ModelCallBatch)
    items = batch.calls if is_calls else batch.records
    what = "calls" if is_calls else "records"
    n = len(items)
    if n > limits.max_batch_records:
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large",
            f"batch has {n} {what}, the limit is {limits.max_batch_records} per batch",
            limits_md,
        )
    size = batch.ByteSize()
    if size > limits.max_batch_bytes:
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large",
            f"batch is {size} bytes, the limit is {limits.max_batch_bytes} bytes per batch",
            limits_md,
        )
    now = received_ns if received_ns is not None else time.time_ns()
    for i, rec in enumerate(items):
        if rec.agent_id and rec.agent_id != agent_id:
            return Rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                "agent_mismatch",
                f"{what}[{i}].agent_id {rec.agent_id[:64]!r} is not the batch's agent_id {agent_id!r}",
            )
        problem = call_problem(rec, now) if is_calls else record_problem(rec, now)
        if problem is not None:
            return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", f"{what}[{i}].{problem}")
    return None


def record_problem(rec: flow_pb2.FlowRecord, now_ns: int) -> str | None:
    """What is wrong with one record ("field: why"), or None. Pure."""
    checks = origin_problems(rec, _IDENTITIES)
    for problem in checks:
        if problem is not None:
            return problem
    size = rec.ByteSize()  # after the named fields, so that an oversized one is named; this catches unknown fields
    if size > MAX_RECORD_BYTES:
        return f"(record) is {size} bytes, at most {MAX_RECORD_BYTES} (unknown fields included)"
    for name, values in _ENUMS.items():
        if getattr(rec, name) not in values:
            return f"{name} {getattr(rec, name)} is not a known value"
    if rec.protocol > MAX_PROTOCOL:
        return f"protocol {rec.protocol} is not an IP protocol number (0-{MAX_PROTOCOL})"
    for name in _PORTS:
        if getattr(rec, name) > MAX_PORT:
            return f"{name} {getattr(rec, name)} is not a port (0-{MAX_PORT})"
    for name in _ADDRESSES:
        text = getattr(rec, name)
        if not text:
            continue
        if len(text) > MAX_ADDRESS:
            return f"{name} is {len(text)} characters, at most {MAX_ADDRESS}"
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return f"{name} {text!r} is not an IPv4 or IPv6 address"
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            return f"{name} {text!r} has a zone"
    for name in _COUNTS:
        if getattr(rec, name) > _MAX_I64:
            return f"{name} is out of range (at most 2^63-1)"
    if rec.pid > MAX_PID:
        return f"pid {rec.pid} is above {MAX_PID}"
    for name in ("start_time_unix_nano", "end_time_unix_nano"):
        t = getattr(rec, name)
        if t > _MAX_I64:
            return f"{name} is out of range"
        if t and t < MIN_TIME_NS:
            return f"{name} {t} is before 2000-01-01"
        if t > now_ns + MAX_FUTURE_NS:
            return f"{name} is more than 7 days after the collector's clock"
    if rec.end_time_unix_nano and rec.end_time_unix_nano < rec.start_time_unix_nano:
        return "end_time_unix_nano is before start_time_unix_nano"
    return None


# --- metrics ------------------------------------------------------------------------------------------------------


REJECT_REASONS = (
    "unauthenticated", "forbidden", "malformed", "invalid", "agent_mismatch", "conflict", "too_large", "busy", "store",
)


class CollectorMetrics:
    """The collector's counters, registered in the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            "aimesh_collector_batches", "Batches pushed, by result (stored, duplicate)", ["result"], registry=registry
        )
        self.records = Counter("aimesh_collector_records", "Flow records stored", registry=registry)
        self.calls = Counter("aimesh_collector_model_calls", "Model calls stored", registry=registry)
        self.call_batches = Counter(
            "aimesh_collector_call_batches", "Model-call batches pushed, by result (stored, duplicate)", ["result"],
            registry=registry,
        )
        self.calls_retention_deleted = Counter(
            "aimesh_collector_retention_deleted_model_calls", "Model calls deleted by retention", ["by"],
            registry=registry,
        )
        self.rejected = Counter(
            "aimesh_collector_rejected_requests",
            "Requests refused, by reason (unauthenticated, forbidden, malformed, invalid, agent_mismatch, conflict,"
            " too_large, busy, store)",
            ["reason"],
            registry=registry,
        )
        self.retention_deleted = Counter(
            "aimesh_collector_retention_deleted_records", "Flow records deleted by retention", ["by"], registry=registry
        )
        for result in ("stored", "duplicate"):
            self.batches.labels(result)
            self.call_batches.labels(result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for by in ("age", "size"):
            self.retention_deleted.labels(by)
            self.calls_retention_deleted.labels(by)


class StoreSizeCollector(Collector):
    """Database size, read when scraped."""

    def __init__(self, store: FlowStore) -> None:
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self._store.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is closing
            return []
        data = GaugeMetricFamily("aimesh_collector_store_data_bytes", "Bytes of database pages in use")
        data.add_metric([], stats.data_bytes)
        files = GaugeMetricFamily("aimesh_collector_store_file_bytes", "Bytes of the database file and its WAL")
        files.add_metric([], stats.file_bytes)
        return [data, files]


# --- follow notification -----------------------------------------------------------------------------------------


class FlowNotifier:
    """Wakes Follow streams when rows are stored."""

    def __init__(self, last_id: int = 0) -> None:
        self._cond = threading.Condition()
        self._last_id = last_id
        self._closed = False

    def publish(self, last_id: int) -> None:
        with self._cond:
            self._last_id = max(self._last_id, last_id)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_beyond(self, cursor: int, timeout: float, cancelled: threading.Event) -> None:
        """Wait until a row with id > cursor is stored, the stream is cancelled, the notifier closes, or timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._last_id > cursor or self._closed or cancelled.is_set(), timeout)


# --- servicers ----------------------------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, metrics: CollectorMetrics, rejection: Rejection) -> NoReturn:
    metrics.rejected.labels(rejection.reason).inc()
    if rejection.trailing:
        context.set_trailing_metadata(rejection.trailing)
    context.abort(rejection.code, rejection.message)
    raise AssertionError("context.abort returned")  # it raises


def _reject_malformed(context: grpc.ServicerContext, request: Malformed) -> NoReturn:
    """Answer a request that did not parse (CallGuard counts it)."""
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request.message_type}: {request.error}")
    raise AssertionError("context.abort returned")  # it raises


class FlowCollectorService:
    """aimesh.v1.FlowCollector."""

    def __init__(
        self,
        store: FlowStore,
        metrics: CollectorMetrics,
        limits: ServiceLimits = ServiceLimits(),
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._limits = limits
        self._clock_ns = clock_ns
        self._notifier = FlowNotifier(store.last_id())
        self._call_notifier = FlowNotifier(store.last_call_id())
        self._followers = threading.BoundedSemaphore(max(limits.max_followers, 0) or 1)
        self._no_followers = limits.max_followers <= 0

    def close(self) -> None:
        """End every Follow and FollowCalls stream (the server is shutting down)."""
        self._notifier.close()
        self._call_notifier.close()

    def Push(  # noqa: N802 - gRPC method names
        self, request: collector_pb2.FlowBatch | Malformed, context: grpc.ServicerContext
    ) -> collector_pb2.PushReply:
        return self._push(request, context, lambda received: [flow_row(r, request.agent_id, received)
                                                               for r in request.records],
                          self._store.insert_batch, self._metrics.batches, self._metrics.records, self._notifier)

    def PushCalls(  # noqa: N802
        self, request: collector_pb2.ModelCallBatch | Malformed, context: grpc.ServicerContext
    ) -> collector_pb2.PushReply:
        return self._push(request, context, lambda received: [call_row(c, request.agent_id, received)
                                                               for c in request.calls],
                          self._store.insert_call_batch, self._metrics.call_batches, self._metrics.calls,
                          self._call_notifier)

    def _push(self, request, context: grpc.ServicerContext, rows_of: Callable[[int], list], insert_batch,
              batches, items, notifier) -> collector_pb2.PushReply:
        """One batch of flows or of model calls: validate, store once per (agent, sequence), count, wake followers."""
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
        received = self._clock_ns()
        rejection = validate_batch(request, self._limits, received)
        if rejection is not None:
            _abort(context, self._metrics, rejection)
        rows = rows_of(received)
        result = self._insert(context, request, lambda: insert_batch(request.agent_id, request.sequence, rows,
                                                                     received))
        if result.duplicate:
            batches.labels("duplicate").inc()
        else:
            batches.labels("stored").inc()
            items.inc(result.inserted)
            if result.last_id:
                notifier.publish(result.last_id)
        return collector_pb2.PushReply(accepted=result.inserted, duplicate=result.duplicate)

    def _insert(self, context: grpc.ServicerContext, request: collector_pb2.FlowBatch | collector_pb2.ModelCallBatch,
                insert: Callable[[], InsertResult]) -> InsertResult:  # fmt: skip
        """Run a store insert; answer UNAVAILABLE when the store fails, ALREADY_EXISTS on a conflict."""
        try:
            result = insert()
        except Exception as e:  # sqlite3.Error (disk full, locked), StoreError (closing): the agent retries
            log.warning("cannot store batch %s/%d: %s", request.agent_id, request.sequence, e)
            _abort(
                context,
                self._metrics,
                Rejection(grpc.StatusCode.UNAVAILABLE, "store", f"flow store unavailable: {e}"),
            )
        if result.conflict:
            _abort(
                context,
                self._metrics,
                Rejection(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "conflict",
                    f"batch {request.agent_id}/{request.sequence} was stored before with different records;"
                    " nothing stored (a retry must resend the same records; new records need a new sequence)",
                ),
            )
        return result

    def ListFlows(  # noqa: N802
        self, request: collector_pb2.FlowQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        flt = query_filter(request)
        yield from self._list(context, lambda: self._store.iter_flows(flt, limit=request.limit))

    def ListCalls(  # noqa: N802
        self, request: collector_pb2.CallQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        flt = call_filter(request)
        yield from self._list(context, lambda: self._store.iter_calls(flt, limit=request.limit))

    @staticmethod
    def _list(context: grpc.ServicerContext, rows: Callable[[], Iterator[StoredFlow]]) -> Iterator[bytes]:
        try:
            for row in rows():
                if not context.is_active():
                    return
                yield row.payload
        except StoreError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"flow store unavailable: {e}")

    def Follow(  # noqa: N802
        self, request: collector_pb2.FlowQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        yield from self._following(context, self._notifier, lambda: self._follow(request, context))

    def FollowCalls(  # noqa: N802
        self, request: collector_pb2.CallQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        yield from self._following(context, self._call_notifier, lambda: self._follow_calls(request, context))

    def _following(self, context: grpc.ServicerContext, notifier: FlowNotifier,
                   stream: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:  # fmt: skip
        """A follow stream within the follower cap (flows and calls share it)."""
        if self._no_followers or not self._followers.acquire(blocking=False):
            why = (
                "following is disabled on this collector (max_followers 0)"
                if self._no_followers
                else f"the collector already serves {self._limits.max_followers} follow streams; try again later"
            )
            _abort(context, self._metrics, Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", why))
        try:
            yield from stream()
        except StoreError as e:
            if not notifier.closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"flow store unavailable: {e}")
        finally:
            self._followers.release()

    def _follow(self, request: collector_pb2.FlowQuery, context: grpc.ServicerContext) -> Iterator[bytes]:
        flt = query_filter(request)
        backlog = bool(request.limit or request.since_unix_nano)
        yield from self._tail(context, self._notifier, self._store.last_id(),
                              (lambda: self._store.iter_flows(flt, limit=request.limit)) if backlog else None,
                              lambda cursor: self._store.flows_after(flt, cursor))  # fmt: skip

    def _follow_calls(self, request: collector_pb2.CallQuery, context: grpc.ServicerContext) -> Iterator[bytes]:
        flt: CallFilter = call_filter(request)
        backlog = bool(request.limit or request.since_unix_nano)
        yield from self._tail(context, self._call_notifier, self._store.last_call_id(),
                              (lambda: self._store.iter_calls(flt, limit=request.limit)) if backlog else None,
                              lambda cursor: self._store.calls_after(flt, cursor))  # fmt: skip

    def _tail(
        self,
        context: grpc.ServicerContext,
        notifier: FlowNotifier,
        cursor: int,
        backlog: Callable[[], Iterator[StoredFlow]] | None,
        after: Callable[[int], tuple[list[StoredFlow], int]],
    ) -> Iterator[bytes]:
        """The backlog (rows up to `cursor`, as a listing sends them), then new rows in arrival order."""
        cancelled = threading.Event()

        def on_done() -> None:
            cancelled.set()
            notifier.wake()

        context.add_callback(on_done)
        if backlog is not None:
            for row in backlog():
                if row.id <= cursor:  # newer rows come below, in arrival order
                    yield row.payload
        while not cancelled.is_set() and not notifier.closed and context.is_active():
            rows, cursor_next = after(cursor)
            for row in rows:
                yield row.payload
            cursor = cursor_next
            if not rows:
                notifier.wait_beyond(cursor, self._limits.follow_wait_s, cancelled)


class HealthService:
    """grpc.health.v1.Health: "" (the server) and each service name registered with set()."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._status: dict[str, int] = {}
        self._closed = False

    def set(self, service: str, status: int) -> None:
        with self._cond:
            self._status[service] = status
            self._cond.notify_all()

    def set_all(self, status: int) -> None:
        with self._cond:
            for name in self._status:
                self._status[name] = status
            self._cond.notify_all()

    def close(self) -> None:
        """NOT_SERVING everywhere and end Watch streams."""
        with self._cond:
            for name in self._status:
                self._status[name] = Serving.NOT_SERVING
            self._closed = True
            self._cond.notify_all()

    def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest | Malformed, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
        with self._cond:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest | Malformed, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        done = threading.Event()

        def on_done() -> None:
            done.set()
            with self._cond:
                self._cond.notify_all()

        context.add_callback(on_done)
        last: int | None = None
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: done.is_set()
                    or self._closed
                    or self._status.get(request.service, Serving.SERVICE_UNKNOWN) != last,
                    timeout=1.0,
                )
                status = self._status.get(request.service, Serving.SERVICE_UNKNOWN)
                closed = self._closed
            if done.is_set() or not context.is_active():
                return
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if closed:
                return


# --- handlers, authentication and the stream cap ------------------------------------------------------------------


class CallGuard:
    """Runs before every handler: who is calling (auth.Authenticator), a request that did not parse, whether the
    caller may do this (a push for its own agent_id), and a free stream slot for server-streaming methods.

    Streams past max_streams are answered RESOURCE_EXHAUSTED at once, so at most max_streams worker threads are
    ever held by streams and the rest stay free for Push."""

    def __init__(self, auth: Authenticator, metrics: CollectorMetrics, max_streams: int) -> None:
        self._auth = auth
        self._metrics = metrics
        self._max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max(max_streams, 1))

    def _deny(self, context: grpc.ServicerContext, denial: Denial) -> NoReturn:
        _abort(context, self._metrics, Rejection(denial.code, denial.reason, denial.message))

    def admit(self, method: str, request: object, context: grpc.ServicerContext) -> Principal:
        who = self._auth.authenticate(method, context.invocation_metadata() or (), context.peer() or "",
                                      context.auth_context() or {})  # fmt: skip
        if isinstance(who, Denial):
            self._deny(context, who)
        if isinstance(request, Malformed):
            self._metrics.rejected.labels("malformed").inc()
            _reject_malformed(context, request)
        pushed = isinstance(request, (collector_pb2.FlowBatch, collector_pb2.ModelCallBatch))
        agent_id = request.agent_id if pushed else None
        denial = self._auth.authorize(who, method, agent_id)
        if denial is not None:
            self._deny(context, denial)
        return who

    def take_stream(self, context: grpc.ServicerContext) -> None:
        if self._max_streams <= 0 or not self._streams.acquire(blocking=False):
            _abort(context, self._metrics, Rejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                f"the collector already serves {self._max_streams} streams (follow, list, health watch);"
                " try again later"))  # fmt: skip

    def release_stream(self) -> None:
        self._streams.release()


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:  # upb raises DecodeError; be safe with the others
            return Malformed(message_type=name, error=str(e) or "cannot parse")

    return parse


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _guarded_unary(guard: CallGuard, method: str, impl: Callable[..., Message]) -> Callable[..., Message]:
    def call(request: object, context: grpc.ServicerContext) -> Message:
        guard.admit(method, request, context)
        return impl(request, context)

    return call


def _guarded_stream(
    guard: CallGuard, method: str, impl: Callable[..., Iterator[object]]
) -> Callable[..., Iterator[object]]:
    def call(request: object, context: grpc.ServicerContext) -> Iterator[object]:
        guard.admit(method, request, context)
        guard.take_stream(context)
        try:
            yield from impl(request, context)
        finally:
            guard.release_stream()

    return call


def service_handler(
    service: ServiceDescriptor, servicer: object, guard: CallGuard | Callable[[], None]
) -> grpc.GenericRpcHandler:
    """Method handlers for every method of `service` that servicer implements (a method of the same name), each
    behind `guard`. A plain callable instead of a guard (the former on_malformed argument) gives an open guard:
    no authentication, no stream cap, for tests that serve a wrapped servicer."""
    if not isinstance(guard, CallGuard):
        guard = CallGuard(Authenticator(), CollectorMetrics(CollectorRegistry()), max_streams=1 << 16)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name, None)
        if impl is None:  # not implemented by this servicer (a test double): gRPC answers UNIMPLEMENTED
            continue
        full = f"/{service.full_name}/{method.name}"
        parse = _deserializer(message_factory.GetMessageClass(method.input_type))
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guarded_stream(guard, full, impl), request_deserializer=parse, response_serializer=_serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guarded_unary(guard, full, impl), request_deserializer=parse, response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
