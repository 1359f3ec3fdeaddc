"""The collector process: a grpc.server (plaintext, TLS or mutual TLS) over a FlowStore, with retention.

    serve("127.0.0.1:4790", Path("/var/lib/aimesh/flows.db"))   # blocks until SIGTERM/SIGINT

CollectorServer is the same thing as an object (start/stop), for tests and for embedding. It authenticates with
what its config names (token, agent_tokens, client_ca) and nothing else; the secure default (a token file created
beside the database when no authentication is chosen) is resolve_auth's, which serve() and `aimesh collector` use.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import HTTPServer
from pathlib import Path
from types import FrameType

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from agent.collector.auth import Authenticator, load_or_create_token, read_agent_tokens
from agent.collector.channel import ConfigError, HostPort, parse_hostport, read_file, read_token
from agent.collector.service import (
    FLOW_SERVICE,
    HEALTH_SERVICE,
    CallGuard,
    CollectorMetrics,
    FlowCollectorService,
    HealthService,
    Serving,
    ServiceLimits,
    StoreSizeCollector,
    service_handler,
)
from agent.collector.store import FlowStore, RetentionPolicy, StoreError

log = logging.getLogger(__name__)


class ServerError(Exception):
    """The collector cannot start: the address cannot be bound, the database cannot be opened, ..."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    """Server certificate and key (PEM). client_ca: require client certificates signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        cert = read_file(self.cert, "TLS certificate")
        key = read_file(self.key, "TLS key")
        ca = read_file(self.client_ca, "client CA bundle") if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    listen: str
    db: Path
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    retention_interval_s: float = 60.0
    tls: ServerTls | None = None
    token: str | None = None  # shared bearer token: push (any agent_id), list, follow
    agent_tokens: Mapping[str, str] = field(default_factory=dict)  # token -> the one agent_id it may push for
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    max_workers: int = 16
    grace_s: float = 5.0  # in-flight calls get this long at shutdown

    def validate(self) -> None:
        parse_hostport(self.listen, what="listen address")
        if self.max_workers < 2:
            raise ConfigError("max_workers must be at least 2")
        if self.limits.max_followers > self.max_workers - 2:
            raise ConfigError(
                f"max_followers ({self.limits.max_followers}) must leave at least 2 of the {self.max_workers} workers"
                " for pushes"
            )
        if not 0 <= self.limits.max_streams <= self.max_workers // 2:
            raise ConfigError(
                f"max_streams ({self.limits.max_streams}) must be from 0 to half the {self.max_workers} workers,"
                " so that streams never hold the threads pushes need"
            )
        if self.limits.max_batch_records < 1 or self.limits.max_batch_bytes < 1024:
            raise ConfigError("max_batch_records must be >= 1 and max_batch_bytes >= 1024")
        if self.retention_interval_s <= 0:
            raise ConfigError("retention_interval_s must be positive")


def check_bindable(addr: HostPort) -> None:
    """Raise ServerError if addr cannot be bound (in use, not local). gRPC would only log its own multi-line error."""
    if addr.port == 0:
        return
    try:
        infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServerError(f"cannot listen on {addr}: {e.strerror}") from None
    for family, type_, proto, _, sockaddr in infos:
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a TIME_WAIT port is fine
            try:
                s.bind(sockaddr)
            except OSError as e:
                raise ServerError(f"cannot listen on {addr}: {e.strerror or e}") from None


def transport_limit(limits: ServiceLimits) -> int:
    """Largest message gRPC accepts. Twice the batch limit, so that a batch somewhat over it reaches the servicer
    and gets a counted, explained RESOURCE_EXHAUSTED; gRPC itself cuts anything beyond before parsing it."""
    return min(2 * limits.max_batch_bytes + (1 << 20), (1 << 31) - 1)


def server_options(limits: ServiceLimits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", transport_limit(limits)),
        ("grpc.so_reuseport", 0),  # a second collector on the same port must fail, not share it
        ("grpc.keepalive_time_ms", 60_000),  # find dead Follow clients
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


class CollectorServer:
    """The store, the services, the gRPC server and the retention thread, started and stopped together."""

    def __init__(self, config: CollectorConfig, registry: CollectorRegistry | None = None) -> None:
        config.validate()
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = CollectorMetrics(self.registry)
        self._store: FlowStore | None = None
        self._server: grpc.Server | None = None
        self._service: FlowCollectorService | None = None
        self._health: HealthService | None = None
        self._stop_retention = threading.Event()
        self._retention: threading.Thread | None = None
        self._passes = 0                            # background retention passes finished (counted, then notified)
        self._passes_done = threading.Condition()
        self._address: HostPort | None = None
        self._size_collector: StoreSizeCollector | None = None

    @property
    def address(self) -> HostPort:
        """The address bound (with the real port when the config asked for port 0)."""
        if self._address is None:
            raise RuntimeError("the collector is not started")
        return self._address

    @property
    def store(self) -> FlowStore:
        if self._store is None:
            raise RuntimeError("the collector is not started")
        return self._store

    def start(self) -> HostPort:
        cfg = self.config
        want = parse_hostport(cfg.listen, what="listen address")
        creds = cfg.tls.credentials() if cfg.tls else None  # read the files before opening anything
        try:
            store = FlowStore(cfg.db)
        except StoreError as e:
            raise ServerError(str(e)) from e
        try:
            auth = Authenticator(token=cfg.token, agent_tokens=cfg.agent_tokens,
                                 mtls=cfg.tls is not None and cfg.tls.client_ca is not None)  # fmt: skip
            if not auth.enabled:
                log.warning("authentication is disabled: anyone who can reach %s can list flows and push records",
                            cfg.listen)  # fmt: skip
            guard = CallGuard(auth, self.metrics, cfg.limits.max_streams)
            service = FlowCollectorService(store, self.metrics, cfg.limits)
            health = HealthService()
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="collector"),
                handlers=[
                    service_handler(FLOW_SERVICE, service, guard),
                    service_handler(HEALTH_SERVICE, health, guard),
                ],
                options=server_options(cfg.limits),
                maximum_concurrent_rpcs=cfg.max_workers * 4,
            )
            port = self._bind(server, str(want), creds)
        except BaseException:
            store.close()
            raise
        server.start()
        for name in ("", FLOW_SERVICE.full_name):
            health.set(name, Serving.SERVING)
        self._store, self._service, self._health, self._server = store, service, health, server
        self._address = HostPort(host=want.host, port=port)
        self._size_collector = StoreSizeCollector(store)
        self.registry.register(self._size_collector)
        self._stop_retention.clear()
        self._retention = threading.Thread(target=self._retention_loop, name="collector-retention", daemon=True)
        self._retention.start()
        log.info("collector listening on %s (%s), database %s", self._address, "TLS" if creds else "plaintext", cfg.db)
        return self._address

    @staticmethod
    def _bind(server: grpc.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
        check_bindable(parse_hostport(address))
        try:
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError as e:
            raise ServerError(f"cannot listen on {address}: {e}") from None
        if port == 0:
            raise ServerError(f"cannot listen on {address} (in use, or not a local address)")
        return port

    def run_retention(self) -> None:
        """One retention pass (the background thread runs one every retention_interval_s)."""
        result = self.store.enforce_retention(self.config.retention)
        if result.deleted_by_age:
            self.metrics.retention_deleted.labels("age").inc(result.deleted_by_age)
        if result.deleted_by_size:
            self.metrics.retention_deleted.labels("size").inc(result.deleted_by_size)
        if result.calls_deleted_by_age:
            self.metrics.calls_retention_deleted.labels("age").inc(result.calls_deleted_by_age)
        if result.calls_deleted_by_size:
            self.metrics.calls_retention_deleted.labels("size").inc(result.calls_deleted_by_size)
        if result.deleted_by_age or result.deleted_by_size:
            log.info("retention deleted %d flows by age, %d by size", result.deleted_by_age, result.deleted_by_size)
        if result.calls_deleted_by_age or result.calls_deleted_by_size:
            log.info("retention deleted %d model calls by age, %d by size", result.calls_deleted_by_age,
                     result.calls_deleted_by_size)  # fmt: skip

    def _retention_loop(self) -> None:
        while not self._stop_retention.wait(self.config.retention_interval_s):
            try:
                self.run_retention()
            except Exception as e:  # noqa: BLE001 - keep serving; try again next interval
                log.warning("retention failed: %s", e)
            with self._passes_done:
                self._passes += 1
                self._passes_done.notify_all()

    def wait_retention_passes(self, n: int, timeout: float) -> bool:
        """Wait until the background thread has finished n more retention passes (deletions and their metrics) than
        when called; the second of them began after the call. False when that took longer than timeout."""
        with self._passes_done:
            target = self._passes + n
            return self._passes_done.wait_for(lambda: self._passes >= target, timeout)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, end Follow streams, let in-flight pushes finish (up to grace), close the database."""
        server, service, health, store = self._server, self._service, self._health, self._store
        if server is None:
            return
        self._server = None
        if health is not None:
            health.close()
        if service is not None:
            service.close()
        server.stop(self.config.grace_s if grace is None else grace).wait()
        self._stop_retention.set()
        if self._retention is not None:
            self._retention.join()
            self._retention = None
        if self._size_collector is not None:
            self.registry.unregister(self._size_collector)
            self._size_collector = None
        if store is not None:
            store.close()
        self._store = self._service = self._health = None

    def __enter__(self) -> CollectorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM/SIGINT while inside; the previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("serve() installs signal handlers: call it from the main thread or pass stop=")

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass(frozen=True, slots=True)
class ServerAuth:
    token: str | None
    agent_tokens: Mapping[str, str]
    summary: str  # for the log line: how callers authenticate
    created: Path | None = None  # a token file created by resolve_auth (serve logs it once started)


def default_token_file(db: Path) -> Path:
    return Path(str(db) + ".token")


def resolve_auth(
    *,
    db: Path,
    token: str | None = None,
    token_file: Path | None = None,
    agent_tokens_file: Path | None = None,
    mtls: bool = False,
    no_auth: bool = False,
) -> ServerAuth:
    """The collector's authentication from its options. Secure by default: with neither a token nor client
    certificates (mtls), the token file <db>.token is read, or created (0600, a random token) and logged; agent
    tokens alone do not disable it (operators need the shared token to list). token_file is created the same way
    when missing. no_auth turns authentication off (logged as a warning); it cannot be combined with the others."""
    chosen = [name for name, v in (("--token", token), ("--token-file", token_file),
                                   ("--agent-tokens", agent_tokens_file), ("--tls-ca", mtls)) if v]  # fmt: skip
    if no_auth:
        if chosen:
            raise ConfigError(f"--no-auth cannot be combined with {', '.join(chosen)}")
        log.warning("--no-auth: the collector accepts any caller: anyone who can reach it lists flows and pushes"
                    " records for any agent_id")  # fmt: skip
        return ServerAuth(None, {}, "no authentication")
    if token is not None and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    agents = read_agent_tokens(agent_tokens_file) if agent_tokens_file is not None else {}
    parts: list[str] = []
    created: Path | None = None
    if token is not None:
        token = read_token(token, None)
        parts.append("bearer token")
    if token is None and token_file is None and not mtls:
        token_file = default_token_file(db)
    if token_file is not None:
        token, made = load_or_create_token(token_file)
        created = token_file if made else None
        parts.append(f"bearer token from {token_file}")
    if agents:
        parts.append(f"{len(agents)} agent tokens")
    if mtls:
        parts.append("client certificates")
    return ServerAuth(token, agents, ", ".join(parts), created)


def serve(
    listen: str,
    db: Path,
    *,
    retention: RetentionPolicy | None = None,
    tls: ServerTls | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    agent_tokens_file: Path | None = None,
    no_auth: bool = False,
    limits: ServiceLimits | None = None,
    max_workers: int = 16,
    metrics_listen: str | None = None,
    registry: CollectorRegistry | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[HostPort], None] | None = None,
    on_auth: Callable[[str], None] | None = None,
) -> None:
    """Run the collector until SIGTERM/SIGINT (or until `stop` is set, if given), then shut down cleanly.

    Authentication as resolve_auth decides (by default a token file beside the database).
    metrics_listen: also serve Prometheus metrics over HTTP on this HOST:PORT.
    Raises ServerError / ConfigError when it cannot start.
    """
    auth = resolve_auth(db=db, token=token, token_file=token_file, agent_tokens_file=agent_tokens_file,
                        mtls=tls is not None and tls.client_ca is not None, no_auth=no_auth)  # fmt: skip
    config = CollectorConfig(
        listen=listen,
        db=db,
        retention=retention or RetentionPolicy(),
        tls=tls,
        token=auth.token,
        agent_tokens=auth.agent_tokens,
        limits=limits or ServiceLimits(),
        max_workers=max_workers,
    )
    if on_auth is not None:
        on_auth(auth.summary)
    metrics_addr = parse_hostport(metrics_listen, what="metrics address") if metrics_listen else None
    collector = CollectorServer(config, registry)
    done = stop if stop is not None else threading.Event()
    signals = _stop_on_signals(done) if stop is None else _no_signals()
    with signals:
        address = collector.start()
        if auth.created is not None:
            log.info("created token file %s (mode 0600): give it to agents (collector.token_file) and to"
                     " `aimesh flows --token-file`", auth.created)  # fmt: skip
        http = None
        try:
            if metrics_addr is not None:
                http = _start_metrics(metrics_addr, collector.registry)
                bound = HostPort(metrics_addr.host, int(http.server_address[1]))
                log.info("metrics on http://%s/metrics", bound)
            if on_ready is not None:
                on_ready(address)
            while not done.wait(0.5):  # a short wait keeps the signal handler responsive
                pass
        finally:
            if http is not None:
                http.shutdown()
                http.server_close()
            collector.stop()
            log.info("collector stopped")


@contextmanager
def _no_signals() -> Iterator[None]:
    yield


def _start_metrics(addr: HostPort, registry: CollectorRegistry) -> HTTPServer:
    try:
        server, _thread = start_http_server(addr.port, addr=addr.host, registry=registry)
    except OSError as e:
        raise ServerError(f"cannot serve metrics on {addr}: {e.strerror or e}") from None
    return server
