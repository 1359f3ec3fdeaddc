"""HTTP/1.1, decoded passively from both directions of one connection. Pure: bytes in, events out.

The capture hands us what a client wrote (the requests) and what it read (the responses), each direction in order, split
wherever the application's writes and the kernel's chunking fell. We never hand-parse HTTP: llhttp (the C parser of
Node.js, through httptools, the binding uvicorn and aiohttp use) does the framing — request/status lines, headers,
Content-Length, chunked, keep-alive — and says what it refuses.

A passive observer needs two things llhttp does not give by itself, and gets them from how the bytes are fed to it:

* where a message ends in the bytes of one read (its wire size, and where the next message starts). Each direction is
  fed in pieces that never cross a message's end: a head ends at its first CRLF CRLF (llhttp requires CRLF line ends),
  a Content-Length body after its length, a chunked body at a CRLF CRLF (its last chunk and trailers end with one),
  so pieces end at each CRLF CRLF while a head or a chunked body is read. When llhttp says the message is complete, it
  ended with the piece. Each message gets a parser of its own;
* what a response's request was: a response to HEAD has no body whatever its Content-Length, a 2xx to CONNECT starts a
  tunnel. Each request head seen is queued; a response is read with its request's method known, in order (keep-alive:
  strictly sequential requests, as HTTP/1.1 clients send them). Response bytes that arrive before their request was
  seen wait, up to a bound.

When llhttp refuses the traffic (HttpParserError: not HTTP/1.x, a malformed line, a bad chunk size, a header block over
the bound, bytes after `Connection: close`) the connection goes to a counted undecoded state: an `Undecoded` event says
why once, every later byte is only counted, and nothing is raised to the caller. A message cut by the close is reported
as a `MessageEnd` with complete=False first, so the caller can still emit what it knew.

Before llhttp sees anything we look at the first bytes for the HTTP/2 connection preface; such a connection is reported
as `Undecoded(HTTP2)`, refined to `Undecoded(GRPC)` when the first HEADERS block (decoded with hpack) carries
`content-type: application/grpc*`.

Memory is bounded: a head is read in pieces and given up on past `max_header_bytes`; bodies are passed on as they come,
gzip/deflate decoded incrementally (zlib decompressobj with max_length), and only the first `body_cap` decoded bytes of
a message are passed on at all: the rest is counted in `MessageEnd.truncated_bytes`, never held.
"""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from typing import Union

import hpack
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")   # RFC 9110 tchar
DEFAULT_BODY_CAP = 4 << 20          # decoded body bytes passed on per message
DEFAULT_HEADER_BYTES = 64 << 10     # largest header block (and largest early response held) before giving up
_H2_SCAN_BYTES = 64 << 10           # how far into an HTTP/2 connection we look for the first HEADERS frame
_GAP_PIECE = 64 << 10               # a capture gap is filled in pieces of this size
_EOH = b"\r\n\r\n"                  # ends a head, and a chunked body

# how the message being read on one direction ends (_Reader.framing): where the pieces fed to llhttp are cut
_HEAD = 0       # in the head: at each CRLF CRLF (the first one ends the head)
_LENGTH = 1     # in a Content-Length body: after its last byte
_CHUNKED = 2    # in a chunked body: at each CRLF CRLF (the last chunk and the trailers end with one)
_EOF = 3        # in a body read until the connection closes: never
_SHUT = 4       # after a message that closes the connection, or a tunnel: nothing more may follow


class Direction(enum.Enum):
    REQUEST = "request"     # bytes the client sent (a client workload's write, a server workload's read)
    RESPONSE = "response"   # bytes the server sent


class UndecodedReason(enum.Enum):
    HTTP2 = "http2"
    GRPC = "grpc"
    UPGRADE = "upgrade"                 # CONNECT, websocket, h2c: whatever follows is not HTTP/1.1
    PROTOCOL_ERROR = "protocol_error"   # llhttp refused the bytes: garbage, binary, malformed, cut
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




class _Overrun(Exception):
    """llhttp began a second message inside one piece: the framing we cut by was wrong."""


class _Reader:
    """The llhttp callbacks of the message being read on one direction, and how its pieces are cut. The parser is
    held by the connection, not here (it holds our bound methods: no cycle)."""

    __slots__ = ("framing", "left", "tail", "head_bytes", "url", "hdrs", "head_done", "complete", "body", "method",
                 "closing")

    def __init__(self, method: str = "") -> None:
        self.framing = _HEAD
        self.left = 0               # _LENGTH: body bytes still to come
        self.tail = b""             # the last bytes fed (up to 3): a CRLF CRLF may straddle two reads
        self.head_bytes = 0
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.head_done = False      # llhttp has read the whole head; cleared once we have made it a head event
        self.complete = False       # llhttp (or we: HEAD, CONNECT) ended the message
        self.body: list[bytes] = []
        self.method = method        # a response's: its request's method
        self.closing = False        # the message closes the connection (or opens a tunnel)

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Overrun()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.hdrs.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class Http1Connection:
    """Both directions of one connection. `feed` and `close` never raise; they return the events the bytes completed."""

    def __init__(self, body_cap: int = DEFAULT_BODY_CAP, max_header_bytes: int = DEFAULT_HEADER_BYTES) -> None:
        self._cap = body_cap
        self._max_header = max_header_bytes
        self._reader: dict[Direction, _Reader | None] = {Direction.REQUEST: _Reader(), Direction.RESPONSE: None}
        self._parser: dict[Direction, HttpRequestParser | HttpResponseParser | None] = {
            Direction.REQUEST: HttpRequestParser(self._reader[Direction.REQUEST]), Direction.RESPONSE: None}
        self._pending: list[tuple[RequestHead, bool]] = []   # request heads (and: closes the connection) not answered
        self._early = bytearray()                    # response bytes before their request was seen
        self._fed = {Direction.REQUEST: 0, Direction.RESPONSE: 0}
        self._read_to = {Direction.REQUEST: 0, Direction.RESPONSE: 0}    # wire bytes given to llhttp
        self._consumed = {Direction.REQUEST: 0, Direction.RESPONSE: 0}   # wire bytes up to the last message end
        self._msg: dict[Direction, _Message | None] = {Direction.REQUEST: None, Direction.RESPONSE: None}
        self._prefix = b""                           # first request bytes, until we know it is not HTTP/2
        self._closed = False
        self._sniffed = False
        self._h2_scan = b""
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
        self._read(direction, ts_ns, data, out)
        if self.undecoded is not None:
            self.undecoded_bytes += len(data)   # the chunk that broke it counts as undecoded, whole
        return out

    def gap(self, direction: Direction, ts_ns: int, n: int) -> list[HttpEvent]:
        """`n` bytes of this direction, after what was fed, were moved by the application but not captured (a send
        or receive over the kernel's copy limit, a failed copy, a chunk lost to a full ring). `n` is exact in both
        directions: the kernel copies a send at its exit, with the count the kernel took, like a receive. Decoding
        goes on where it can:

        * in a body (request or response): the hole is filled with spaces, so the framing (Content-Length, a
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
        r = self._reader[Direction.RESPONSE]
        if r is not None and r.framing == _EOF and self._msg[Direction.RESPONSE] is not None:
            self._end(Direction.RESPONSE, self._read_to[Direction.RESPONSE], ts_ns, out)
        left = len(self._prefix) + sum(self._fed[d] - self._consumed[d] for d in Direction)
        for d in (Direction.REQUEST, Direction.RESPONSE):
            self._abort(d, ts_ns, out)
        if left:     # bytes that never became a whole message: counted, like any traffic we could not decode
            self.undecoded = UndecodedReason.TRUNCATED
            self.undecoded_bytes += left
            out.append(Undecoded(ts_ns, UndecodedReason.TRUNCATED, f"connection closed with {left} bytes unfinished"))
        return out

    # -- the two directions ----------------------------------------------------------------------------------------
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

    def _read(self, d: Direction, ts_ns: int, data: bytes, out: list[HttpEvent]) -> None:
        """Give `data` to the direction's parser, in pieces that never cross the end of a message (module doc)."""
        base = self._read_to[d]
        pos, n = 0, len(data)
        view = memoryview(data)
        while pos < n and self.undecoded is None:
            r = self._reader[d]
            if r is None:       # a response before its request: held until the request is seen, bounded
                self._early += view[pos:]
                if len(self._early) > self._max_header:
                    self._fail(ts_ns, UndecodedReason.OVERFLOW, "response bytes with no request seen", out)
                return
            framing = r.framing
            if framing == _LENGTH:
                end = pos + r.left if r.left < n - pos else n
                r.left -= end - pos
            elif framing == _EOF:
                end = n
            elif framing == _SHUT:     # held, not read (counted at the close), bounded
                if self._fed[d] - self._read_to[d] > self._max_header:
                    self._fail(ts_ns, UndecodedReason.OVERFLOW, f"{d.value} bytes after Connection: close", out)
                return
            else:               # _HEAD, _CHUNKED: at the next CRLF CRLF, which may begin in the bytes fed before
                end = -1
                if r.tail:
                    j = (r.tail + data[pos:pos + 3]).find(_EOH)
                    if j >= 0:
                        end = pos + j + 4 - len(r.tail)
                if end < 0:
                    j = data.find(_EOH, pos)
                    end = n if j < 0 else j + 4
                r.tail = data[end - 3:end] if end - pos >= 3 else (r.tail + data[pos:end])[-3:]
            parser = self._parser[d]
            error: str | None = None
            try:
                parser.feed_data(view[pos:end])    # type: ignore[union-attr]
            except HttpParserUpgrade:
                pass            # CONNECT or Upgrade: llhttp has ended the message; what follows is decided below
            except HttpParserError as e:
                cause = e.__context__
                error = "message framing lost" if isinstance(cause, _Overrun) else (str(e) or type(e).__name__)
            self._read_to[d] = base + end
            if framing == _HEAD:
                r.head_bytes += end - pos
            pos = end
            if r.head_done:
                r.head_done = False
                if d is Direction.REQUEST:
                    self._request_head(r, parser, ts_ns, out)     # type: ignore[arg-type]
                else:
                    self._response_head(r, parser, ts_ns, out)    # type: ignore[arg-type]
                if self.undecoded is not None:
                    return
            elif framing == _HEAD and r.head_bytes > self._max_header and error is None:
                error = f"header block over {self._max_header} bytes"
            if error is not None:
                self._flush(d, r, ts_ns, out)
                self._fail(ts_ns, UndecodedReason.PROTOCOL_ERROR, f"{d.value}: {error}", out)
                return
            if r.complete:
                self._flush(d, r, ts_ns, out)
                self._message_done(d, r, base + end, ts_ns, out)
        r = self._reader[d]
        if r is not None and r.body and self.undecoded is None:
            self._flush(d, r, ts_ns, out)

    def _flush(self, d: Direction, r: _Reader, ts_ns: int, out: list[HttpEvent]) -> None:
        """The body llhttp gave in this read, as one Body: the pieces of one read all carry its time."""
        if r.body:
            body = r.body[0] if len(r.body) == 1 else b"".join(r.body)
            r.body.clear()
            self._body(d, ts_ns, body, out)

    def _request_head(self, r: _Reader, parser: HttpRequestParser, ts_ns: int, out: list[HttpEvent]) -> None:
        method = parser.get_method().decode("latin-1")
        head = RequestHead(ts_ns, method, r.url.decode("latin-1"), _headers(r.hdrs))
        self.requests += 1
        self._msg[Direction.REQUEST] = _Message(head.headers, self._cap)
        out.append(head)
        r.closing = method == "CONNECT" or _closing(parser.get_http_version(), head.headers)   # CONNECT: a tunnel
        self._pending.append((head, r.closing))
        if method == "CONNECT":
            r.complete = True
        elif not r.complete:
            _frame_body(r, head.headers)
        if self._reader[Direction.RESPONSE] is None and self._msg[Direction.RESPONSE] is None:
            self._arm_response(ts_ns, out)

    def _arm_response(self, ts_ns: int, out: list[HttpEvent]) -> None:
        """A parser for the oldest unanswered request's response, then read what was held for it."""
        r = _Reader(self._pending[0][0].method)
        self._reader[Direction.RESPONSE] = r
        self._parser[Direction.RESPONSE] = HttpResponseParser(r)
        if self._early:
            early = bytes(self._early)
            self._early.clear()
            self._read(Direction.RESPONSE, ts_ns, early, out)

    def _response_head(self, r: _Reader, parser: HttpResponseParser, ts_ns: int, out: list[HttpEvent]) -> None:
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return          # 100 Continue and friends: the real response follows (the message ends, not the call)
        head = ResponseHead(ts_ns, status, _headers(r.hdrs))
        self.responses += 1
        self._msg[Direction.RESPONSE] = _Message(head.headers, self._cap)
        out.append(head)
        if status == 101:
            self._fail(ts_ns, UndecodedReason.UPGRADE, "101 switching protocols", out)
        elif r.method == "CONNECT" and 200 <= status < 300:
            self._fail(ts_ns, UndecodedReason.UPGRADE, "CONNECT tunnel", out)
        elif r.method == "HEAD":
            r.complete = True       # no body, whatever its headers say (llhttp does not know the request)
        elif not r.complete:
            _frame_body(r, head.headers)
        r.closing = _closing(parser.get_http_version(), head.headers)

    def _message_done(self, d: Direction, r: _Reader, at: int, ts_ns: int, out: list[HttpEvent]) -> None:
        """The message ended at wire offset `at` (llhttp said so, or the request's method did): the next one gets a
        parser of its own."""
        if d is Direction.RESPONSE and self._msg[d] is None:     # an informational response: read the real one
            nr = _Reader(r.method)
            self._reader[d] = nr
            self._parser[d] = HttpResponseParser(nr)
            return
        self._end(d, at, ts_ns, out)
        nr = _Reader()
        if d is Direction.REQUEST:
            if r.closing:
                nr.framing = _SHUT
            self._reader[d] = nr
            self._parser[d] = HttpRequestParser(nr)
            return
        req_closing = self._pending.pop(0)[1] if self._pending else False
        if req_closing or r.closing:
            nr.framing = _SHUT
            self._reader[d] = nr
            self._parser[d] = None
        elif self._pending:
            self._arm_response(ts_ns, out)
        else:
            self._reader[d] = self._parser[d] = None

    # -- shared --------------------------------------------------------------------------------------------------
    def _body(self, d: Direction, ts_ns: int, data: bytes, out: list[HttpEvent]) -> None:
        msg = self._msg[d]
        if msg is None:
            return
        if msg.filling:     # the spaces keep the framing; a JSON or SSE scan sees the hole as a hole
            return
        piece = msg.body.feed(data)
        if piece:
            out.append(Body(d, ts_ns, piece))

    def _end(self, d: Direction, at: int, ts_ns: int, out: list[HttpEvent]) -> None:
        msg = self._msg[d]
        self._msg[d] = None
        wire = at - self._consumed[d]
        self._consumed[d] = at
        if msg is not None:
            out.append(MessageEnd(d, ts_ns, wire, msg.body.passed, msg.body.truncated + msg.gap_bytes, True,
                                  msg.body.unsupported))

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
        # drop the parsers and what was held: nothing more is decoded on this connection
        self._reader = {Direction.REQUEST: None, Direction.RESPONSE: None}
        self._parser = {Direction.REQUEST: None, Direction.RESPONSE: None}
        self._pending.clear()
        self._early = bytearray()


def _frame_body(r: _Reader, headers: Headers) -> None:
    """How llhttp reads the body after this head (it has not ended the message): chunked when the last transfer
    coding is, else until the close; else Content-Length (llhttp has checked it is one number); else until the close."""
    r.tail = b""
    te = header(headers, "transfer-encoding")
    if te is not None:
        r.framing = _CHUNKED if te.rsplit(",", 1)[-1].strip().lower() == "chunked" else _EOF
        return
    cl = header(headers, "content-length")
    try:
        r.left = int(cl) if cl is not None else -1
    except ValueError:
        r.left = -1
    r.framing = _LENGTH if r.left >= 0 else _EOF


def _closing(version: str, headers: Headers) -> bool:
    """The message closes the connection: `Connection: close`, or HTTP/1.0 without keep-alive."""
    tokens: set[str] = set()
    for k, v in headers:
        if k == "connection":
            tokens.update(t.strip().lower() for t in v.split(","))
    return "close" in tokens or (version != "1.1" and "keep-alive" not in tokens)


def _headers(raw: list[tuple[bytes, bytes]]) -> Headers:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1").strip(" \t")) for k, v in raw)
