"""Plaintext capture events (bpf/capture.c) -> per-connection decoders -> model-call records. Pure: no kernel.

`decode_capture_event` turns one capture_events record into a `CaptureChunk`. `CaptureTracker` keeps one
`ConnectionDecoder` per socket cookie (bounded, least recently used first out; idle ones closed by `expire`) and
feeds it in ring order: what the client sent is the request direction, what it received the response direction.
An OPEN chunk (the connect) gives the address as dialed, kept for the connection's records (server_address/port).
A TLS_HANDSHAKE chunk (a socket whose TLS aimesh cannot read) makes no decoder. A GAP chunk (bytes the kernel did not copy: the per-request budget, the per-call chunk limit) becomes a gap in the
decoder (the call is marked truncated). Bytes whose chunks and GAP record a full ring dropped arrive as the next
record's lost_send / lost_recv: gaps in those directions before that record (its own direction's first). A CLOSE chunk closes the decoder (a call in flight becomes an incomplete
record). When a decoder gives up (not HTTP/1) the tracker counts the connection undecoded, once, and queues its
(pid, fd) in `take_skips()` so the agent can tell the kernel to stop copying it.
"""
from __future__ import annotations

import ctypes as ct
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional

from agent.flows.decode import format_addr
from agent.kernel import abi
from agent.l7.http1 import Direction, UndecodedReason
from agent.l7.record import ConnectionDecoder, DecoderOptions, ModelCallRecord

HEADER = ct.sizeof(abi.CaptureEvent)
OPEN_SIZE = ct.sizeof(abi.CaptureOpen)


def struct_format(cls: type[ct.Structure]) -> str:
    """A struct module format for a ctypes Structure of integer fields and integer arrays, built from its _fields_
    (offsets and padding as ctypes lays them out), so it follows the mirror when fields are added. Arrays (padding)
    become pad bytes. Raises ValueError naming a field of another type."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fmt, at = "<", 0
    for name, typ, *_ in cls._fields_:
        f = getattr(cls, name)
        if f.offset > at:
            fmt += f"{f.offset - at}x"
        if issubclass(typ, ct.Array):
            fmt += f"{f.size}x"
        elif getattr(typ, "_type_", "") in tuple("bBhHiIlLqQ") and f.size in codes:
            fmt += codes[f.size].lower() if typ._type_.islower() else codes[f.size]
        else:
            raise ValueError(f"{cls.__name__}.{name}: no struct code for {typ.__name__}")
        at = f.offset + f.size
    if ct.sizeof(cls) > at:
        fmt += f"{ct.sizeof(cls) - at}x"
    return fmt


def struct_fields(cls: type[ct.Structure]) -> tuple[str, ...]:
    """The names struct_format(cls) unpacks, in order (arrays are padding, not unpacked)."""
    return tuple(name for name, typ, *_ in cls._fields_ if not issubclass(typ, ct.Array))


_EVENT = struct.Struct(struct_format(abi.CaptureEvent))
_EVENT_FIELDS = struct_fields(abi.CaptureEvent)
_AT = {name: i for i, name in enumerate(_EVENT_FIELDS)}
# the field positions decode_capture_event reads, looked up once
(_TS, _COOKIE, _TGID, _FD, _SRC, _DST, _ADST, _TOTAL, _OFFSET, _LEN, _LSEND, _LRECV, _KIND, _DIR, _FLAGS) = (
    _AT[n] for n in ("ts_ns", "cookie", "tgid", "fd", "src_id", "dst_id", "actual_dst_id", "total", "offset", "len",
                     "lost_send", "lost_recv", "kind", "direction", "flags"))
_KINDS = {int(k): k for k in abi.CaptureKind}
_DIRECTIONS = {int(abi.CaptureDirection.SEND): Direction.REQUEST, int(abi.CaptureDirection.RECV): Direction.RESPONSE}
_TLS = int(abi.CaptureEventFlag.TLS)
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_IDLE_NS = 300 * 10**9


class CaptureDecodeError(ValueError):
    pass


class CaptureChunk(NamedTuple):
    """One capture record, decoded. A NamedTuple, not a dataclass: one is built per ring record, and a tuple is
    built in C (a frozen dataclass sets each field through object.__setattr__)."""
    ts_ns: int
    cookie: int
    pid: int
    fd: int
    src_id: int
    dst_id: int
    actual_dst_id: int
    kind: abi.CaptureKind
    direction: Optional[Direction]   # None for CLOSE and OPEN
    total: int                        # bytes the syscall moved
    offset: int                       # of data within them (GAP: the first byte not copied)
    data: bytes
    tls: bool = False                 # plaintext of an SSL_* call (bpf/tls.c), not a syscall's bytes
    lost_send: int = 0                # bytes sent before this record that the full ring dropped untold (a hole)
    lost_recv: int = 0                # the same, received

    @property
    def dialed(self) -> tuple[str, int]:
        """OPEN: (address, port) the client dialed."""
        if self.kind is not abi.CaptureKind.OPEN:
            return "", 0
        o = abi.CaptureOpen.from_buffer_copy(self.data[:OPEN_SIZE])
        return format_addr(bytes(o.addr)), o.port

    @property
    def missing(self) -> int:
        """GAP: bytes of the syscall the kernel did not copy."""
        return max(self.total - self.offset, 0) if self.kind is abi.CaptureKind.GAP else 0


def decode_capture_event(raw: bytes) -> CaptureChunk:
    if len(raw) < HEADER:
        raise CaptureDecodeError(f"capture event is {len(raw)} bytes, expected at least {HEADER}")
    h = _EVENT.unpack_from(raw)
    kind = _KINDS.get(h[_KIND])
    if kind is None:
        raise CaptureDecodeError(f"capture event with unknown kind {h[_KIND]}")
    n = h[_LEN]
    direction, data = None, b""
    if kind is abi.CaptureKind.OPEN:
        if n < OPEN_SIZE or HEADER + n > len(raw):
            raise CaptureDecodeError(f"capture open event carries {len(raw) - HEADER} bytes, expected {OPEN_SIZE}")
        data = bytes(raw[HEADER:HEADER + n])
    elif kind is not abi.CaptureKind.CLOSE:
        direction = _DIRECTIONS.get(h[_DIR])
        if direction is None:
            raise CaptureDecodeError(f"capture event with unknown direction {h[_DIR]}")
        if kind is abi.CaptureKind.DATA:
            if HEADER + n > len(raw):
                raise CaptureDecodeError(f"capture event says {n} data bytes, carries {len(raw) - HEADER}")
            data = bytes(raw[HEADER:HEADER + n])
    return CaptureChunk(h[_TS], h[_COOKIE], h[_TGID], h[_FD], h[_SRC], h[_DST], h[_ADST], kind, direction,
                        h[_TOTAL], h[_OFFSET], data, bool(h[_FLAGS] & _TLS), h[_LSEND], h[_LRECV])


@dataclass(frozen=True, slots=True)
class CapturedCall:
    """A finished record and who made it (from the socket's connect-time mark)."""
    record: ModelCallRecord
    cookie: int
    pid: int
    src_id: int
    dst_id: int
    actual_dst_id: int
    server_address: str = ""     # the peer as dialed (the connect's OPEN record); "" when it was not seen
    server_port: int = 0


class _Conn:
    __slots__ = ("decoder", "pid", "fd", "src_id", "dst_id", "actual_dst_id", "last_ns", "undecoded", "calls",
                 "server")

    def __init__(self, decoder: ConnectionDecoder, c: CaptureChunk) -> None:
        self.decoder = decoder
        self.undecoded: Optional[UndecodedReason] = None    # as counted in CaptureTracker.undecoded
        self.calls: dict[Direction, tuple[int, int]] = {}   # per direction, the syscall in progress: (copied up to, total)
        self.pid, self.fd, self.src_id, self.dst_id, self.actual_dst_id = c.pid, c.fd, c.src_id, c.dst_id, \
            c.actual_dst_id
        self.last_ns = c.ts_ns
        self.server: tuple[str, int] = ("", 0)


class CaptureTracker:
    """One ConnectionDecoder per cookie. `options(dst_id)` says how the destination's calls are decoded (content
    capture, redaction, protocol); `capture_content(dst_id)` is the short form for content capture alone."""

    def __init__(self, capture_content: Callable[[int], bool] = lambda _id: False,
                 options: Optional[Callable[[int], DecoderOptions]] = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_ns: int = DEFAULT_IDLE_NS) -> None:
        self._options = options if options is not None else \
            (lambda dst_id: DecoderOptions(capture_content=capture_content(dst_id)))
        self._max = max_connections
        self._idle_ns = idle_ns
        self._conns: OrderedDict[int, _Conn] = OrderedDict()
        self.evicted = 0       # decoders closed because the table was full
        self.chunks = 0
        self.bytes_missing = 0   # bytes a syscall moved that the kernel did not copy (truncation, failed reads, ring)
        self.bytes_lost = 0      # of them, bytes the full ring dropped with no GAP record (lost_send / lost_recv)
        self.undecoded: dict[str, int] = {}   # connections the decoder gave up on, by UndecodedReason value
        self.undecoded_bytes = 0              # their bytes not decoded, added when the connection ends
        self._skips: list[tuple[int, int]] = []     # (pid, fd) of undecoded sockets, for the kernel to stop copying
        self._opened: OrderedDict[int, tuple[str, int]] = OrderedDict()   # cookie -> dialed, until its first data

    def __len__(self) -> int:
        return len(self._conns)

    def on_chunk(self, c: CaptureChunk) -> list[CapturedCall]:
        self.chunks += 1
        conn = self._conns.get(c.cookie)
        if (c.lost_send or c.lost_recv) and conn is not None:
            return self._lost(conn, c) + self._on_chunk(c, conn)
        return self._on_chunk(c, conn)

    def _on_chunk(self, c: CaptureChunk, conn: Optional[_Conn]) -> list[CapturedCall]:
        if c.kind is abi.CaptureKind.OPEN:
            self._opened[c.cookie] = c.dialed
            while len(self._opened) > self._max:
                self._opened.popitem(last=False)
            return []
        if c.kind is abi.CaptureKind.CLOSE:
            if conn is None:
                self._opened.pop(c.cookie, None)
                return []
            del self._conns[c.cookie]
            return self._end(conn, c.ts_ns)
        if c.kind is abi.CaptureKind.TLS_HANDSHAKE:
            return []      # ciphertext nobody decrypts for us: nothing to decode (agent/l7/tls_visibility.py reports it)
        out: list[CapturedCall] = []
        if conn is None:
            while len(self._conns) >= self._max:
                _, old = self._conns.popitem(last=False)
                self.evicted += 1
                out.extend(self._end(old, old.last_ns))
            conn = _Conn(self._options(c.dst_id).decoder(c.cookie, tls=c.tls), c)
            conn.server = self._opened.pop(c.cookie, ("", 0))
            self._conns[c.cookie] = conn
        else:
            self._conns.move_to_end(c.cookie)
        conn.last_ns = c.ts_ns
        d = c.direction
        if d is None:       # decode_capture_event gives every DATA chunk a direction
            return out
        # bytes a syscall moved that were not copied become a gap in the decoder, in order: a call is over when the
        # other direction moves, when the next call of this one starts (offset 0), or when its last chunk is full.
        # conn.calls holds only calls not copied whole so far: the common chunk costs one empty-dict test
        pending = conn.calls
        if pending:
            other = Direction.RESPONSE if d is Direction.REQUEST else Direction.REQUEST
            if other in pending:
                out.extend(self._flush(conn, other, c.ts_ns))
            if c.offset == 0 and d in pending:
                out.extend(self._flush(conn, d, c.ts_ns))
        if c.kind is abi.CaptureKind.GAP:      # the kernel copied no more of this call: offset..total are missing
            at = pending.pop(d)[0] if d in pending else c.offset
            if c.total > at:
                out.extend(self._gap(conn, d, c.ts_ns, c.total - at))
            self._note_undecoded(conn)
            return out
        at = pending[d][0] if d in pending else c.offset
        if c.offset > at:       # a chunk in between was lost (a failed copy)
            out.extend(self._gap(conn, d, c.ts_ns, c.offset - at))
        if c.data:
            out.extend(self._wrap(conn, conn.decoder.feed(d, c.ts_ns, c.data)))
        end = c.offset + len(c.data)
        if end < c.total:
            pending[d] = (max(at, end), c.total)       # the rest follows, or a GAP record says it never will
        elif d in pending:
            del pending[d]
        self._note_undecoded(conn)
        return out

    def _lost(self, conn: _Conn, c: CaptureChunk) -> list[CapturedCall]:
        """Holes the full ring left untold, before c: the call of that direction in progress (its GAP record was among
        what was dropped) ends there. The record's own direction first: the other moved after it (when both)."""
        out: list[CapturedCall] = []
        own = c.direction or Direction.REQUEST
        for d in (own, Direction.RESPONSE if own is Direction.REQUEST else Direction.REQUEST):
            n = c.lost_send if d is Direction.REQUEST else c.lost_recv
            if n:
                conn.calls.pop(d, None)     # what it still waited for is these bytes
                self.bytes_lost += n
                out.extend(self._gap(conn, d, c.ts_ns, n))
        self._note_undecoded(conn)
        return out

    def _note_undecoded(self, conn: _Conn) -> None:
        if conn.decoder.undecoded is not conn.undecoded:
            if conn.undecoded is None:
                self._skips.append((conn.pid, conn.fd))    # first time: the kernel can stop copying this socket
            self._count_undecoded(conn)

    def take_skips(self) -> list[tuple[int, int]]:
        """(pid, fd) of the sockets whose decoder gave up since the last call: copying them is wasted."""
        out, self._skips = self._skips, []
        return out

    def _flush(self, conn: _Conn, d: Direction, ts_ns: int) -> list[CapturedCall]:
        call = conn.calls.pop(d, None)
        if call is None or call[0] >= call[1]:
            return []
        return self._gap(conn, d, ts_ns, call[1] - call[0])

    def _gap(self, conn: _Conn, d: Direction, ts_ns: int, n: int) -> list[CapturedCall]:
        self.bytes_missing += n
        return self._wrap(conn, conn.decoder.gap(d, ts_ns, n))

    def undecoded_counts(self) -> dict[str, int]:
        """Connections not decoded, by reason (http2, grpc, protocol_error, truncated, ...), for the metrics."""
        return dict(self.undecoded)

    def _count_undecoded(self, conn: _Conn) -> None:
        """Count the connection under its reason now (HTTP/2 refined to gRPC moves it)."""
        if conn.undecoded is not None:
            self.undecoded[conn.undecoded.value] -= 1
        conn.undecoded = conn.decoder.undecoded
        if conn.undecoded is not None:
            self.undecoded[conn.undecoded.value] = self.undecoded.get(conn.undecoded.value, 0) + 1

    def _end(self, conn: _Conn, ts_ns: int) -> list[CapturedCall]:
        out = self._flush(conn, Direction.REQUEST, ts_ns) + self._flush(conn, Direction.RESPONSE, ts_ns)
        out += self._wrap(conn, conn.decoder.close(ts_ns))
        if conn.decoder.undecoded is not conn.undecoded:
            self._count_undecoded(conn)
        self.undecoded_bytes += conn.decoder.counters.undecoded_bytes
        return out

    def expire(self, now_ns: int) -> list[CapturedCall]:
        """Close decoders idle for longer than idle_ns (a socket whose close the kernel never reported)."""
        out: list[CapturedCall] = []
        for cookie in [k for k, v in self._conns.items() if now_ns - v.last_ns > self._idle_ns]:
            conn = self._conns.pop(cookie)
            out.extend(self._end(conn, now_ns))
        return out

    @staticmethod
    def _wrap(conn: _Conn, recs: list[ModelCallRecord]) -> list[CapturedCall]:
        return [CapturedCall(r, int(r.conn_key), conn.pid, conn.src_id, conn.dst_id, conn.actual_dst_id, *conn.server)
                for r in recs]


def status_class(status: Optional[int]) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


def model_call_json(call: CapturedCall, names: Mapping[int, str], wall: Callable[[int], str]) -> dict:
    """One JSON line for the records log: the record's fields, plus who called whom."""
    r = call.record
    out = {"kind": "model_call", "time": wall(r.start_ns),
           "source": {"name": names.get(call.src_id, f"id:{call.src_id}"), "pid": call.pid},
           "destination": {"name": names.get(call.dst_id, f"id:{call.dst_id}")},
           "actual": {"name": names.get(call.actual_dst_id, f"id:{call.actual_dst_id}")},
           "cookie": call.cookie}
    for f in r.__dataclass_fields__:
        if f == "conn_key":
            continue
        v = getattr(r, f)
        out[f] = v.value if hasattr(v, "value") else list(v) if isinstance(v, tuple) else v
    return out
