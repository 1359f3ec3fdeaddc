"""The gRPC side of the collector: aimesh.v1.FlowCollector and grpc.health.v1.Health over a FlowStore.

Handlers are built from the service descriptors (service_handler) rather than the generated add_*_to_server, so
that a request that does not parse reaches the servicer as Malformed: it is counted and answered INVALID_ARGUMENT
instead of gRPC's logged INTERNAL error. Stored records are streamed back as the bytes they were stored as.
"""

from __future__ import annotations

import hmac
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
from agent.collector.store import FlowFilter, FlowRow, FlowStore, Ident, StoreError

log = logging.getLogger(__name__)

FLOW_SERVICE = collector_pb2.DESCRIPTOR.services_by_name["FlowCollector"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
HEALTH_METHODS = frozenset(f"/{HEALTH_SERVICE.full_name}/{m.name}" for m in HEALTH_SERVICE.methods)

MAX_AGENT_ID = 253
_MAX_I64 = (1 << 63) - 1
# Trailing metadata of a RESOURCE_EXHAUSTED answer to an oversized batch: the limits, so an agent can split.
MD_MAX_RECORDS = "aimesh-max-records"
MD_MAX_BYTES = "aimesh-max-bytes"

Serving = health_pb2.HealthCheckResponse.ServingStatus


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_batch_records: int = 10_000
    max_batch_bytes: int = 8 << 20
    max_followers: int = 8  # concurrent Follow streams; each holds a server thread
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
    """When a record happened: its end, else its start, else when the collector got it."""
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
        payload=rec.SerializeToString(),
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


def validate_batch(batch: collector_pb2.FlowBatch, limits: ServiceLimits) -> Rejection | None:
    """Why a batch cannot be stored, or None. Pure."""
    agent_id = batch.agent_id
    if not agent_id.strip():
        return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", "agent_id is required")
    if len(agent_id) > MAX_AGENT_ID:
        return Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid",
            f"agent_id is {len(agent_id)} characters, at most {MAX_AGENT_ID}",
        )
    limits_md = ((MD_MAX_RECORDS, str(limits.max_batch_records)), (MD_MAX_BYTES, str(limits.max_batch_bytes)))
    n = len(batch.records)
    if n > limits.max_batch_records:
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large",
            f"batch has {n} records, the limit is {limits.max_batch_records} per batch",
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
    for i, rec in enumerate(batch.records):
        for name in ("start_time_unix_nano", "end_time_unix_nano"):
            if getattr(rec, name) > _MAX_I64:
                return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "invalid", f"records[{i}].{name} is out of range")
        if rec.end_time_unix_nano and rec.end_time_unix_nano < rec.start_time_unix_nano:
            return Rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid",
                f"records[{i}]: end_time_unix_nano is before start_time_unix_nano",
            )
    return None


# --- metrics ------------------------------------------------------------------------------------------------------


class CollectorMetrics:
    """The collector's counters, registered in the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            "aimesh_collector_batches", "Batches pushed, by result (stored, duplicate)", ["result"], registry=registry
        )
        self.records = Counter("aimesh_collector_records", "Flow records stored", registry=registry)
        self.rejected = Counter(
            "aimesh_collector_rejected_requests",
            "Requests refused, by reason (unauthenticated, malformed, invalid, too_large, busy, store)",
            ["reason"],
            registry=registry,
        )
        self.retention_deleted = Counter(
            "aimesh_collector_retention_deleted_records", "Flow records deleted by retention", ["by"], registry=registry
        )
        for result in ("stored", "duplicate"):
            self.batches.labels(result)
        for reason in ("unauthenticated", "malformed", "invalid", "too_large", "busy", "store"):
            self.rejected.labels(reason)
        for by in ("age", "size"):
            self.retention_deleted.labels(by)


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
    """Answer a request that did not parse (already counted by the deserializer)."""
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
        self._followers = threading.BoundedSemaphore(max(limits.max_followers, 0) or 1)
        self._no_followers = limits.max_followers <= 0

    def close(self) -> None:
        """End every Follow stream (the server is shutting down)."""
        self._notifier.close()

    def Push(  # noqa: N802 - gRPC method names
        self, request: collector_pb2.FlowBatch | Malformed, context: grpc.ServicerContext
    ) -> collector_pb2.PushReply:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
        rejection = validate_batch(request, self._limits)
        if rejection is not None:
            _abort(context, self._metrics, rejection)
        received = self._clock_ns()
        rows = [flow_row(r, request.agent_id, received) for r in request.records]
        try:
            result = self._store.insert_batch(request.agent_id, request.sequence, rows, received)
        except Exception as e:  # sqlite3.Error (disk full, locked), StoreError (closing): the agent retries
            log.warning("cannot store batch %s/%d: %s", request.agent_id, request.sequence, e)
            _abort(
                context,
                self._metrics,
                Rejection(grpc.StatusCode.UNAVAILABLE, "store", f"flow store unavailable: {e}"),
            )
        if result.duplicate:
            self._metrics.batches.labels("duplicate").inc()
        else:
            self._metrics.batches.labels("stored").inc()
            self._metrics.records.inc(result.inserted)
            if result.last_id:
                self._notifier.publish(result.last_id)
        return collector_pb2.PushReply(accepted=result.inserted, duplicate=result.duplicate)

    def ListFlows(  # noqa: N802
        self, request: collector_pb2.FlowQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        flt = query_filter(request)
        try:
            for flow in self._store.iter_flows(flt, limit=request.limit):
                if not context.is_active():
                    return
                yield flow.payload
        except StoreError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"flow store unavailable: {e}")

    def Follow(  # noqa: N802
        self, request: collector_pb2.FlowQuery | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        if isinstance(request, Malformed):
            _reject_malformed(context, request)
            return
        if self._no_followers or not self._followers.acquire(blocking=False):
            why = (
                "following is disabled on this collector (max_followers 0)"
                if self._no_followers
                else f"the collector already serves {self._limits.max_followers} follow streams; try again later"
            )
            _abort(context, self._metrics, Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", why))
        try:
            yield from self._follow(request, context)
        except StoreError as e:
            if not self._notifier.closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"flow store unavailable: {e}")
        finally:
            self._followers.release()

    def _follow(self, request: collector_pb2.FlowQuery, context: grpc.ServicerContext) -> Iterator[bytes]:
        cancelled = threading.Event()

        def on_done() -> None:
            cancelled.set()
            self._notifier.wake()

        context.add_callback(on_done)
        flt = query_filter(request)
        cursor = self._store.last_id()
        if request.limit or request.since_unix_nano:  # a backlog, as ListFlows would send it
            for flow in self._store.iter_flows(flt, limit=request.limit):
                if flow.id <= cursor:  # newer rows come below, in arrival order
                    yield flow.payload
        while not cancelled.is_set() and not self._notifier.closed and context.is_active():
            flows, cursor_next = self._store.flows_after(flt, cursor)
            for flow in flows:
                yield flow.payload
            cursor = cursor_next
            if not flows:
                self._notifier.wait_beyond(cursor, self._limits.follow_wait_s, cancelled)


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


# --- handlers and authentication ----------------------------------------------------------------------------------


def _deserializer(cls: type[Message], on_malformed: Callable[[], None]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            on_malformed()
            return Malformed(message_type=name, error=str(e) or "cannot parse")

    return parse


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def service_handler(
    service: ServiceDescriptor, servicer: object, on_malformed: Callable[[], None]
) -> grpc.GenericRpcHandler:
    """Method handlers for every method of `service`, implemented by servicer's methods of the same names."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        parse = _deserializer(message_factory.GetMessageClass(method.input_type), on_malformed)
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(impl, request_deserializer=parse, response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def unary(request: object, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    def stream(request: object, context: grpc.ServicerContext) -> Iterator[None]:
        context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    if handler.request_streaming:
        raise ValueError("client streaming is not supported")
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but the exempt ones (health checks)."""

    def __init__(self, token: str, metrics: CollectorMetrics, exempt: frozenset[str] = HEALTH_METHODS) -> None:
        if not token:
            raise ValueError("empty token")
        self._token = token.encode()
        self._metrics = metrics
        self._exempt = exempt

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        given = bearer_token(handler_call_details.invocation_metadata or ())
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            return handler
        self._metrics.rejected.labels("unauthenticated").inc()
        why = "missing bearer token" if given is None else "invalid bearer token"
        message = f"{why} (metadata authorization: Bearer <token>)"
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)
