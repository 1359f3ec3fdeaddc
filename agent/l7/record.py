"""Model-call records, and the per-connection decoder that makes them from captured bytes. Pure.

`ConnectionDecoder` is the one entry point for the capture: one per connection, fed `(direction, ts_ns, bytes)` in
order, returning the `ModelCallRecord`s those bytes completed. Requests and responses are paired by connection and
by their order on it (HTTP/1.1 keep-alive is strictly sequential), never by thread: an async client multiplexes many
connections on one thread, and that is why the decoder is per connection.

Content (prompt and completion text) is captured only when asked for, up to a cap, and every redaction rule — the
built-in ones for API keys, bearer tokens and e-mail addresses, then the caller's — is applied here, before the record
exists, so unredacted text never leaves the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable

from agent.l7.http1 import (DEFAULT_BODY_CAP, Body, Direction, Http1Connection, HttpEvent, MessageEnd, RequestHead,
                            ResponseHead, Undecoded, UndecodedReason, header)
from agent.l7.endpoints import target_model
from agent.l7.llm import (TEXT_MARGIN, Operation, Protocol, RequestInfo, RequestScan, ResponseInfo, ResponseParse,
                          classify)
from agent.l7.redact import Redaction, compile_redaction

DEFAULT_CONTENT_CAP = 16 << 10     # characters of prompt and of completion text kept when capture is on
REDACTED = "[REDACTED]"

# RE2 (agent/l7/redact.py): the text is the workload's, so matching must be linear in it
BUILTIN_REDACTIONS: tuple[Redaction, ...] = (
    compile_redaction(r"sk-ant-[A-Za-z0-9_\-]{8,}"),                                  # Anthropic keys
    compile_redaction(r"sk-[A-Za-z0-9_\-]{16,}"),                                     # OpenAI keys (sk-, sk-proj-, ...)
    compile_redaction(r"(?i)\bbearer\s+[A-Za-z0-9._~+/\-]{8,}=*"),                    # bearer tokens
    compile_redaction(r"\bAKIA[0-9A-Z]{16}\b"),                                       # AWS access key ids
    compile_redaction(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"),  # e-mail addresses
)


@dataclass(frozen=True, slots=True)
class ModelCallRecord:
    conn_key: Hashable                  # the caller's connection key (the socket cookie joins it to its flow)
    sequence: int                       # 0-based HTTP request number on the connection (LLM or not)
    start_ns: int                       # kernel time of the request's first byte
    protocol: Protocol
    operation: Operation
    request_model: str | None
    response_model: str | None
    stream: bool                        # the request asked for a stream (Ollama's default counted)
    status: int | None                  # None: no response head seen
    error_type: str | None              # the API's error type (error.type / error.code), else http_<status> for >= 400
    input_tokens: int | None            # None: not reported, or the stream was cut
    output_tokens: int | None
    cached_tokens: int | None
    time_to_first_chunk_ns: int | None  # request start -> first response event (streams) / first body byte (JSON)
    duration_ns: int | None             # request start -> last response byte
    time_per_output_chunk_ns: int | None   # mean gap between stream events after the first
    output_chunks: int
    finish_reasons: tuple[str, ...]
    request_bytes: int                  # on the wire, head included (with the holes the capture missed)
    response_bytes: int
    tls: bool                           # the bytes came from the TLS uprobes (set by the caller)
    truncated: bool                     # a body went past the capture cap, or could not be decoded
    incomplete: bool                    # the response ended (or the connection did) before the protocol's end
    confidence_mean: float | None       # mean token probability, when the response carried logprobs
    confidence_min: float | None
    request_digest: str                 # sha256 (hex) of the request body
    max_tokens: int | None
    temperature: float | None
    include_usage: bool | None
    prompt_text: str | None = None      # only with capture_content, redacted, up to the content cap
    completion_text: str | None = None
    # the node gateway's judgement (issue 10); a captured call keeps these defaults
    gateway: bool = False               # the call went through the node's L7 gateway (the gateway made the record)
    policy: str | None = None           # the policy that decided ("policies[i]"); None: none matched
    sent_model: str | None = None       # the model sent upstream (differs from request_model after a sunset rewrite)
    decision: str | None = None         # served | refused | would_deny (audit: served, enforce would have refused)
    reason: str | None = None           # why it was refused / would be / was rewritten
    choice_count: int | None = None     # the request's n (gen_ai.request.choice.count); None: not named
    response_id: str | None = None      # the completion's id (gen_ai.response.id)


@dataclass(frozen=True, slots=True)
class DecoderOptions:
    """How one destination's connections are decoded (from its identity's `llm:` and the global `llm:` section)."""
    capture_content: bool = False
    redact: tuple[Redaction, ...] = ()         # beside BUILTIN_REDACTIONS, which always apply
    content_cap: int = DEFAULT_CONTENT_CAP
    protocol: Protocol | None = None           # None: auto

    def decoder(self, conn_key: Hashable, *, tls: bool = False) -> "ConnectionDecoder":
        return ConnectionDecoder(conn_key, self.capture_content, self.redact, tls=tls, content_cap=self.content_cap,
                                 protocol=self.protocol)


@dataclass(frozen=True, slots=True)
class DecoderCounters:
    http_requests: int          # HTTP/1.1 requests seen
    llm_calls: int              # of which records were made
    other_requests: int         # HTTP requests that were not LLM calls (path or body shape)
    undecoded: UndecodedReason | None
    undecoded_bytes: int


class _Call:
    """One request in flight on the connection: its scan, then its response."""

    def __init__(self, seq: int, head: RequestHead, kind: tuple[Protocol, Operation] | None, capture: bool,
                 cap: int) -> None:
        self.seq = seq
        self.head = head
        self.kind = kind
        self.scan = RequestScan(kind[0], kind[1], capture, cap) if kind else None
        # the model the path or query names: the upstream uses it over the body's (agent/l7/endpoints.py)
        self.target_model = target_model(head.method, head.target) if kind else None
        self.request: RequestInfo | None = None
        self.request_bytes = 0
        self.request_truncated = False
        self.status: int | None = None
        self.resp: ResponseParse | None = None
        self.resp_start: int | None = None


class ConnectionDecoder:
    """Captured bytes of one connection -> ModelCallRecords. Never raises on what the connection carries."""

    def __init__(self, conn_key: Hashable, capture_content: bool = False, redact: Iterable[str | Redaction] = (),
                 *, tls: bool = False, body_cap: int = DEFAULT_BODY_CAP, content_cap: int = DEFAULT_CONTENT_CAP,
                 protocol: Protocol | None = None) -> None:
        """protocol: only this protocol's calls are recorded (an identity's `llm.protocol`); None: any (auto)."""
        self.conn_key = conn_key
        self._protocol = protocol
        self._capture = capture_content
        self._redact = BUILTIN_REDACTIONS + tuple(compile_redaction(r) if isinstance(r, str) else r for r in redact)
        self._tls = tls
        self._content_cap = content_cap
        self._http = Http1Connection(body_cap=body_cap)
        self._calls: list[_Call] = []        # requests in order; [0] is the one whose response comes next
        self._seq = 0
        self._req_start: int | None = None   # first byte of the request being read
        self._llm = 0
        self._other = 0

    @property
    def counters(self) -> DecoderCounters:
        return DecoderCounters(self._http.requests, self._llm, self._other, self._http.undecoded,
                               self._http.undecoded_bytes)

    @property
    def undecoded(self) -> UndecodedReason | None:
        """Why the connection is no longer decoded (cheap: read after every chunk by the capture tracker)."""
        return self._http.undecoded

    def feed(self, direction: Direction, ts_ns: int, data: bytes) -> list[ModelCallRecord]:
        if direction is Direction.REQUEST and self._req_start is None and data:
            self._req_start = ts_ns
        return self._handle(self._http.feed(direction, ts_ns, data))

    def gap(self, direction: Direction, ts_ns: int, n: int) -> list[ModelCallRecord]:
        """Up to `n` bytes of `direction` were not captured (see Http1Connection.gap); the call is marked truncated."""
        return self._handle(self._http.gap(direction, ts_ns, n))

    def close(self, ts_ns: int) -> list[ModelCallRecord]:
        """The connection ended: what was in flight becomes an incomplete record."""
        out = self._handle(self._http.close(ts_ns))
        while self._calls:
            out.extend(self._finish(self._calls.pop(0), ts_ns, None))
        return out

    # -- events --------------------------------------------------------------------------------------------------
    def _handle(self, events: list[HttpEvent]) -> list[ModelCallRecord]:
        out: list[ModelCallRecord] = []
        for ev in events:
            if isinstance(ev, RequestHead):
                start = self._req_start if self._req_start is not None else ev.ts_ns
                head = RequestHead(start, ev.method, ev.target, ev.headers)
                kind = classify(ev.method, ev.target)
                if kind is not None and self._protocol is not None and kind[0] is not self._protocol:
                    kind = None      # another protocol's path on a destination configured for one: not a call
                self._calls.append(_Call(self._seq, head, kind, self._capture,
                                         self._content_cap))
                self._seq += 1
            elif isinstance(ev, Body):
                call = self._current(ev.direction)
                if call is None:
                    continue
                if ev.direction is Direction.REQUEST:
                    if call.scan is not None:
                        call.scan.feed(ev.data)
                elif call.resp is not None:
                    call.resp.feed(ev.ts_ns, ev.data)
            elif isinstance(ev, ResponseHead):
                call = self._current(Direction.RESPONSE)
                if call is None:
                    continue
                call.status = ev.status
                call.resp_start = ev.ts_ns
                if call.kind is not None:
                    call.resp = ResponseParse(call.kind[0], call.kind[1], ev.status,
                                              header(ev.headers, "content-type"), self._capture, self._content_cap)
            elif isinstance(ev, MessageEnd):
                if ev.direction is Direction.REQUEST:
                    self._req_start = None
                    call = self._current(Direction.REQUEST)
                    if call is not None and call.request is None:
                        self._end_request(call, ev)
                elif self._calls:
                    out.extend(self._finish(self._calls.pop(0), ev.ts_ns, ev))
            elif isinstance(ev, Undecoded):
                # nothing more comes on this connection: the calls in flight end here, incomplete
                while self._calls:
                    out.extend(self._finish(self._calls.pop(0), ev.ts_ns, None))
        return out

    def _current(self, d: Direction) -> _Call | None:
        if not self._calls:
            return None
        if d is Direction.RESPONSE:
            return self._calls[0]
        return self._calls[-1]

    def _end_request(self, call: _Call, ev: MessageEnd) -> None:
        call.request_bytes = ev.wire_bytes
        call.request_truncated = ev.truncated_bytes > 0 or ev.encoding_unsupported is not None
        if call.scan is not None:
            call.request = call.scan.finish()
            call.scan = None

    def _finish(self, call: _Call, ts_ns: int, end: MessageEnd | None) -> list[ModelCallRecord]:
        if call.request is None and call.scan is not None:    # the request itself was cut
            call.request = call.scan.finish()
            call.scan = None
            call.request_truncated = True
        req = call.request
        # an API path whose JSON body was cut (by the capture or the close) before its "model" is still a call
        llm = req is not None and (req.is_llm or (call.request_truncated and req.json_object)
                                   or (call.target_model is not None and req.json_object))
        if call.kind is None or req is None or not llm:
            self._other += 1
            return []
        self._llm += 1
        complete = end is not None and end.complete
        resp: ResponseInfo | None = call.resp.finish(ts_ns, complete) if call.resp is not None else None
        start = call.head.ts_ns
        ttfc = resp.first_chunk_ns - start if resp is not None and resp.first_chunk_ns is not None else None
        tpoc = None
        if resp is not None and resp.streamed and resp.chunks > 1 and resp.first_chunk_ns is not None \
                and resp.last_chunk_ns is not None:
            tpoc = (resp.last_chunk_ns - resp.first_chunk_ns) // (resp.chunks - 1)
        truncated = call.request_truncated or req.prompt_cut or (
            end is not None and (end.truncated_bytes > 0 or end.encoding_unsupported is not None)) or (
            resp is not None and (resp.completion_cut or resp.event_bytes_dropped > 0))
        rec = ModelCallRecord(
            conn_key=self.conn_key, sequence=call.seq, start_ns=start,
            protocol=call.kind[0], operation=call.kind[1],
            request_model=call.target_model if call.target_model is not None else req.model,
            response_model=resp.model if resp else None, stream=req.stream, status=call.status,
            error_type=resp.error_type if resp else None,
            input_tokens=resp.input_tokens if resp else None, output_tokens=resp.output_tokens if resp else None,
            cached_tokens=resp.cached_tokens if resp else None,
            time_to_first_chunk_ns=ttfc, duration_ns=ts_ns - start if call.status is not None else None,
            time_per_output_chunk_ns=tpoc, output_chunks=resp.chunks if resp else 0,
            finish_reasons=resp.finish_reasons if resp else (), request_bytes=call.request_bytes,
            response_bytes=end.wire_bytes if end is not None else 0, tls=self._tls, truncated=bool(truncated),
            incomplete=resp is None or not resp.complete,
            confidence_mean=resp.confidence_mean if resp else None,
            confidence_min=resp.confidence_min if resp else None, request_digest=req.digest,
            max_tokens=req.max_tokens, temperature=req.temperature, include_usage=req.include_usage,
            prompt_text=self._clean(req.prompt_text),
            completion_text=self._clean(resp.completion_text if resp else None), choice_count=req.choice_count,
            response_id=resp.response_id if resp else None)
        return [rec]

    def _clean(self, text: str | None) -> str | None:
        """Redact the whole kept text (cap + margin), then cut it to the cap: a secret on the edge is caught whole."""
        if text is None or not self._capture:
            return None
        text = text[: self._content_cap + TEXT_MARGIN]   # bounds each call's redaction time, whoever built the text
        for rx in self._redact:
            text = rx.sub(REDACTED, text)
        return text[: self._content_cap]


__all__ = ["BUILTIN_REDACTIONS", "ConnectionDecoder", "DecoderCounters", "Direction", "ModelCallRecord",
           "UndecodedReason"]
