"""LLM API calls inside HTTP messages: which protocol, which model, how many tokens, how it ended. Pure, incremental.

Recognition is by method, path and body shape, never by host: a POST whose path ends in one of the known API paths
(`classify`) and whose body is a JSON object with a top-level string `model` (Ollama's are the same shape). A
self-hosted vLLM, TGI, llama.cpp server or gateway is recognised exactly like the hosted APIs.

Request bodies are scanned as they arrive with ijson (an incremental JSON parser over the yajl2 C library, push
interface `parse_coro`): we see the parser's events, keep the few top-level scalars we want (`model`, `stream`,
`max_tokens`, `max_completion_tokens`, `stream_options.include_usage`, `temperature`) and drop the rest at once, so a
200 KB `messages` array is never held — openai-python serialises `model` after it. ijson rather than our own tokenizer:
JSON strings, escapes, numbers and nesting are exactly what a hand-written scanner gets subtly wrong, and yajl is fast.
One JSON string token is buffered by the parser until it ends; the HTTP layer's per-message cap bounds that too.

Responses are read in the shape the Content-Type announces: a JSON body (scanned with ijson as well: an embeddings
response is a long array of floats), SSE (`data:` lines, OpenAI's `[DONE]`, Anthropic's `event:` + `message_start`,
`message_delta`, `message_stop`, the Responses API's `response.completed`) or NDJSON (Ollama, ending in `"done": true`).
Every JSON leaf is reduced to its ijson-style path (`usage.prompt_tokens`, `choices.item.finish_reason`) and one table,
`_absorb`, knows what each path means in any of the protocols. A stream without its terminal event is incomplete: its
output token count is unknown (None), never a made-up zero.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import ijson


class Protocol(str, enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


class Operation(str, enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"


# path suffix -> (protocol, operation); longest suffix first so "/chat/completions" wins over "/completions"
_PATHS: tuple[tuple[str, Protocol, Operation], ...] = (
    ("/v1/chat/completions", Protocol.OPENAI, Operation.CHAT),
    ("/chat/completions", Protocol.OPENAI, Operation.CHAT),           # Azure deployments, gateways with prefixes
    ("/v1/completions", Protocol.OPENAI, Operation.COMPLETION),
    ("/completions", Protocol.OPENAI, Operation.COMPLETION),          # /engines/{model}/completions, no /v1
    ("/v1/embeddings", Protocol.OPENAI, Operation.EMBEDDINGS),
    ("/embeddings", Protocol.OPENAI, Operation.EMBEDDINGS),
    ("/v1/responses", Protocol.OPENAI, Operation.RESPONSES),
    ("/v1/messages", Protocol.ANTHROPIC, Operation.MESSAGES),
    ("/api/chat", Protocol.OLLAMA, Operation.CHAT),
    ("/api/generate", Protocol.OLLAMA, Operation.COMPLETION),
    ("/api/embed", Protocol.OLLAMA, Operation.EMBEDDINGS),
    ("/api/embeddings", Protocol.OLLAMA, Operation.EMBEDDINGS),
)

TEXT_MARGIN = 512     # text kept beyond the cap so that redaction sees a secret that straddles it whole


def classify(method: str, target: str) -> tuple[Protocol, Operation] | None:
    """The API a request line names, or None. The body still has to have the shape (`RequestScan.is_llm`)."""
    if method != "POST":
        return None
    path = target.split("?", 1)[0].rstrip("/")
    for suffix, proto, op in _PATHS:
        if path.endswith(suffix):
            return proto, op
    return None


class _Text:
    """Text pieces joined up to cap + margin; the rest is dropped (and flagged)."""

    def __init__(self, cap: int) -> None:
        self._limit = cap + TEXT_MARGIN
        self._parts: list[str] = []
        self._size = 0
        self.cut = False
        self.seen_bytes = 0      # UTF-8 bytes of every piece offered, kept or not (the gateway's usage estimate)

    def add(self, s: str) -> None:
        self.seen_bytes += len(s.encode("utf-8", "surrogatepass"))
        if self._size >= self._limit:
            self.cut = self.cut or bool(s)
            return
        room = self._limit - self._size
        if len(s) > room:
            s, self.cut = s[:room], True
        self._parts.append(s)
        self._size += len(s)

    def value(self) -> str | None:
        return "".join(self._parts) if self._parts else None


_PROMPT_PATHS = frozenset({
    "messages.item.content", "messages.item.content.item.text", "prompt", "prompt.item", "system",
    "system.item.text", "instructions", "input", "input.item", "input.item.content", "input.item.content.item.text",
})


@dataclass(frozen=True, slots=True)
class RequestInfo:
    is_llm: bool                  # the body is a JSON object with a top-level string "model"
    json_object: bool             # the body starts as a JSON object (what a request cut before its "model" shows)
    model: str | None
    stream: bool
    max_tokens: int | None        # the largest of max_tokens, max_completion_tokens, max_output_tokens, num_predict
    include_usage: bool | None    # stream_options.include_usage
    temperature: float | None
    digest: str                   # sha256 of the body bytes seen (hex)
    body_bytes: int
    prompt_text: str | None       # only when asked for; not yet redacted, up to cap + TEXT_MARGIN
    prompt_cut: bool
    choice_count: int | None = None   # n (OpenAI): candidate completions asked for; None: not named


class RequestScan:
    """A request body fed in pieces; `finish` says what it asked for."""

    def __init__(self, protocol: Protocol, operation: Operation, capture_text: bool, text_cap: int) -> None:
        self._proto, self._op = protocol, operation
        self._events = ijson.sendable_list()
        self._coro: Any = ijson.parse_coro(self._events, use_float=True)
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._first = True
        self._object = False
        self._broken = False
        self._top: dict[str, Any] = {}
        self._text = _Text(text_cap) if capture_text else None

    def feed(self, data: bytes) -> None:
        self._hash.update(data)
        self._bytes += len(data)
        if self._broken:
            return
        try:
            self._coro.send(data)
        except ijson.JSONError:
            self._broken = True
        self._take()

    def _take(self) -> None:
        for prefix, event, value in self._events:
            if self._first:
                self._first = False
                self._object = event == "start_map"
            if event in ("string", "number", "boolean") and prefix in _WANTED:
                self._top.setdefault(prefix, value)
            if self._text is not None and event == "string" and prefix in _PROMPT_PATHS:
                self._text.add(value if not self._text.value() else "\n" + value)
        del self._events[:]

    def finish(self) -> RequestInfo:
        if not self._broken:
            try:
                self._coro.close()
            except ijson.JSONError:
                self._broken = True
            self._take()
        t = self._top
        model = t.get("model")
        if not isinstance(model, str):
            model = None
        stream = t.get("stream")
        if not isinstance(stream, bool):   # Ollama streams unless told not to; the others do not unless told to
            stream = self._proto is Protocol.OLLAMA and self._op in (Operation.CHAT, Operation.COMPLETION)
        # the largest limit named, as the gateway judges it (agent/gateway/limits.py): servers read different fields
        mt = max((t[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens", "options.num_predict")
                  if isinstance(t.get(k), (int, float)) and not isinstance(t.get(k), bool)), default=None)
        iu = t.get("stream_options.include_usage")
        temp = t.get("temperature", t.get("options.temperature"))
        n = t.get("n")
        return RequestInfo(
            is_llm=self._object and model is not None, json_object=self._object, model=model, stream=stream,
            max_tokens=int(mt) if mt is not None else None,
            include_usage=iu if isinstance(iu, bool) else None,
            temperature=float(temp) if isinstance(temp, (int, float)) and not isinstance(temp, bool) else None,
            digest=self._hash.hexdigest(), body_bytes=self._bytes,
            prompt_text=self._text.value() if self._text else None, prompt_cut=bool(self._text and self._text.cut),
            choice_count=int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n == int(n) else None)


_WANTED = frozenset({"model", "stream", "max_tokens", "max_completion_tokens", "max_output_tokens",
                     "options.num_predict", "stream_options.include_usage", "temperature", "options.temperature",
                     "n"})


class _Shape(enum.Enum):
    JSON = "json"
    SSE = "sse"
    NDJSON = "ndjson"


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    finish_reasons: tuple[str, ...]
    error_type: str | None
    streamed: bool                  # the body was SSE or NDJSON
    complete: bool                  # the body ended as its protocol ends (JSON closed, [DONE], message_stop, done)
    first_chunk_ns: int | None      # timestamp of the first body byte (JSON) or first event (streams)
    last_chunk_ns: int | None
    chunks: int                     # events of a stream; 1 for a JSON body
    confidence_mean: float | None   # mean of exp(logprob) over output tokens
    confidence_min: float | None
    completion_text: str | None
    completion_cut: bool
    event_bytes_dropped: int        # stream events over the per-event bound, skipped
    text_bytes: int = 0             # UTF-8 bytes of all output text (with capture_text; beyond the cap too)
    response_id: str | None = None  # the completion's id (chatcmpl-..., msg_..., resp_...): the first one seen


_MAX_EVENT = 1 << 20   # one SSE event / NDJSON line; longer ones are skipped and counted

_TERMINAL_TYPES = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed"})

# leaf path -> what it is, for every protocol at once; paths are ijson's (list elements are "item")
_MODEL = frozenset({"model", "message.model", "response.model"})
_ID = frozenset({"id", "message.id", "response.id"})      # chat/completions/Anthropic JSON, message_start, Responses
_INPUT = frozenset({"usage.prompt_tokens", "usage.input_tokens", "message.usage.input_tokens",
                    "response.usage.input_tokens", "prompt_eval_count"})
_OUTPUT = frozenset({"usage.completion_tokens", "usage.output_tokens", "message.usage.output_tokens",
                     "response.usage.output_tokens", "eval_count"})
_CACHED = frozenset({"usage.prompt_tokens_details.cached_tokens", "usage.input_tokens_details.cached_tokens",
                     "response.usage.input_tokens_details.cached_tokens", "usage.cache_read_input_tokens",
                     "message.usage.cache_read_input_tokens"})
_FINISH_APPEND = frozenset({"choices.item.finish_reason", "stop_reason", "delta.stop_reason", "done_reason"})
_FINISH_SET = frozenset({"status", "response.status"})    # the Responses API: last one wins
_LOGPROB = frozenset({"choices.item.logprobs.content.item.logprob", "choices.item.logprobs.token_logprobs.item",
                      "output.item.content.item.logprobs.item.logprob", "logprobs.item.logprob",
                      "logprobs.content.item.logprob"})
_COMPLETION = frozenset({"choices.item.message.content", "choices.item.delta.content", "choices.item.text",
                         "content.item.text", "delta.text", "output.item.content.item.text", "message.content",
                         "response"})


class ResponseParse:
    """A response body fed in pieces with their timestamps; `finish` says what came back."""

    def __init__(self, protocol: Protocol, operation: Operation, status: int, content_type: str | None,
                 capture_text: bool, text_cap: int) -> None:
        self._proto, self._op, self._status = protocol, operation, status
        ct = (content_type or "").split(";", 1)[0].strip().lower()
        self._shape: _Shape | None = (_Shape.SSE if ct == "text/event-stream" else
                                      _Shape.NDJSON if ct in ("application/x-ndjson", "application/jsonl",
                                                              "application/ndjson") else
                                      _Shape.JSON if ct.endswith("json") else None)
        self._events = ijson.sendable_list()
        self._coro: Any = None
        self._json_broken = False
        self._line = bytearray()
        self._skipping = False
        self._sse_event = ""
        self._sse_data: list[str] = []
        self._dropped = 0
        self._terminal = False
        self._model: str | None = None
        self._id: str | None = None
        self._in: int | None = None
        self._out: int | None = None
        self._cached: int | None = None
        self._finish: list[str] = []
        self._error: str | None = None
        self._first: int | None = None
        self._last: int | None = None
        self._chunks = 0
        self._lp_n = 0
        self._lp_sum = 0.0
        self._lp_min: float | None = None
        self._text = _Text(text_cap) if capture_text else None
        self._trie = _TRIE if capture_text else _TRIE_NO_TEXT   # without text capture the text paths do nothing
        self._etype = ""

    # -- feeding -------------------------------------------------------------------------------------------------
    def feed(self, ts_ns: int, data: bytes) -> None:
        if not data:
            return
        if self._shape is None:    # no usable Content-Type: look at the first byte
            head = data.lstrip()[:6]
            self._shape = (_Shape.SSE if head.startswith((b"data:", b"event:", b":")) else
                           _Shape.NDJSON if self._proto is Protocol.OLLAMA else _Shape.JSON)
        if self._shape is _Shape.JSON:
            if self._first is None:
                self._first = ts_ns
                self._chunks = 1
            self._last = ts_ns
            self._feed_json(data)
        else:
            self._feed_lines(ts_ns, data)

    def _feed_json(self, data: bytes) -> None:
        if self._json_broken:
            return
        if self._coro is None:
            self._coro = ijson.parse_coro(self._events, use_float=True)
        try:
            self._coro.send(data)
        except ijson.JSONError:
            self._json_broken = True
        self._take_json()

    def _take_json(self) -> None:
        for prefix, event, value in self._events:
            if event in ("string", "number", "boolean"):
                self._absorb(prefix, value)
        del self._events[:]

    def _feed_lines(self, ts_ns: int, data: bytes) -> None:
        lines = data.split(b"\n")
        rest = lines.pop()      # what follows the last newline (b"" when the piece ends with one)
        on_line = self._on_line
        sse = self._shape is _Shape.SSE
        for piece in lines:
            if self._skipping:
                self._dropped += len(piece) + 1
                self._skipping = False
                continue
            if self._line:
                self._line += piece
                line = bytes(self._line)
                self._line.clear()
            else:
                line = piece
            line = line.rstrip(b"\r")
            if sse and line.startswith(b"data: "):      # _on_line's common case, without the call
                self._sse_data.append(line[6:].decode("utf-8", "replace"))
            elif sse and not line and len(self._sse_data) == 1:     # and the blank line after one data line
                self._on_event(ts_ns, self._sse_event, self._sse_data.pop())
                self._sse_event = ""
            else:
                on_line(ts_ns, line)
        if self._skipping:
            self._dropped += len(rest)
        elif len(self._line) + len(rest) > _MAX_EVENT:
            self._dropped += len(self._line) + len(rest)
            self._line.clear()
            self._skipping = True
        elif rest:
            self._line += rest

    def _on_line(self, ts_ns: int, line: bytes) -> None:
        if self._shape is _Shape.NDJSON:
            text = line.decode("utf-8", "replace")
            if text.strip():
                self._on_event(ts_ns, "", text)
            return
        if not line:                                   # blank line: dispatch the event
            if self._sse_data:
                data = self._sse_data
                self._on_event(ts_ns, self._sse_event, data[0] if len(data) == 1 else "\n".join(data))
                data.clear()
            self._sse_event = ""
            return
        if line.startswith(b"data: "):                 # the common field, spelled the common way
            self._sse_data.append(line[6:].decode("utf-8", "replace"))
            return
        if line.startswith(b":"):
            return                                     # comment / keep-alive
        field, _, value = line.decode("utf-8", "replace").partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._sse_data.append(value)
        elif field == "event":
            self._sse_event = value

    def _on_event(self, ts_ns: int, event: str, data: str) -> None:
        if "[DONE]" in data and data.strip() == "[DONE]":
            self._terminal = True
            return
        if self._first is None:
            self._first = ts_ns
        self._last = ts_ns
        self._chunks += 1
        try:
            obj = _loads(data)
        except ValueError:
            return
        if type(obj) is not dict:
            return
        etype = obj.get("type") if isinstance(obj.get("type"), str) else event
        self._etype = etype
        if etype in _TERMINAL_TYPES or obj.get("done") is True:
            self._terminal = True
        if etype == "error" and self._error is None:
            err = obj.get("error")
            self._error = (err.get("type") if isinstance(err, dict) and isinstance(err.get("type"), str)
                           else "error")
        self._absorb_tree(obj, self._trie)

    def _absorb_tree(self, obj: Any, node: dict) -> None:
        """_absorb every leaf of a parsed event whose path `_absorb` can use, in document order: the walk follows
        only keys in _TRIE (every path _absorb reads, spelled as ijson spells them), so the rest of the event costs
        one dict lookup per key at the levels it shares with them (see _leaves: the same leaves, the same order;
        nulls, which _absorb ignores, are skipped)."""
        get = node.get
        for k, v in obj.items():
            step = get(k)
            if step is None:
                continue
            path, child = step
            if isinstance(v, dict):
                if child:
                    self._absorb_tree(v, child)
            elif isinstance(v, list):
                item = child.get("item") if child else None
                if item is not None:
                    self._absorb_items(v, item)
            elif path is not None and v is not None:    # _absorb does nothing with null
                self._absorb(path, v)

    def _absorb_items(self, items: list, step: tuple) -> None:
        # The same per-value dispatch as _absorb_tree's loop, inlined in both on purpose: a shared method per value
        # costs ~3% of bench.decode_micro's tracker stage (one call per matched key of every SSE event).
        path, child = step
        for v in items:
            if isinstance(v, dict):
                if child:
                    self._absorb_tree(v, child)
            elif isinstance(v, list):
                item = child.get("item") if child else None
                if item is not None:
                    self._absorb_items(v, item)
            elif path is not None and v is not None:    # _absorb does nothing with null
                self._absorb(path, v)

    # -- what the leaves mean ------------------------------------------------------------------------------------
    def _absorb(self, path: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if path in _LOGPROB:
                p = math.exp(min(float(value), 0.0))
                self._lp_n += 1
                self._lp_sum += p
                self._lp_min = p if self._lp_min is None else min(self._lp_min, p)
            elif path in _OUTPUT:
                self._out = int(value)
            elif path in _INPUT:
                self._in = int(value)
            elif path in _CACHED:
                self._cached = int(value)
            return
        if not isinstance(value, str):
            return
        if path in _MODEL:
            self._model = value
        elif path in _ID:
            if self._id is None and self._shape is not None and (self._op is not Operation.EMBEDDINGS):
                self._id = value[:128]      # ids are short; the collector caps names at 253
        elif path in _FINISH_APPEND:
            self._finish.append(value)
        elif path in _FINISH_SET and self._op is Operation.RESPONSES:
            self._finish = [value]
        elif path in ("error.type", "error.code") or (path == "error" and self._proto is Protocol.OLLAMA):
            if self._error is None or path == "error.type":
                self._error = value if path != "error" else "error"
        elif self._text is not None:
            if path in _COMPLETION and not (path == "response" and self._proto is not Protocol.OLLAMA):
                self._text.add(value)
            elif path == "delta" and self._etype == "response.output_text.delta":
                self._text.add(value)

    # -- the end -------------------------------------------------------------------------------------------------
    def finish(self, ts_ns: int, body_complete: bool) -> ResponseInfo:
        complete = body_complete
        if self._shape is _Shape.JSON or self._shape is None:
            if self._coro is not None and not self._json_broken:
                try:
                    self._coro.close()
                except ijson.JSONError:
                    self._json_broken = True
                self._take_json()
            complete = complete and self._coro is not None and not self._json_broken
        else:
            if self._line and not self._skipping:       # a last line without its newline
                line, self._line = bytes(self._line), bytearray()
                self._on_line(ts_ns, line.rstrip(b"\r"))
            if self._shape is _Shape.SSE and self._sse_data:
                self._on_event(ts_ns, self._sse_event, "\n".join(self._sse_data))
                self._sse_data = []
            # the protocol's terminal event ends a stream: a client stops reading there ([DONE]), and the body's last
            # chunk that follows may never be read (over TLS it is a record of its own)
            complete = self._terminal
        error = self._error
        if error is None and self._status >= 400:
            error = f"http_{self._status}"
        out_tokens = self._out if complete else None
        in_tokens = self._in if complete or self._proto is Protocol.ANTHROPIC else None   # message_start's is real
        return ResponseInfo(
            model=self._model, input_tokens=in_tokens, output_tokens=out_tokens,
            cached_tokens=self._cached if in_tokens is not None else None,
            finish_reasons=tuple(self._finish), error_type=error,
            streamed=self._shape in (_Shape.SSE, _Shape.NDJSON), complete=complete,
            first_chunk_ns=self._first, last_chunk_ns=self._last, chunks=self._chunks,
            confidence_mean=self._lp_sum / self._lp_n if self._lp_n else None, confidence_min=self._lp_min,
            completion_text=self._text.value() if self._text else None,
            completion_cut=bool(self._text and self._text.cut), event_bytes_dropped=self._dropped,
            text_bytes=self._text.seen_bytes if self._text else 0, response_id=self._id)


_SCAN = json.JSONDecoder().scan_once
_JSON_SPACE = " \t\n\r"


def _loads(s: str) -> Any:
    """json.loads(s), without its wrappers for the common case (a value with nothing after it): the same C scanner
    json.loads ends in. Anything else (leading space, trailing text, invalid) goes to json.loads itself."""
    try:
        obj, end = _SCAN(s, 0)
    except StopIteration:
        return json.loads(s)
    if end != len(s) and s[end:].strip(_JSON_SPACE):
        return json.loads(s)    # raises "Extra data" as it always did
    return obj


def _trie(paths: frozenset[str]) -> dict:
    """{key: (the path if it ends here else None, {next key: ...})} for ijson-style paths ("a.item.b")."""
    root: dict = {}
    for p in sorted(paths):
        node, parts = root, p.split(".")
        for i, part in enumerate(parts):
            here, child = node.get(part, (None, {}))
            if i == len(parts) - 1:
                here = p
            node[part] = (here, child)
            node = child
    return root


# every leaf path _absorb looks at
_ABSORBED = (_MODEL | _ID | _INPUT | _OUTPUT | _CACHED | _FINISH_APPEND | _FINISH_SET | _LOGPROB | _COMPLETION
             | {"error", "error.type", "error.code", "delta"})
_TRIE = _trie(_ABSORBED)
_TRIE_NO_TEXT = _trie(_ABSORBED - _COMPLETION - {"delta"})   # _absorb reads these only to capture text


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(path, scalar) for every leaf, paths spelled as ijson spells them."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        p = f"{prefix}.item" if prefix else "item"
        for v in obj:
            yield from _leaves(v, p)
    else:
        yield prefix, obj
