"""HTTP/1.1, decoded passively from both directions of one connection. Pure: bytes in, events out.

The capture hands us what a client wrote (the requests) and what it read (the responses), each direction in order, split
wherever the application's writes and the kernel's chunking fell. We never hand-parse HTTP: h11 (sans-IO, strict, the
parser httpx and uvicorn stand on) does the framing — request/status lines, headers, Content-Length, chunked, keep-alive.

h11 is written for one endpoint, so a passive observer runs two of them, each playing the peer of what it reads:

* the request direction goes into an h11 SERVER connection. When it has read a whole request we "answer" it on that
  connection with an empty 200 whose bytes we throw away, then start the next cycle: h11 then reads the next request
  of a keep-alive connection (strictly sequential, as HTTP/1.1 clients send them);
* the response direction goes into an h11 CLIENT connection. A response can only be framed knowing its request (HEAD has
  no body, `Connection: close` ends the connection), so each request head seen on the other side is "sent" on this
  connection (method, target, Host and Connection copied; bytes thrown away) before its response is read. Response
  bytes that arrive before their request was seen wait in h11's buffer, up to a bound.

When h11 refuses the traffic (RemoteProtocolError: not HTTP/1.x, a malformed line, a header block over the bound,
bytes after `Connection: close`, a body cut by the close) the connection goes to a counted undecoded state: an
`Undecoded` event says why once, every later byte is only counted, and nothing is raised to the caller. A message cut
by the close is reported as a `MessageEnd` with complete=False first, so the caller can still emit what it knew.

Before h11 sees anything we look at the first bytes for the HTTP/2 connection preface; such a connection is reported as
`Undecoded(HTTP2)`, refined to `Undecoded(GRPC)` when the first HEADERS block (decoded with hpack, the HPACK library
of the same project as h11's sibling h2) carries `content-type: application/grpc*`.

Memory is bounded: h11 keeps at most one incomplete header block (`max_header_bytes`); bodies are passed on as they come,
gzip/deflate decoded incrementally (zlib decompressobj with max_length), and only the first `body_cap` decoded bytes of
a message are passed on at all: the rest is counted in `MessageEnd.truncated_bytes`, never held.
"""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Union

import h11
import hpack

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")   # RFC 9110 tchar
DEFAULT_BODY_CAP = 4 << 20          # decoded body bytes passed on per message
DEFAULT_HEADER_BYTES = 64 << 10     # largest header block (and largest early response held) before giving up
_H2_SCAN_BYTES = 64 << 10           # how far into an HTTP/2 connection we look for the first HEADERS frame
_GAP_PIECE = 64 << 10               # a capture gap is filled in pieces of this size


def _h11_reader_usable() -> bool:
    """Whether this h11 has the pieces the chunked-body fast path uses (see Http1Connection._chunks)."""
    try:
        from h11._readers import ChunkedReader
        probe = h11.Connection(h11.CLIENT)
        return (all(hasattr(probe, a) for a in ("_reader", "_receive_buffer", "_receive_buffer_closed"))
                and callable(getattr(probe, "_process_event", None)) and callable(ChunkedReader))
    except (ImportError, AttributeError):
        return False


_H11_CHUNKED = None
if _h11_reader_usable():
    from h11._readers import ChunkedReader as _H11_CHUNKED   # noqa: N811
H11_FAST_CHUNKS = _H11_CHUNKED is not None

# what we "send" on our mirror connections, built once (h11 events are immutable; their bytes are thrown away)
_EMPTY_200 = h11.Response(status_code=200, headers=[("content-length", "0")])
_END = h11.EndOfMessage()


class Direction(enum.Enum):
    REQUEST = "request"     # bytes the client sent (a client workload's write, a server workload's read)
    RESPONSE = "response"   # bytes the server sent


class UndecodedReason(enum.Enum):
    HTTP2 = "http2"
    GRPC = "grpc"
    UPGRADE = "upgrade"                 # CONNECT, websocket, h2c: whatever follows is not HTTP/1.1
    PROTOCOL_ERROR = "protocol_error"   # h11 refused the bytes: garbage, binary, malformed, cut
    OVERFLOW = "overflow"               # responses waiting for requests never seen
    TRUNCATED = "truncated"             # the connection ended inside a message (or a header block)
    GAP = "gap"                         # the capture missed bytes outside a body: the framing is lost


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RequestHead:
    ts_ns: int
    method: str
    target: str
    headers: Headers    # names lower-cased, in order; values as sent


@dataclass(frozen=True, slots=True)
class ResponseHead:
    ts_ns: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class Body:
    direction: Direction
    ts_ns: int
    data: bytes         # decoded (gunzipped/inflated) body bytes, within the message's cap


@dataclass(frozen=True, slots=True)
class MessageEnd:
    direction: Direction
    ts_ns: int
    wire_bytes: int         # head + framed body as seen on the wire
    body_bytes: int         # decoded body bytes passed on
    truncated_bytes: int    # body bytes beyond the cap (wire bytes when they could not be decoded), not passed on
    complete: bool          # False: the connection ended (or broke) inside the message
    encoding_unsupported: str | None = None     # a Content-Encoding we do not decode (br, zstd): body not passed on


@dataclass(frozen=True, slots=True)
class Undecoded:
    ts_ns: int
    reason: UndecodedReason
    detail: str


HttpEvent = Union[RequestHead, ResponseHead, Body, MessageEnd, Undecoded]


def header(headers: Headers, name: str) -> str | None:
    """The first value of header `name` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


class _BodyDecoder:
    """Content-Encoding undone incrementally, output bounded by the cap; identity passes through."""

    def __init__(self, encoding: str | None, cap: int) -> None:
        enc = (encoding or "identity").strip().lower()
        self.unsupported: str | None = None
        self._z: zlib._Decompress | None = None   # type: ignore[name-defined]
        self._deflate_guess = False
        if enc in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":     # RFC says zlib-wrapped; some servers send raw deflate: try one, then the other
            self._z = zlib.decompressobj(zlib.MAX_WBITS)
            self._deflate_guess = True
        elif enc not in ("identity", ""):
            self.unsupported = enc
        self.compressed = self._z is not None
        self.left = cap
        self.passed = 0
        self.truncated = 0
        self.broken = False

    def feed(self, data: bytes) -> bytes:
        if self.unsupported is not None or self.broken:
            self.truncated += len(data)
            return b""
        if self._z is None:
            out = data[: self.left]
            self.truncated += len(data) - len(out)
        else:
            if self.left <= 0:
                self.truncated += len(data)
                return b""
            try:
                out = self._z.decompress(data, self.left)
            except zlib.error:
                if self._deflate_guess and self.passed == 0:
                    self._deflate_guess = False
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    return self.feed(data)
                self.broken = True
                self.truncated += len(data)
                return b""
            self._deflate_guess = False
            self.truncated += len(self._z.unconsumed_tail)   # compressed bytes whose output would exceed the cap
        self.left -= len(out)
        self.passed += len(out)
        return bytes(out)


class _Message:
    """Counters for the message being read on one direction."""

    def __init__(self, headers: Headers, cap: int) -> None:
        self.body = _BodyDecoder(header(headers, "content-encoding"), cap)
        self.gap_bytes = 0      # bytes the capture missed
        self.filling = False    # the bytes being read are filler for a gap: not passed on


class Http1Connection:
    """Both directions of one connection. `feed` and `close` never raise; they return the events the bytes completed."""

    def __init__(self, body_cap: int = DEFAULT_BODY_CAP, max_header_bytes: int = DEFAULT_HEADER_BYTES) -> None:
        self._cap = body_cap
        self._max_header = max_header_bytes
        self._req = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._resp = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self._pending: list[RequestHead] = []        # request heads whose response has not started
        self._resp_armed = False                     # a request was mirrored into _resp, its response not finished
        self._fed = {Direction.REQUEST: 0, Direction.RESPONSE: 0}
        self._consumed = {Direction.REQUEST: 0, Direction.RESPONSE: 0}   # wire bytes up to the last message end
        self._msg: dict[Direction, _Message | None] = {Direction.REQUEST: None, Direction.RESPONSE: None}
        self._prefix = b""                           # first request bytes, until we know it is not HTTP/2
        self._req_resync = False                     # after a request gap: bytes are body until the response head
        self._closed = False
        self._sniffed = False
        self._h2_scan = b""
        self._mirror: tuple[tuple, h11.Request] | None = None    # the last request mirrored, by what it was made of
        self._req_plain = False     # the request being read is HTTP/1.1 keep-alive, no upgrade, no CONNECT
        self.fast_chunks = H11_FAST_CHUNKS          # chunked response bodies read by h11's reader directly (_chunk)
        self.undecoded: UndecodedReason | None = None
        self.undecoded_bytes = 0
        self.requests = 0
        self.responses = 0

    # -- public --------------------------------------------------------------------------------------------------
    def feed(self, direction: Direction, ts_ns: int, data: bytes) -> list[HttpEvent]:
        out: list[HttpEvent] = []
        if not data:
            return out
        if self._closed and self.undecoded is None:
            self._fail(ts_ns, UndecodedReason.PROTOCOL_ERROR, f"{direction.value}: bytes after the close", out)
        if self.undecoded is not None:
            self.undecoded_bytes += len(data)
            if self.undecoded is UndecodedReason.HTTP2 and direction is Direction.REQUEST:
                self._scan_h2(ts_ns, data, out)
            return out
        if direction is Direction.REQUEST and not self._sniffed:
            data = self._sniff(ts_ns, data, out)
            if not data:
                return out
        self._fed[direction] += len(data)
        if direction is Direction.REQUEST and self._req_resync:
            self._body(direction, ts_ns, data, out)
            return out
        try:
            if direction is Direction.REQUEST:
                self._req.receive_data(data)
                self._pump_requests(ts_ns, out)
            else:
                self._resp.receive_data(data)
                if self._resp_armed:
                    self._pump_responses(ts_ns, out)
                elif len(self._resp.trailing_data[0]) > self._max_header:
                    self._fail(ts_ns, UndecodedReason.OVERFLOW, "response bytes with no request seen", out)
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as e:   # Local: our mirror of it refused too
            self._fail(ts_ns, UndecodedReason.PROTOCOL_ERROR, f"{direction.value}: {e}", out)
        if self.undecoded is not None:
            self.undecoded_bytes += len(data)   # the chunk that broke it counts as undecoded, whole
        return out

    def gap(self, direction: Direction, ts_ns: int, n: int) -> list[HttpEvent]:
        """`n` bytes of this direction, after what was fed, were moved by the application but not captured (a send
        or receive over the kernel's copy limit, a failed copy, a chunk lost to a full ring). `n` is exact in both
        directions: the kernel copies a send at its exit, with the count the kernel took, like a receive. Decoding
        goes on where it can:

        * in a body (request or response): the hole is filled with spaces, so h11's framing (Content-Length, a
          chunk's data) and a JSON scan (a hole inside a string or between tokens) survive; the hole counts in the
          message's bytes on the wire and the message is counted truncated;
        * anywhere else (a head, between messages) the framing is lost: decoding stops (`Undecoded(GAP)`)."""
        out: list[HttpEvent] = []
        if n <= 0:
            return out
        if self.undecoded is not None:
            self.undecoded_bytes += n
            return out
        msg = self._msg[direction]
        if msg is None:
            self._fail(ts_ns, UndecodedReason.GAP, f"{direction.value}: {n} bytes not captured outside a body", out)
            self.undecoded_bytes += n
            return out
        msg.gap_bytes += n
        if msg.body.compressed:
            msg.body.broken = True      # a hole in a deflate stream: nothing after it can be inflated
        left = n
        while left > 0 and self.undecoded is None:
            piece = min(left, _GAP_PIECE)
            left -= piece
            msg.filling = True
            out.extend(self.feed(direction, ts_ns, b" " * piece))
            msg.filling = False
        if self.undecoded is not None:
            self.undecoded_bytes += left
        return out

    def close(self, ts_ns: int) -> list[HttpEvent]:
        """The connection ended: finish a read-until-close response, report messages cut short."""
        out: list[HttpEvent] = []
        self._closed = True
        if self.undecoded is not None:
            return out
        try:
            if self._resp_armed:
                self._resp.receive_data(b"")
                self._pump_responses(ts_ns, out)
        except h11.RemoteProtocolError:
            pass
        left = len(self._prefix) + sum(self._fed[d] - self._consumed[d] for d in Direction)
        for d in (Direction.REQUEST, Direction.RESPONSE):
            self._abort(d, ts_ns, out)
        if left:     # bytes that never became a whole message: counted, like any traffic we could not decode
            self.undecoded = UndecodedReason.TRUNCATED
            self.undecoded_bytes += left
            out.append(Undecoded(ts_ns, UndecodedReason.TRUNCATED, f"connection closed with {left} bytes unfinished"))
        return out

    # -- request direction ---------------------------------------------------------------------------------------
    def _sniff(self, ts_ns: int, data: bytes, out: list[HttpEvent]) -> bytes:
        self._prefix += data
        n = min(len(self._prefix), len(H2_PREFACE))
        if self._prefix[:n] != H2_PREFACE[:n]:
            self._sniffed = True
            data, self._prefix = self._prefix, b""
            if data[0] not in _TOKEN:     # a request starts with its method, a token: binary is not HTTP/1
                self.undecoded_bytes += len(data)
                self._fail(ts_ns, UndecodedReason.PROTOCOL_ERROR, "request: the first byte is not a method's", out)
                return b""
            return data
        if n < len(H2_PREFACE):
            return b""     # could still be the preface: wait (at most 24 bytes)
        self._sniffed = True
        rest, self._prefix = self._prefix[len(H2_PREFACE):], b""
        self.undecoded = UndecodedReason.HTTP2
        self.undecoded_bytes += len(H2_PREFACE)
        out.append(Undecoded(ts_ns, UndecodedReason.HTTP2, "HTTP/2 connection preface"))
        if rest:
            self.undecoded_bytes += len(rest)
            self._scan_h2(ts_ns, rest, out)
        return b""

    def _scan_h2(self, ts_ns: int, data: bytes, out: list[HttpEvent]) -> None:
        """Walk frame headers until the first HEADERS frame; say gRPC if its content-type says so. Bounded."""
        if self._h2_scan is None:
            return
        buf = self._h2_scan + data
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            if len(buf) - pos - 9 < length:
                break
            payload = buf[pos + 9: pos + 9 + length]
            pos += 9 + length
            if ftype != 0x1:
                continue
            if flags & 0x8:      # PADDED
                pad = payload[0] if payload else 0
                payload = payload[1: len(payload) - pad]
            if flags & 0x20:     # PRIORITY
                payload = payload[5:]
            self._h2_scan = None  # type: ignore[assignment]
            try:
                fields = hpack.Decoder().decode(bytes(payload)) if flags & 0x4 else []
            except Exception:    # hpack raises several types; any of them means: plain HTTP/2 as far as we know
                return
            ctype = next((v for k, v in fields if k in (":content-type", "content-type", b"content-type")), "")
            if isinstance(ctype, bytes):
                ctype = ctype.decode("latin-1")
            if ctype.startswith("application/grpc"):
                self.undecoded = UndecodedReason.GRPC
                out.append(Undecoded(ts_ns, UndecodedReason.GRPC, f"content-type {ctype}"))
            return
        rest = buf[pos:]
        self._h2_scan = rest if len(rest) <= _H2_SCAN_BYTES else None  # type: ignore[assignment]

    def _pump_requests(self, ts_ns: int, out: list[HttpEvent]) -> None:
        c = self._req
        while self.undecoded is None:
            ev = c.next_event()
            if ev is h11.NEED_DATA:
                return
            if ev is h11.PAUSED:    # a request after `Connection: close`; it stays in h11's buffer, bounded here
                if len(c.trailing_data[0]) > self._max_header:
                    self._fail(ts_ns, UndecodedReason.OVERFLOW, "request bytes after a closing request", out)
                return
            if isinstance(ev, h11.Request):
                self._req_plain = _plain_keepalive(ev)
                head = RequestHead(ts_ns, ev.method.decode("latin-1"), ev.target.decode("latin-1"),
                                   _headers(ev.headers))
                self.requests += 1
                self._msg[Direction.REQUEST] = _Message(head.headers, self._cap)
                out.append(head)
                self._pending.append(head)
                if not self._resp_armed:
                    self._arm_response(ts_ns, out)
            elif isinstance(ev, h11.Data):
                self._body(Direction.REQUEST, ts_ns, ev.data, out)
            elif isinstance(ev, h11.EndOfMessage):
                self._end(Direction.REQUEST, c, ts_ns, out)
                if self._req_plain and c.their_state is h11.DONE:
                    # a plain keep-alive request: the next one is read by a fresh connection given what follows
                    # (what answering it and starting the next cycle leaves, at a fraction of the cost)
                    rest = c.trailing_data[0]
                    c = self._req = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header)
                    if rest:
                        c.receive_data(rest)
                    continue
                # answer it with an empty response nobody sees, so h11 reads the next request of the connection
                # (an Upgrade request is thereby "denied" here; a 101 on the response side ends decoding instead)
                c.send(_EMPTY_200)
                c.send(_END)
                if c.our_state is h11.DONE and c.their_state is h11.DONE:
                    c.start_next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return

    # -- response direction --------------------------------------------------------------------------------------
    def _arm_response(self, ts_ns: int, out: list[HttpEvent]) -> None:
        """Mirror the oldest unanswered request into the client-role connection, then read what is buffered."""
        head = self._pending[0]
        hdrs = [("host", header(head.headers, "host") or "unknown"), ("content-length", "0")]
        conn = header(head.headers, "connection")
        if conn is not None:
            hdrs.append(("connection", conn))
        key = (head.method, head.target, tuple(hdrs))
        try:
            if self._mirror is None or self._mirror[0] != key:   # keep-alive calls mostly repeat the same line
                self._mirror = (key, h11.Request(method=head.method, target=head.target or "/", headers=hdrs))
            self._resp.send(self._mirror[1])
            self._resp.send(_END)
        except h11.LocalProtocolError as e:
            self._fail(ts_ns, UndecodedReason.PROTOCOL_ERROR, f"request not replayable: {e}", out)
            return
        self._resp_armed = True
        self._pump_responses(ts_ns, out)

    def _pump_responses(self, ts_ns: int, out: list[HttpEvent]) -> None:
        """Read the response events h11 has. Body data of consecutive h11 Data events (the chunks of one read all
        carry its timestamp) is passed on as one Body: the body stream and its times are the same."""
        c = self._resp
        data: list[bytes] = []
        try:
            self._pump_responses_into(c, ts_ns, out, data)
        finally:
            if data:
                self._body(Direction.RESPONSE, ts_ns, b"".join(data), out)

    def _pump_responses_into(self, c: h11.Connection, ts_ns: int, out: list[HttpEvent], data: list[bytes]) -> None:
        while self.undecoded is None and self._resp_armed:
            if self.fast_chunks and c.their_state is h11.SEND_BODY and type(c._reader) is _H11_CHUNKED:
                ev = self._chunk(c)
                if ev is None:
                    return
            else:
                ev = c.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if type(ev) is h11.Data:
                data.append(ev.data)
                continue
            if data:
                self._body(Direction.RESPONSE, ts_ns, b"".join(data), out)
                data.clear()
            if isinstance(ev, h11.InformationalResponse):
                continue    # 100 Continue and friends: the real response follows
            if isinstance(ev, h11.Response):
                if self._req_resync:
                    self._resync_request(ts_ns, out)
                head = ResponseHead(ts_ns, ev.status_code, _headers(ev.headers))
                self.responses += 1
                self._msg[Direction.RESPONSE] = _Message(head.headers, self._cap)
                out.append(head)
                if ev.status_code == 101:
                    self._fail(ts_ns, UndecodedReason.UPGRADE, "101 switching protocols", out)
            elif isinstance(ev, h11.EndOfMessage):
                self._end(Direction.RESPONSE, c, ts_ns, out)
                self._pending.pop(0)
                self._resp_armed = False
                if c.our_state is h11.DONE and c.their_state is h11.DONE:
                    c.start_next_cycle()
                    if self._pending:
                        self._arm_response(ts_ns, out)
                else:
                    return      # MUST_CLOSE: anything more on this connection is an error h11 will report
            elif isinstance(ev, h11.ConnectionClosed):
                return

    @staticmethod
    def _chunk(c: h11.Connection) -> object:
        """The next event of a chunked response body, read by h11's own ChunkedReader as next_event reads it, without
        next_event's per-event state-machine round for Data (which leaves every state as it is in SEND_BODY). The
        end of the body goes through the state machine as next_event would send it; None: the reader needs more
        bytes. Errors are raised as next_event raises them (the connection is given up on either way)."""
        try:
            ev = c._reader(c._receive_buffer)        # type: ignore[misc]
            if ev is None:
                return c.next_event() if c._receive_buffer_closed else None   # EOF: let h11 say what it means
            if type(ev) is not h11.Data:
                c._process_event(c.their_role, ev)   # EndOfMessage
            return ev
        except h11.LocalProtocolError as e:
            raise h11.RemoteProtocolError(str(e)) from None

    # -- shared --------------------------------------------------------------------------------------------------
    def _body(self, d: Direction, ts_ns: int, data: bytes, out: list[HttpEvent]) -> None:
        msg = self._msg[d]
        if msg is None:
            return
        if msg.filling:     # the spaces keep h11's framing; a JSON or SSE scan sees the hole as a hole
            return
        piece = msg.body.feed(bytes(data))
        if piece:
            out.append(Body(d, ts_ns, piece))

    def _end(self, d: Direction, c: h11.Connection, ts_ns: int, out: list[HttpEvent]) -> None:
        msg = self._msg[d]
        self._msg[d] = None
        consumed = self._fed[d] - len(c.trailing_data[0])
        wire = consumed - self._consumed[d]
        self._consumed[d] = consumed
        if msg is not None:
            out.append(MessageEnd(d, ts_ns, wire, msg.body.passed, msg.body.truncated + msg.gap_bytes, True,
                                  msg.body.unsupported))

    def _resync_request(self, ts_ns: int, out: list[HttpEvent]) -> None:
        """The request read through a gap has ended (its response starts): end it, read the next one afresh."""
        self._req_resync = False
        msg = self._msg[Direction.REQUEST]
        self._msg[Direction.REQUEST] = None
        wire = self._fed[Direction.REQUEST] - self._consumed[Direction.REQUEST]
        self._consumed[Direction.REQUEST] = self._fed[Direction.REQUEST]
        if msg is not None:
            out.append(MessageEnd(Direction.REQUEST, ts_ns, wire, msg.body.passed, msg.body.truncated + msg.gap_bytes,
                                  True, msg.body.unsupported))
        self._req = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header)

    def _abort(self, d: Direction, ts_ns: int, out: list[HttpEvent]) -> None:
        msg = self._msg[d]
        if msg is None:
            return
        self._msg[d] = None
        wire = self._fed[d] - self._consumed[d]
        self._consumed[d] = self._fed[d]
        out.append(MessageEnd(d, ts_ns, wire, msg.body.passed, msg.body.truncated + msg.gap_bytes, False,
                              msg.body.unsupported))

    def _fail(self, ts_ns: int, reason: UndecodedReason, detail: str, out: list[HttpEvent]) -> None:
        for d in (Direction.REQUEST, Direction.RESPONSE):
            self._abort(d, ts_ns, out)
        self.undecoded = reason
        out.append(Undecoded(ts_ns, reason, detail))
        # drop h11's buffers: nothing more is decoded on this connection
        self._req = self._resp = None  # type: ignore[assignment]
        self._pending.clear()
        self._resp_armed = False


def _plain_keepalive(ev: h11.Request) -> bool:
    """HTTP/1.1, not CONNECT, no Upgrade, Connection absent or only keep-alive: after it, the connection reads the
    next request as a new one would."""
    if ev.http_version != b"1.1" or ev.method == b"CONNECT":
        return False
    for k, v in ev.headers:
        if k == b"upgrade":
            return False
        if k == b"connection" and any(t.strip().lower() not in (b"keep-alive", b"") for t in v.split(b",")):
            return False
    return True


def _headers(raw: object) -> Headers:
    return tuple((bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1")) for k, v in raw)  # type: ignore
