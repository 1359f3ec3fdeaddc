"""The node's L7 gateway for model APIs: aiohttp server and client, streaming both ways.

Why aiohttp: one maintained library gives both ends on asyncio — a server whose HTTP/1.1 parser is llhttp (Node.js's
parser, in C; it refuses Content-Length together with Transfer-Encoding, obsolete line folding and bad chunk
framing, the usual smuggling vectors), keep-alive, header size caps, chunked streaming writes; and a client with
connection pools, TLS with `server_hostname`, and `auto_decompress=False` so response bytes pass through unchanged.

A connection is accepted by `_Acceptor`: the peer address is looked up in the `OriginLookup` (the kernel's record of
what the client dialed and who it is); no record -> the connection is closed (counted; logged once per peer IP).
For `tls: intercept` destinations the client's TLS is terminated here with a node-CA leaf for the SNI name (or the
dialed IP), then the connection is handed to aiohttp's `RequestHandler`. Each request: body read under a size cap
and a timeout, JSON parsed, `policy.decide`, budgets reserved, then forwarded to the dialed destination (or refused
in the SDK's error shape); the response is passed chunk by chunk while agent/l7/llm.py's `ResponseParse` reads its
usage, which settles the reservation. Every request becomes one record (agent/gateway/records.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import ssl
import time
import zlib
from urllib.parse import urlsplit
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from agent.gateway.budget import BudgetBook, Exceeded, Limits, Reservation
from agent.gateway.ca import NodeCA
from agent.gateway.limits import LimitError, apply_cap, token_limit
from agent.gateway.policy import (Decision, Destination, GatewayPolicy, Outcome, Refusal, TlsMode, budget_refusal,
                                  decide)
from agent.gateway.records import RecordSender
from agent.gateway.usage import UsageChunkStrip, estimate_tokens, want_stream_usage
from agent.l7.endpoints import BodyShape, Endpoint, Unclear, judged_model, parse_target, read_form_model, read_json
from agent.l7.llm import Operation, Protocol as LlmProtocol, ResponseParse

log = logging.getLogger("aimesh.gateway")

_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
                  "proxy-authorization", "proxy-authenticate", "content-length"})


@dataclass(frozen=True, slots=True)
class GatewayOrigin:
    """What the kernel recorded for a redirected connection: the address the client dialed and who is who."""
    address: str            # dialed IP (IPv4 dotted or IPv6)
    port: int
    source: str             # source identity name
    destination: str        # destination identity name
    tls: bool               # the dialed port is an HTTPS endpoint
    cookie: int = 0         # the client socket's cookie (joins the call to its flow record); 0: not known


class OriginLookup(Protocol):
    def lookup(self, peer_ip: str, peer_port: int) -> GatewayOrigin | None: ...


class StaticOrigins:
    """An in-process OriginLookup (tests, and `--origins-file`): exact (ip, port) entries are read once and
    removed, as the kernel's are; port 0 stands for any port of that IP and stays."""

    def __init__(self) -> None:
        self._by_peer: dict[tuple[str, int], GatewayOrigin] = {}

    def add(self, peer_ip: str, peer_port: int, origin: GatewayOrigin) -> None:
        self._by_peer[(peer_ip, peer_port)] = origin

    def lookup(self, peer_ip: str, peer_port: int) -> GatewayOrigin | None:
        o = self._by_peer.pop((peer_ip, peer_port), None)
        return o if o is not None else self._by_peer.get((peer_ip, 0))


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 15001
    max_body: int = 8 << 20           # request body cap (413 over it)
    max_line: int = 8190              # request line cap (llhttp: 400)
    max_field: int = 8190             # one header's cap
    max_headers: int = 100            # headers per request
    header_timeout_s: float = 10.0    # first byte of a request -> its head complete
    body_timeout_s: float = 30.0      # the whole request body
    upstream_connect_timeout_s: float = 10.0
    keepalive_s: float = 75.0
    tls_handshake_timeout_s: float = 10.0
    upstream_ca: str | None = None    # default roots upstream when a destination names none (tests); else system


@dataclass(slots=True)
class GatewayCounters:
    connections: int = 0
    no_origin: int = 0
    tls_failed: int = 0
    requests: int = 0
    served: int = 0
    refused: int = 0
    would_deny: int = 0
    upstream_errors: int = 0
    bad_requests: int = 0          # refused by the HTTP parser (smuggling, oversized heads, bad framing)


class _Conn(RequestHandler):
    """aiohttp's connection handler, carrying the origin, with a timer for a request head that comes too slowly."""

    def __init__(self, *a: Any, origin: GatewayOrigin, server_name: str | None, tls: bool, head_timeout: float,
                 on_error: Callable[["_Conn", web.BaseRequest, int, BaseException | None], web.Response],
                 **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.on_error = on_error
        self.origin = origin
        self.server_name = server_name
        self.client_tls = tls
        self._head_timeout = head_timeout
        self._timer: asyncio.TimerHandle | None = None
        self.in_request = False
        self._body_read = False
        self._next_head = False      # bytes of a pipelined next request arrived while this one was served

    def data_received(self, data: bytes) -> None:
        if self.in_request:
            self._next_head = self._next_head or self._body_read
        elif self._timer is None and self.transport is not None:
            self._start_timer()
        super().data_received(data)

    def _start_timer(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._head_timeout, self._too_slow)

    def request_started(self) -> None:
        self.in_request = True
        self._body_read = self._next_head = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def body_read(self) -> None:
        self._body_read = True

    def request_done(self) -> None:
        """A pipelined next head that arrived in its own segment during this request gets the head timer too; one that
        came in the same segment as this request is bounded by aiohttp's keep-alive timeout (idle handler)."""
        self.in_request = False
        if self._next_head and self._timer is None and self.transport is not None:
            self._start_timer()       # the next head must be complete in time too (its handler cancels this)

    def _too_slow(self) -> None:
        self._timer = None
        if not self.in_request and self.transport is not None:
            log.debug("closing a connection whose request head did not arrive in %.1fs", self._head_timeout)
            self.transport.abort()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's parser refused the request (or the handler failed): JSON in the SDK's shape, never plain text;
        the connection is closed after it, as aiohttp does."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        resp = self.on_error(self, request, status, exc)
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)


class _Pending(asyncio.Protocol):
    """Holds what arrives between the TLS handshake and the hand-over to aiohttp."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


class _Acceptor(asyncio.Protocol):
    def __init__(self, gw: "Gateway") -> None:
        self._gw = gw

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gw._accept(transport)

    def data_received(self, data: bytes) -> None:    # only before the hand-over, which happens in connection_made
        pass


class _TooLarge(Exception):
    pass


class Gateway:
    """`await gw.start()`, `gw.reload(policy)`, `await gw.close()`. `clock` gives Unix seconds."""

    def __init__(self, policy: GatewayPolicy, origins: OriginLookup, records: RecordSender, ca: NodeCA | None,
                 settings: GatewaySettings, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self._origins = origins
        self._records = records
        self._ca = ca
        self.settings = settings
        self._clock = clock
        self.budgets = BudgetBook(clock)
        self.counters = GatewayCounters()
        self._logged_peers: set[str] = set()
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[str | None, ssl.SSLContext] = {}
        self._keys: dict[str, tuple[float, str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.address: tuple[str, int] | None = None

    # -- life ------------------------------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._web = web.Server(self._handle, loop=loop)
        self._records.attach(loop)
        self._session = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.upstream_connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False))
        self._server = await loop.create_server(lambda: _Acceptor(self), self.settings.host, self.settings.port,
                                                backlog=1024, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    def reload(self, policy: GatewayPolicy) -> None:
        """New requests are judged by `policy`; requests in flight keep the decision they had."""
        self.policy = policy
        self._ssl.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            for h in list(self._web.connections):      # idle keep-alive connections: nothing to wait for
                if isinstance(h, _Conn) and not h.in_request and h.transport is not None:
                    h.transport.close()
            await self._web.shutdown(timeout=2.0)
        if self._session is not None:
            await self._session.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- accept ----------------------------------------------------------------------------------------------------
    def _accept(self, transport: asyncio.Transport) -> None:
        self.counters.connections += 1
        peer = transport.get_extra_info("peername")
        ip, port = _peer(peer)
        origin = self._origins.lookup(ip, port)
        if origin is None:
            self.counters.no_origin += 1
            if ip not in self._logged_peers and len(self._logged_peers) < 4096:
                self._logged_peers.add(ip)
                log.warning("connection from %s with no kernel record closed (identity comes only from the kernel)",
                            ip)
            transport.abort()
            return
        dest = self.policy.destinations.get(origin.destination)
        if origin.tls and dest is not None and dest.tls is TlsMode.INTERCEPT and self._ca is not None:
            t = asyncio.get_running_loop().create_task(self._intercept(transport, origin))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        else:
            self._hand(transport, origin, None, False, b"")

    def _hand(self, transport: asyncio.Transport, origin: GatewayOrigin, server_name: str | None, tls: bool,
              early: bytes) -> None:
        s = self.settings
        assert self._web is not None
        h = _Conn(self._web, loop=asyncio.get_running_loop(), origin=origin, server_name=server_name, tls=tls,
                  head_timeout=s.header_timeout_s, on_error=self._bad_request, keepalive_timeout=s.keepalive_s,
                  max_line_size=s.max_line, max_field_size=s.max_field, max_headers=s.max_headers,
                  lingering_time=0.5, access_log=None)     # no access log: each request is a record to the agent
        transport.set_protocol(h)
        h.connection_made(transport)
        if early:
            h.data_received(early)

    async def _intercept(self, transport: asyncio.Transport, origin: GatewayOrigin) -> None:
        assert self._ca is not None
        loop = asyncio.get_running_loop()
        pending = _Pending()
        try:
            ctx = self._ca.server_context(origin.address)
            tls = await loop.start_tls(transport, pending, ctx, server_side=True,
                                       ssl_handshake_timeout=self.settings.tls_handshake_timeout_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            self.counters.tls_failed += 1
            log.debug("TLS handshake from %s failed: %s", transport.get_extra_info("peername"), e)
            transport.abort()
            return
        if tls is None or pending.lost:
            return
        sslobj = tls.get_extra_info("ssl_object")
        name = self._ca.name_of(sslobj.context) if sslobj is not None else None
        self._hand(tls, origin, name if name and name != origin.address else None, True, bytes(pending.data))

    def _bad_request(self, conn: _Conn, request: web.BaseRequest, status: int,
                     exc: BaseException | None) -> web.Response:
        dest = self.policy.destinations.get(conn.origin.destination)
        protocol = "anthropic" if dest is not None and dest.protocol == "anthropic" else "openai"
        if isinstance(exc, LineTooLong):
            status = 431
        if status >= 500:
            log.error("request from %s failed in the gateway", conn.origin.source, exc_info=exc)
            ref = Refusal(status, "api_error", "gateway_error", "aimesh gateway: internal error")
        else:
            ref = Refusal(status, "invalid_request_error", "bad_http_request",
                          f"aimesh gateway: malformed HTTP request ({type(exc).__name__ if exc else status})")
        self.counters.bad_requests += 1
        self.counters.refused += 1
        self._records.send({"gateway": True, "ts": self._clock(), "source": conn.origin.source,
                            "destination": conn.origin.destination, "protocol": protocol, "decision": "refused",
                            "reason": f"bad_http: {type(exc).__name__ if exc else status}", "status": status,
                            "error_type": ref.error_type, "policy": None, "request_model": None, "sent_model": None})
        return web.Response(status=status, body=ref.body(protocol), content_type="application/json")

    # -- one request -----------------------------------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        assert isinstance(conn, _Conn)
        conn.request_started()
        try:
            return await self._serve(request, conn)
        finally:
            conn.request_done()

    async def _serve(self, request: web.BaseRequest, conn: _Conn) -> web.StreamResponse:
        self.counters.requests += 1
        t0 = time.monotonic_ns()
        wall = self._clock()
        policy = self.policy
        origin = conn.origin
        dest = policy.destinations.get(origin.destination)
        protocol = dest.protocol if dest is not None else "openai"
        rec: dict[str, Any] = {
            "gateway": True, "ts": wall, "start_ns": t0, "source": origin.source, "destination": origin.destination,
            "cookie": origin.cookie, "request_digest": "",
            "destination_address": f"{origin.address}:{origin.port}", "protocol": protocol, "operation": None,
            "method": request.method, "path": request.path, "tls": conn.client_tls, "request_model": None,
            "sent_model": None, "response_model": None, "stream": False, "policy": None, "decision": None,
            "reason": None, "deprecated": False, "status": None, "error_type": None, "input_tokens": None,
            "output_tokens": None, "cached_tokens": None, "time_to_first_chunk_ns": None, "duration_ns": None,
            "output_chunks": 0, "finish_reasons": [], "request_bytes": 0, "response_bytes": 0, "incomplete": False,
            "max_tokens": None, "sent_max_tokens": None, "temperature": None, "include_usage": None,
            "choice_count": None, "response_id": None}
        try:
            body = await asyncio.wait_for(self._read_body(request), self.settings.body_timeout_s)
        except _TooLarge:
            return self._refuse(request, rec, protocol, Refusal(
                413, "invalid_request_error", "request_too_large",
                f"aimesh: request body over {self.settings.max_body} bytes"), "body_too_large", close=True)
        except asyncio.TimeoutError:
            return self._refuse(request, rec, protocol, Refusal(
                408, "invalid_request_error", "request_timeout",
                f"aimesh: request body not received in {self.settings.body_timeout_s:.0f}s"), "body_timeout",
                close=True)
        rec["request_bytes"] = len(body)
        rec["request_digest"] = hashlib.sha256(body).hexdigest()   # as received, before any rewrite
        conn.body_read()
        if dest is None:
            return self._refuse(request, rec, protocol, Refusal(
                403, "permission_denied", "model_not_allowed",
                f"aimesh: no policy covers {origin.source} -> {origin.destination}"), "no_policy")
        ep = parse_target(request.method, request.raw_path)
        if isinstance(ep, Unclear):
            return self._refuse(request, rec, protocol, Refusal(400, "invalid_request_error", ep.code, ep.message),
                                ep.code)
        kind = ep.kind if ep is not None else None
        if protocol not in ("openai", "anthropic"):       # auto / ollama: the shape the request's API speaks
            protocol = "anthropic" if kind is not None and kind[0] is LlmProtocol.ANTHROPIC else "openai"
            rec["protocol"] = kind[0].value if kind is not None else protocol
        if ep is None or not ep.judged:      # not understood, or batches (their models are in an uploaded file)
            return await self._unjudged(request, conn, dest, body, rec, protocol, ep)
        rec["path"] = ep.path
        if not ep.model_bearing:             # GET /v1/models, file uploads, ...: no model runs
            rec["decision"], rec["reason"] = Outcome.SERVED.value, "not_a_model_call"
            return await self._forward(request, conn, dest, body, rec, None, None, None, 0, ep.target)
        rec["operation"] = kind[1].value if kind is not None else ep.name
        obj: dict[str, Any] = {}
        body_model: Any = None
        if ep.body is BodyShape.JSON:
            parsed = read_json(body)
            if isinstance(parsed, Unclear):
                return self._refuse(request, rec, protocol, Refusal(400, "invalid_request_error", parsed.code,
                                                                    parsed.message), parsed.code)
            obj, body_model = parsed, parsed.get("model")
        elif ep.body is BodyShape.MULTIPART:
            form = read_form_model(request.headers.get("Content-Type"), body)
            if isinstance(form, Unclear):
                return self._refuse(request, rec, protocol, Refusal(400, "invalid_request_error", form.code,
                                                                    form.message), form.code)
            body_model = form
        judged = judged_model(ep, body_model)
        if isinstance(judged, Unclear):
            return self._refuse(request, rec, protocol, Refusal(400, "invalid_request_error", judged.code,
                                                                judged.message), judged.code)
        model = judged.model
        rec["model_from"] = judged.source
        try:
            limit = token_limit(obj)
        except LimitError as e:
            rec["request_model"] = model
            return self._refuse(request, rec, protocol, Refusal(
                400, "invalid_request_error", "invalid_token_limit", f"{e}"), "invalid_token_limit")
        max_tokens = limit.value
        rec["choice_count"] = obj.get("n") if "n" in obj else None   # token_limit checked it is an integer
        stream = obj.get("stream")
        rec.update(request_model=model, max_tokens=max_tokens, stream=stream is True,
                   temperature=obj.get("temperature") if _is_num(obj.get("temperature")) else None,
                   include_usage=(obj.get("stream_options") or {}).get("include_usage")
                   if isinstance(obj.get("stream_options"), dict) else None)
        est_input = math.ceil(len(body) / 4)
        d = decide(policy, origin.source, origin.destination, origin.port, model, max_tokens, est_input,
                   datetime.fromtimestamp(wall, timezone.utc), limit.choices)
        rec.update(policy=d.policy, sent_model=d.sent_model, reason=d.reason, deprecated=d.deprecated,
                   sent_max_tokens=d.max_tokens)
        if d.outcome is Outcome.REFUSED:
            assert d.refusal is not None
            return self._refuse(request, rec, protocol, d.refusal, d.reason or "refused")
        outcome, reason = d.outcome, d.reason
        reservation: Reservation | None = None
        if d.rule is not None and (d.rule.tokens_per_minute is not None or d.rule.requests_per_minute is not None
                                   or d.rule.tokens_per_day is not None):
            r = self.budgets.reserve((origin.source, origin.destination),
                                     Limits(d.rule.tokens_per_minute, d.rule.requests_per_minute,
                                            d.rule.tokens_per_day), d.reserve_tokens)
            if isinstance(r, Exceeded):
                ref = budget_refusal(r.kind, r.retry_after_s, origin.source, origin.destination, d.rule)
                if not policy.audit_for(origin.source, origin.destination):
                    rec["policy"] = d.rule.name
                    return self._refuse(request, rec, protocol, ref, r.kind)
                outcome, reason = Outcome.WOULD_DENY, r.kind
            else:
                reservation = r
        rec["decision"], rec["reason"] = outcome.value, reason
        if outcome is Outcome.WOULD_DENY:
            self.counters.would_deny += 1
        target = ep.target
        if d.sent_model != model:
            if ep.body is BodyShape.MULTIPART and "body" in judged.source:
                if reservation is not None:
                    self.budgets.release(reservation)
                return self._refuse(request, rec, protocol, Refusal(
                    400, "invalid_request_error", "model_retired",
                    f"aimesh: {model!r} is retired (successor {d.sent_model!r}); the gateway does not rewrite a "
                    "multipart body: name the successor"), "model_retired")
            target = ep.with_model(d.sent_model)
        strip = False
        rewrite = ep.body is BodyShape.JSON and (d.sent_model != model or d.max_tokens != max_tokens)
        if rewrite:
            if "model" in obj:
                obj["model"] = d.sent_model
            if d.max_tokens is not None and kind is not None:
                apply_cap(obj, limit, d.max_tokens, kind[0], kind[1])
        if reservation is not None and ep.body is BodyShape.JSON and kind is not None:
            ask = want_stream_usage(obj, kind[0], kind[1])   # a budget is settled from usage: ask OpenAI streams
            if ask is not None:
                rewrite, strip = True, ask
        if rewrite:
            body = json.dumps(obj).encode()
        if ep.name == "realtime":            # judged, but the gateway relays no websockets
            if reservation is not None:
                self.budgets.release(reservation)
            return self._refuse(request, rec, protocol, Refusal(
                501, "invalid_request_error", "websocket_not_relayed",
                f"aimesh: {ep.path} is a websocket; the gateway does not relay websockets"), "websocket_not_relayed")
        return await self._forward(request, conn, dest, body, rec, d, kind, reservation, est_input, target,
                                   strip)

    async def _unjudged(self, request: web.BaseRequest, conn: _Conn, dest: Destination, body: bytes,
                        rec: dict[str, Any], protocol: str, ep: Endpoint | None) -> web.StreamResponse:
        """An endpoint the gateway does not understand, or batches: `unknown_endpoints` decides (deny by default)."""
        policy, origin = self.policy, conn.origin
        what = (f"{request.method} {ep.path} (batches: the models are in an uploaded file the gateway does not read)"
                if ep is not None else f"{request.method} {request.path}")
        reason = "batch_not_judged" if ep is not None else "endpoint_not_understood"
        if ep is not None:
            rec["path"] = ep.path
        mode = policy.unknown_endpoints
        if mode == "allow":
            rec["decision"], rec["reason"] = Outcome.SERVED.value, reason
        elif mode == "audit" or policy.audit_for(origin.source, origin.destination):
            self.counters.would_deny += 1
            rec["decision"], rec["reason"] = Outcome.WOULD_DENY.value, reason
        else:
            return self._refuse(request, rec, protocol, Refusal(
                403, "permission_denied", reason,
                f"aimesh: the gateway does not judge {what[:300]} on {origin.destination}; refused "
                "(gateway.unknown_endpoints: deny)"), reason)
        target = ep.target if ep is not None else request.raw_path
        if ep is None and "://" in target.split("?", 1)[0]:
            u = urlsplit(target)
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return await self._forward(request, conn, dest, body, rec, None, None, None, 0, target)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        cap = self.settings.max_body
        if request.content_length is not None and request.content_length > cap:
            raise _TooLarge()
        parts: list[bytes] = []
        n = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            n += len(chunk)
            if n > cap:
                raise _TooLarge()
            parts.append(chunk)
        return b"".join(parts)

    def _refuse(self, request: web.BaseRequest, rec: dict[str, Any], protocol: str, ref: Refusal, reason: str,
                close: bool = False) -> web.Response:
        self.counters.refused += 1
        rec.update(decision=Outcome.REFUSED.value, reason=reason, status=ref.status, error_type=ref.error_type,
                   sent_model=None)
        self._records.send(rec)
        resp = web.Response(status=ref.status, body=ref.body(protocol), content_type="application/json",
                            headers=dict(ref.headers))
        if close:
            resp.force_close()
        return resp

    # -- upstream --------------------------------------------------------------------------------------------------
    def _upstream_ssl(self, dest: Destination) -> ssl.SSLContext:
        ca = dest.upstream_ca or self.settings.upstream_ca
        ctx = self._ssl.get(ca)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl[ca] = ctx
        return ctx

    def _api_key(self, path: str) -> str:
        p = Path(path)
        mtime = p.stat().st_mtime
        cached = self._keys.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, p.read_text().strip())
            self._keys[path] = cached
        return cached[1]

    async def _forward(self, request: web.BaseRequest, conn: _Conn, dest: Destination, body: bytes,
                       rec: dict[str, Any], d: Decision | None, kind: tuple[LlmProtocol, Operation] | None,
                       reservation: Reservation | None, est_input: int, target: str,
                       strip: bool = False) -> web.StreamResponse:
        assert self._session is not None
        origin = conn.origin
        https = dest.tls is TlsMode.ORIGINATE or (dest.tls is TlsMode.INTERCEPT and origin.tls)
        host = f"[{origin.address}]" if ":" in origin.address else origin.address
        url = f"{'https' if https else 'http'}://{host}:{origin.port}{target}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        if strip:         # the usage event is removed from the stream: it must come uncompressed
            headers = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]
        if dest.api_key_file:
            try:
                key = self._api_key(dest.api_key_file)
            except OSError as e:
                if reservation is not None:
                    self.budgets.release(reservation)
                return self._upstream_failed(request, rec, dest, f"api key file {dest.api_key_file}: {e.strerror}")
            drop = {"authorization", "x-api-key", "api-key"}
            headers = [(k, v) for k, v in headers if k.lower() not in drop]
            headers.append(("x-api-key", key) if rec["protocol"] == "anthropic" else ("Authorization", f"Bearer {key}"))
        server_name: str | None = None
        if https:
            server_name = conn.server_name or _host_name(request.host)
        out_cap = d.reserve_tokens - est_input if d is not None else 0
        first: int | None = None
        sent_bytes = 0
        parse: ResponseParse | None = None
        complete = False
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(
                    request.method, url, data=body if body or request.method not in ("GET", "HEAD") else None,
                    headers=headers, allow_redirects=False, ssl=self._upstream_ssl(dest) if https else False,
                    server_hostname=server_name, compress=None) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP:
                        resp.headers.add(k, v)
                if d is not None and d.sent_model != d.requested_model:
                    resp.headers["x-aimesh-requested-model"] = d.requested_model
                    resp.headers["x-aimesh-sent-model"] = d.sent_model
                strip_usage = (UsageChunkStrip() if strip and up.status < 400 and not up.headers.get("Content-Encoding")
                               and up.headers.get("Content-Type", "").startswith("text/event-stream") else None)
                if (up.content_length is not None and "chunked" not in up.headers.get("Transfer-Encoding", "")
                        and strip_usage is None):
                    resp.content_length = up.content_length
                rec["status"] = up.status
                if kind is not None:      # text counted (not kept): a stream without usage is settled from it
                    parse = ResponseParse(kind[0], kind[1], up.status, up.headers.get("Content-Type"), True, 0)
                gz = (zlib.decompressobj(wbits=31) if parse is not None and
                      up.headers.get("Content-Encoding", "").lower() == "gzip" else None)
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    now = time.monotonic_ns()
                    if first is None:
                        first = now
                    passed = strip_usage.feed(chunk) if strip_usage is not None else chunk
                    if passed:
                        await resp.write(passed)
                    sent_bytes += len(passed)
                    if parse is not None:
                        try:
                            parse.feed(now, gz.decompress(chunk, 1 << 22) if gz is not None else chunk)
                        except zlib.error:
                            gz, parse = None, None
                if strip_usage is not None and (rest := strip_usage.flush()):
                    await resp.write(rest)
                    sent_bytes += len(rest)
                await resp.write_eof()
                complete = True
                return resp
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            if resp is None or not resp.prepared:
                if reservation is not None:
                    self.budgets.release(reservation)
                    reservation = None
                return self._upstream_failed(request, rec, dest, f"{type(e).__name__}: {e}")
            # the upstream cut the body, or the client left: the client's connection ends as the upstream's did
            rec["incomplete"] = True
            log.debug("stream %s -> %s ended early: %s", rec["source"], rec["destination_address"], e)
            if request.transport is not None:
                request.transport.abort()
            return resp
        finally:
            self._finish(rec, parse, complete, reservation, est_input, out_cap, t0=int(rec["start_ns"]),
                         first=first, sent_bytes=sent_bytes)

    def _upstream_failed(self, request: web.BaseRequest, rec: dict[str, Any], dest: Destination,
                         why: str) -> web.Response:
        self.counters.upstream_errors += 1
        log.debug("upstream %s failed: %s", rec["destination_address"], why)
        rec["reason"] = f"upstream: {why}"[:300]
        rec["status"], rec["error_type"], rec["decision"] = 502, "upstream_error", rec["decision"] or "served"
        self._records.send(rec)
        rec["_sent"] = True
        ref = Refusal(502, "api_error", "upstream_error", f"aimesh gateway: upstream {rec['destination_address']} "
                      "is unreachable")
        shape = "anthropic" if rec["protocol"] == "anthropic" else "openai"
        return web.Response(status=502, body=ref.body(shape), content_type="application/json")

    def _finish(self, rec: dict[str, Any], parse: ResponseParse | None, complete: bool,
                reservation: Reservation | None, est_input: int, out_cap: int, t0: int, first: int | None,
                sent_bytes: int) -> None:
        if rec.pop("_sent", False):
            return
        now = time.monotonic_ns()
        info = parse.finish(now, complete) if parse is not None else None
        if info is not None:
            rec.update(response_model=info.model, input_tokens=info.input_tokens, output_tokens=info.output_tokens,
                       cached_tokens=info.cached_tokens, output_chunks=info.chunks,
                       finish_reasons=list(info.finish_reasons), error_type=info.error_type,
                       response_id=info.response_id,
                       incomplete=not info.complete)
        rec["response_bytes"] = sent_bytes
        rec["duration_ns"] = now - t0
        rec["time_to_first_chunk_ns"] = first - t0 if first is not None else None
        if rec["decision"] == Outcome.SERVED.value:
            self.counters.served += 1
        if reservation is not None:
            if isinstance(rec.get("status"), int) and rec["status"] >= 400:
                self.budgets.release(reservation)     # the provider refused it: nothing was generated
            elif info is None:
                self.budgets.settle(reservation, reservation.tokens)
            else:
                inp = info.input_tokens if info.input_tokens is not None else est_input
                if info.output_tokens is not None:
                    out = info.output_tokens
                elif info.streamed:     # no usage (or cut before it): from the text sent, never from chunk counts
                    out = estimate_tokens(info.text_bytes)
                else:                   # a body without usage: the upstream may have generated up to the limit
                    out = max(out_cap, estimate_tokens(info.text_bytes))
                self.budgets.settle(reservation, inp + out)
        self._records.send(rec)


def _peer(peer: Any) -> tuple[str, int]:
    if not peer:
        return "", 0
    ip, port = str(peer[0]), int(peer[1])
    try:
        a = ipaddress.ip_address(ip)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            ip = str(a.ipv4_mapped)
    except ValueError:
        pass
    return ip, port


def _host_name(host: str | None) -> str | None:
    """The Host header's name part when it is a DNS name (an IP is verified as the dialed address)."""
    if not host:
        return None
    h = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    h = h.strip("[]")
    try:
        ipaddress.ip_address(h)
        return None
    except ValueError:
        return h or None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
