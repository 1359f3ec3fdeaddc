"""A local model server speaking the real wire formats of OpenAI, Anthropic and Ollama, recording every byte.

The tests' server (tests/llm_server.py imports it) and the demo's model servers (agent/demo/workloads.py).
Bound to 127.0.0.1, on an ephemeral port unless given one (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive), plaintext
or TLS (an ssl.SSLContext; the handshake runs in the connection's thread). With `record=True` (the tests) every
connection's bytes are logged in order, as (direction, monotonic ns, bytes) — what the server read is the request
direction, what it wrote the response direction: exactly what the kernel capture will hand ConnectionDecoder — and
`calls` says what the server answered; `on_call` hears of each call either way (the demo prints a line per call).

Who answers is a `Persona`: the tests' (`TestPersona`) names the served model `<requested>-served` and replies with
WORDS; the demo's (`ModelPersona`) serves one model id whatever was asked and says which model and version answered.

Wire behaviour, like the hosted APIs: JSON bodies gzip'd when the client accepts it (api.openai.com does); SSE in chunked
transfer (OpenAI `data:` + `[DONE]`, a usage chunk when `stream_options.include_usage`; Anthropic `event:`/`data:`;
Responses API events); NDJSON for Ollama; logprobs when asked. Magic model names: `error-400`, `error-404`, `error-500`
answer with the protocol's JSON error; `cut-stream` sends part of the body and closes the connection.
"""
from __future__ import annotations

import base64
import gzip
import json
import socket
import struct
import threading
import time
import ssl
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol

from agent.l7.http1 import Direction

WORDS = ["Hello", " from", " the", " local", " test", " server", "."]
LOGPROBS = [-0.01, -0.2, -0.05, -1.5, -0.3, -0.02, -0.1]
ByteLog = list[tuple[Direction, int, bytes]]


@dataclass(frozen=True)
class SentCall:
    conn_id: int
    path: str
    request_model: str
    response_model: str
    status: int
    stream: bool
    input_tokens: int | None    # as sent; None when the response carried no usage
    output_tokens: int | None
    finish_reason: str | None
    error_type: str | None
    cut: bool


class Persona(Protocol):
    """Who answers: the model a response names, the reply (as tokens) and the models `GET /v1/models` lists."""

    def served_model(self, requested: str) -> str: ...

    def reply(self, requested: str, body: dict[str, Any]) -> list[str]: ...

    def models(self) -> list[str]: ...


@dataclass(frozen=True)
class TestPersona:
    """The tests' server: `<requested>-served` answers with WORDS."""

    __test__ = False        # not a pytest class

    def served_model(self, requested: str) -> str:
        return f"{requested}-served"

    def reply(self, requested: str, body: dict[str, Any]) -> list[str]:
        return list(WORDS)

    def models(self) -> list[str]:
        return []


@dataclass(frozen=True)
class ModelPersona:
    """A demo model server: `<name>-<version>` answers every call, saying which model and version answered."""

    name: str
    version: str
    port: int

    @property
    def model_id(self) -> str:
        return f"{self.name}-{self.version}"

    def served_model(self, requested: str) -> str:
        return self.model_id

    def reply(self, requested: str, body: dict[str, Any]) -> list[str]:
        text = f"Hello from {self.name} {self.version} on port {self.port}."
        return tokens(text)

    def models(self) -> list[str]:
        return [self.model_id]


def tokens(text: str) -> list[str]:
    """`"Hello from x."` -> `["Hello", " from", " x."]`: words with their leading space, as BPE tokens look."""
    words = text.split(" ")
    return [words[0]] + [f" {w}" for w in words[1:]] if words else []


def count_words(body: dict[str, Any]) -> int:
    """The server's 'tokenizer': whitespace-separated words of every string in the prompt fields."""
    n = 0

    def walk(v: Any) -> None:
        nonlocal n
        if isinstance(v, str):
            n += len(v.split())
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
    for k in ("messages", "prompt", "input", "system"):
        walk(body.get(k))
    return max(n, 1)


class _RecordingReader:
    def __init__(self, raw: Any, log: ByteLog) -> None:
        self._raw, self._log = raw, log

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def _rec(self, b: bytes) -> bytes:
        if b:
            self._log.append((Direction.REQUEST, time.monotonic_ns(), bytes(b)))
        return b

    def readline(self, size: int = -1) -> bytes:
        return self._rec(self._raw.readline(size))

    def read(self, size: int = -1) -> bytes:
        return self._rec(self._raw.read(size))

    def close(self) -> None:
        self._raw.close()


class _RecordingWriter:
    def __init__(self, raw: Any, log: ByteLog) -> None:
        self._raw, self._log = raw, log

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def write(self, b: bytes) -> int:
        self._log.append((Direction.RESPONSE, time.monotonic_ns(), bytes(b)))
        return self._raw.write(b)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:   # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.conn_id, self.log = self.server.owner._new_connection()
        if self.server.owner.record:
            self.rfile = _RecordingReader(self.rfile, self.log)    # type: ignore[assignment]
            self.wfile = _RecordingWriter(self.wfile, self.log)    # type: ignore[assignment]

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _json(self, status: int, obj: Any, gz_ok: bool = True) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if gz_ok and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _start_stream(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _sse(self, obj: Any, event: str | None = None) -> None:
        head = f"event: {event}\n" if event else ""
        self._chunk(f"{head}data: {json.dumps(obj)}\n\n".encode())

    # -- dispatch ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        persona = self.server.owner.persona
        if path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                          "owned_by": "aimesh"} for m in persona.models()]})
        elif path == "/healthz":
            self._json(200, {"status": "ok", "models": persona.models()})
        else:
            self._json(404, {"error": {"message": f"no route GET {path}", "type": "not_found"}})

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._json(400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
            return
        path = self.path.split("?", 1)[0]
        model = str(body.get("model", ""))
        proto = "anthropic" if path == "/v1/messages" else "ollama" if path.startswith("/api/") else "openai"
        stream = bool(body.get("stream", proto == "ollama" and path in ("/api/chat", "/api/generate")))
        if model.startswith("error-") and model[len("error-"):].isdigit():
            self._error(proto, path, model, int(model.split("-")[1]), stream)
            return
        persona = self.server.owner.persona
        served = persona.served_model(model)
        reply = persona.reply(model, body)
        words = reply[: int(body["max_tokens"])] if isinstance(body.get("max_tokens"), int) else reply
        finish = {"openai": "stop", "anthropic": "end_turn", "ollama": "stop"}[proto]
        if len(words) < len(reply):
            finish = {"openai": "length", "anthropic": "max_tokens", "ollama": "length"}[proto]
        if path == "/v1/responses":
            finish = "completed"      # the Responses API reports a status, not a finish reason
        cut = model == "cut-stream"
        inp = count_words(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        handler = {"/v1/chat/completions": self._openai_chat, "/v1/completions": self._openai_completion,
                   "/v1/embeddings": self._openai_embeddings, "/v1/responses": self._openai_responses,
                   "/v1/messages": self._anthropic, "/api/chat": self._ollama, "/api/generate": self._ollama,
                   "/api/embed": self._ollama_embed}.get(path)
        if handler is None:
            self._json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
            return
        out_tokens = handler(body, served, words, finish, inp, stream, cut, include_usage, path)
        if path.endswith("embeddings") or path.endswith("embed"):
            finish = None
        if stream and path in ("/v1/chat/completions", "/v1/completions") and not include_usage:
            inp, out_tokens = None, None       # the server sent no usage: the decoder must not invent one
        self.server.owner._sent(SentCall(self.conn_id, path, model, served, 200, stream, inp, out_tokens,
                                         finish, None, cut))

    def _error(self, proto: str, path: str, model: str, status: int, stream: bool) -> None:
        etype = {400: "invalid_request_error", 404: "not_found_error", 500: "server_error"}.get(status, "api_error")
        if proto == "anthropic":
            obj: Any = {"type": "error", "error": {"type": etype, "message": f"model {model}"}}
        elif proto == "ollama":
            obj = {"error": f"model '{model}' not found"}
            etype = "error"
        else:
            obj = {"error": {"message": f"model {model}", "type": etype, "param": None, "code": None}}
        self._json(status, obj, gz_ok=False)
        self.server.owner._sent(SentCall(self.conn_id, path, model, "", status, stream, None, None, None, etype,
                                         False))

    # -- OpenAI --------------------------------------------------------------------------------------------------
    def _lp(self, words: list[str]) -> list[dict[str, Any]]:
        return [{"token": w, "logprob": LOGPROBS[i % len(LOGPROBS)], "bytes": list(w.encode()), "top_logprobs": []}
                for i, w in enumerate(words)]

    def _openai_chat(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                     stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        want_lp = bool(body.get("logprobs"))
        usage = {"prompt_tokens": inp, "completion_tokens": len(words), "total_tokens": inp + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0}}
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": served,
                "system_fingerprint": "fp_test"}
        if not stream:
            if cut:
                return self._cut_json()
            self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": served,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words),
                                                                  "refusal": None},
                                          "logprobs": {"content": self._lp(words)} if want_lp else None,
                                          "finish_reason": finish}], "usage": usage})
            return len(words)
        self._start_stream("text/event-stream")
        extra = {"usage": None} if include_usage else {}
        self._sse({**base, **extra, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        for i, w in enumerate(words):
            if cut and i == 2:
                self._cut()
                return None
            lp = {"content": self._lp(words)[i:i + 1]} if want_lp else None
            self._sse({**base, **extra, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": lp,
                                                     "finish_reason": None}]})
        self._sse({**base, **extra, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": finish}]})
        if include_usage:
            self._sse({**base, "choices": [], "usage": usage})
        self._chunk(b"data: [DONE]\n\n")
        self._end_stream()
        return len(words)

    def _cut_json(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"id": "chatcmpl-1", "model": "cut-stream-served", "choi')
        self._cut()
        return None

    def _openai_completion(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                           stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        usage = {"prompt_tokens": inp, "completion_tokens": len(words), "total_tokens": inp + len(words)}
        if not stream:
            self._json(200, {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": served,
                             "choices": [{"index": 0, "text": "".join(words), "logprobs": None,
                                          "finish_reason": finish}], "usage": usage})
            return len(words)
        self._start_stream("text/event-stream")
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": served}
        for w in words:
            self._sse({**base, "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]})
        self._sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}]})
        if include_usage:
            self._sse({**base, "choices": [], "usage": usage})
        self._chunk(b"data: [DONE]\n\n")
        self._end_stream()
        return len(words)

    def _openai_embeddings(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                           stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        vec = [0.25 * i for i in range(64)]
        emb: Any = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                    if body.get("encoding_format") == "base64" else vec)
        self._json(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": emb}],
                         "model": served, "usage": {"prompt_tokens": inp, "total_tokens": inp}})
        return None

    def _openai_responses(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                          stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        text = "".join(words)
        resp = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": served,
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": inp, "output_tokens": len(words), "total_tokens": inp + len(words),
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}},
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if not stream:
            self._json(200, resp)
            return len(words)
        self._start_stream("text/event-stream")
        seq = 0
        started = {**resp, "status": "in_progress", "output": [], "usage": None}
        self._sse({"type": "response.created", "sequence_number": seq, "response": started}, "response.created")
        for w in words:
            seq += 1
            self._sse({"type": "response.output_text.delta", "sequence_number": seq, "item_id": "msg_1",
                       "output_index": 0, "content_index": 0, "delta": w, "logprobs": []},
                      "response.output_text.delta")
        self._sse({"type": "response.completed", "sequence_number": seq + 1, "response": resp},
                  "response.completed")
        self._end_stream()
        return len(words)

    # -- Anthropic -----------------------------------------------------------------------------------------------
    def _anthropic(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                   stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        if not stream:
            self._json(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": served,
                             "content": [{"type": "text", "text": "".join(words)}], "stop_reason": finish,
                             "stop_sequence": None, "usage": {"input_tokens": inp, "output_tokens": len(words),
                                                              "cache_read_input_tokens": 2}})
            return len(words)
        self._start_stream("text/event-stream")
        self._sse({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": served, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": inp, "output_tokens": 1, "cache_read_input_tokens": 2}}}, "message_start")
        self._sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  "content_block_start")
        self._chunk(b"event: ping\ndata: {\"type\": \"ping\"}\n\n")
        for i, w in enumerate(words):
            if cut and i == 2:
                self._cut()
                return None
            self._sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                      "content_block_delta")
        self._sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        self._sse({"type": "message_delta", "delta": {"stop_reason": finish, "stop_sequence": None},
                   "usage": {"output_tokens": len(words)}}, "message_delta")
        self._sse({"type": "message_stop"}, "message_stop")
        self._end_stream()
        return len(words)

    # -- Ollama --------------------------------------------------------------------------------------------------
    def _ollama(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        chat = path == "/api/chat"

        def piece(w: str, done: bool) -> dict[str, Any]:
            d: dict[str, Any] = {"model": served, "created_at": "2026-01-01T00:00:00Z", "done": done}
            if chat:
                d["message"] = {"role": "assistant", "content": w}
            else:
                d["response"] = w
            if done:
                d.update(done_reason=finish, total_duration=1000, prompt_eval_count=inp, eval_count=len(words))
            return d
        if not stream:
            self._json(200, piece("".join(words), True), gz_ok=False)
            return len(words)
        self._start_stream("application/x-ndjson")
        for i, w in enumerate(words):
            if cut and i == 2:
                self._cut()
                return None
            self._chunk((json.dumps(piece(w, False)) + "\n").encode())
        self._chunk((json.dumps(piece("", True)) + "\n").encode())
        self._end_stream()
        return len(words)

    def _ollama_embed(self, body: dict[str, Any], served: str, words: list[str], finish: str, inp: int,
                      stream: bool, cut: bool, include_usage: bool, path: str) -> int | None:
        self._json(200, {"model": served, "embeddings": [[0.1, 0.2, 0.3]], "prompt_eval_count": inp},
                   gz_ok=False)
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256     # 50 concurrent connects must not overflow the listen backlog
    owner: "LLMServer"

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (when serving TLS), then the requests."""
        tls = self.owner.tls
        if tls is not None:
            try:
                request.settimeout(10.0)
                request = tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError):
                return          # a client that does not trust the CA, or left: nothing to serve
        super().finish_request(request, client_address)


class LLMServer:
    """Start with `with LLMServer() as srv:`; `srv.url`, `srv.connections`, `srv.calls`.

    `serve_forever()` instead serves in the calling thread until `shutdown()` from another one (the demo)."""

    def __init__(self, port: int = 0, persona: Persona | None = None, tls: ssl.SSLContext | None = None,
                 record: bool = True, on_call: Callable[[SentCall], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.persona: Persona = persona if persona is not None else TestPersona()
        self.tls = tls
        self.record = record
        self.on_call = on_call
        self.connections: dict[int, ByteLog] = {}
        self.calls: list[SentCall] = []
        self._next_conn = 0
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="llm-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _new_connection(self) -> tuple[int, ByteLog]:
        with self._lock:
            cid = self._next_conn
            self._next_conn += 1
            log: ByteLog = []
            if self.record:
                self.connections[cid] = log
            return cid, log

    def _sent(self, call: SentCall) -> None:
        with self._lock:
            if self.record:
                self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        self._httpd.serve_forever(poll_interval=poll_interval)

    def shutdown(self) -> None:
        self._httpd.shutdown()

    def close(self) -> None:
        self._httpd.server_close()

    def calls_on(self, conn_id: int) -> list[SentCall]:
        with self._lock:
            return [c for c in self.calls if c.conn_id == conn_id]

    def __enter__(self) -> "LLMServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def wait_calls(self, n: int, timeout_s: float = 10.0) -> list[SentCall]:
        """The server notes a call after its last byte; wait until `n` are noted (the client may be faster)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.calls) >= n:
                    return list(self.calls)
            time.sleep(0.01)
        raise AssertionError(f"server noted {len(self.calls)} calls, expected {n}")
