"""The demo's workloads, plain stdlib, one process each: `python -m agent.demo.workloads <role> ...`.

Roles:
  model-server   --name llama --version 3.1-8b --port 18001
                 OpenAI-compatible on 127.0.0.1: `GET /v1/models`, `POST /v1/chat/completions` (canned, deterministic
                 answers that name the model and version that answered; no ML).
  dataset-server --name eval-corpus --version 2026-10 --port 18004
                 `GET /v1/datasets`, `GET /v1/datasets/<name>/rows?offset=0&limit=2` (deterministic rows).
  client         --name chat-frontend --url http://127.0.0.1:18001 --interval 0.5 [--api chat|dataset] [--model M]
                 calls the server in a loop (one new TCP connection per call, so each call is one connect decision)
                 and prints one line per call: what answered, or the error (e.g. EPERM when the kernel denies it).

Servers print one line per request. Everything is loopback only. SIGTERM/SIGINT stop a workload with status 0.
"""
from __future__ import annotations

import argparse
import errno
import http.client
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 1 << 20


class Stop(Exception):
    """Raised from the signal handler to end a workload's loop."""


# ---- model server ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    port: int

    @property
    def model_id(self) -> str:
        return f"{self.name}-{self.version}"


def models_list(model: ModelInfo) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model.model_id, "object": "model", "created": 0, "owned_by": "aimesh-demo"}],
    }


def last_user_message(request: dict[str, Any]) -> str:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list")
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    raise ValueError("messages: no user message with string content")


def chat_completion(model: ModelInfo, request: dict[str, Any], seq: int, created: int) -> dict[str, Any]:
    """A valid `chat.completion` object whose content names the model and version that answered."""
    prompt = last_user_message(request)
    content = f"Hello from {model.name} {model.version} on port {model.port}. You said: {prompt[:80]!r}"
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"] if isinstance(m, dict))
    completion_tokens = len(content.split())
    return {
        "id": f"chatcmpl-{model.model_id}-{seq}",
        "object": "chat.completion",
        "created": created,
        "model": model.model_id,
        "system_fingerprint": f"aimesh-demo-{model.model_id}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ---- dataset server --------------------------------------------------------------------------------------------

def dataset_rows(name: str, version: str, offset: int, limit: int) -> dict[str, Any]:
    """Deterministic evaluation rows `offset .. offset+limit-1`."""
    rows = [
        {"id": i, "prompt": f"What is {i} + {i % 7}?", "reference": str(i + i % 7)}
        for i in range(offset, offset + limit)
    ]
    return {"object": "list", "dataset": name, "version": version, "offset": offset, "rows": rows}


def _query_int(query: dict[str, list[str]], key: str, default: int, low: int, high: int) -> int:
    raw = query.get(key, [str(default)])[0]
    value = int(raw)          # ValueError -> 400
    if not low <= value <= high:
        raise ValueError(f"{key}: must be in {low}..{high}")
    return value


# ---- HTTP plumbing ---------------------------------------------------------------------------------------------

Route = Callable[[str, str, bytes], tuple[int, dict[str, Any]]]


def model_routes(model: ModelInfo) -> Route:
    seq = iter(range(1, 1 << 62))
    lock = threading.Lock()

    def route(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlsplit(path)
        if method == "GET" and url.path in ("/v1/models", "/models"):
            return 200, models_list(model)
        if method == "GET" and url.path == "/healthz":
            return 200, {"status": "ok", "model": model.model_id}
        if url.path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                return 405, openai_error("use POST")
            try:
                request = json.loads(body or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("body: expected a JSON object")
                with lock:
                    n = next(seq)
                return 200, chat_completion(model, request, n, int(time.time()))
            except (ValueError, UnicodeDecodeError) as e:
                return 400, openai_error(str(e))
        return 404, openai_error(f"no route {method} {url.path}", "not_found_error")

    return route


def dataset_routes(name: str, version: str) -> Route:
    def route(method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlsplit(path)
        if method != "GET":
            return 405, openai_error("use GET")
        if url.path == "/v1/datasets":
            return 200, {"object": "list", "data": [{"id": name, "version": version, "object": "dataset"}]}
        if url.path == "/healthz":
            return 200, {"status": "ok", "dataset": name}
        if url.path == f"/v1/datasets/{name}/rows":
            try:
                q = parse_qs(url.query)
                offset = _query_int(q, "offset", 0, 0, 1 << 31)
                limit = _query_int(q, "limit", 2, 1, 100)
            except ValueError as e:
                return 400, openai_error(str(e))
            return 200, dataset_rows(name, version, offset, limit)
        return 404, openai_error(f"no route GET {url.path}", "not_found_error")

    return route


def make_handler(route: Route, label: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"aimesh-demo-{label}"
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                status, payload = 413, openai_error("body too large")
            else:
                body = self.rfile.read(length) if length else b""
                status, payload = route(method, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            path = urlsplit(self.path).path
            print(f"{code} {self.command} {path} <- {self.client_address[0]}:{self.client_address[1]}", flush=True)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            print(f"{label}: {format % args}", flush=True)

    return Handler


def serve(route: Route, label: str, port: int) -> int:
    """Serve on 127.0.0.1:port until SIGTERM/SIGINT."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(route, label))
    httpd.daemon_threads = True
    print(f"{label} listening on 127.0.0.1:{port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except Stop:
        pass
    finally:
        httpd.server_close()
    return 0


# ---- client ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    host: str
    port: int


def parse_target(url: str) -> Target:
    """`http://127.0.0.1:18001` -> Target; only http and loopback addresses (the demo never leaves the host)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"--url: expected http://<loopback address>:<port>, got {url!r}")
    try:
        ip = ipaddress.ip_address(parts.hostname)
    except ValueError:
        raise ValueError(f"--url: {parts.hostname!r} is not an IP address (use 127.0.0.1 or ::1)") from None
    if not ip.is_loopback:
        raise ValueError(f"--url: {ip} is not a loopback address")
    return Target(str(ip), parts.port)


def describe_error(e: BaseException) -> str:
    """`EPERM Operation not permitted` for OS errors, the class and message otherwise."""
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{name} {e.strerror or ''}".strip()
    if isinstance(e, socket.timeout):
        return "timeout"
    return f"{type(e).__name__}: {e}"


def call_once(target: Target, api: str, model: str, client: str, n: int, timeout: float) -> str:
    """One call on a fresh connection; returns the line to print (never raises for network errors)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as e:
            return f"#{n} connect {target.host}:{target.port} failed: {describe_error(e)}"
        if api == "chat":
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"request {n} from {client}"}]})
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        else:
            conn.request("GET", f"/v1/datasets/{model}/rows?offset={2 * (n - 1)}&limit=2")
        resp = conn.getresponse()
        payload = json.loads(resp.read() or b"{}")
        ms = f"{(time.monotonic() - started) * 1000:.0f} ms"
        if resp.status != 200:
            message = payload.get("error", {}).get("message", "") if isinstance(payload, dict) else ""
            return f"#{n} HTTP {resp.status} {message}".rstrip()
        if api == "chat":
            return f"#{n} 200 answered by {payload.get('model')} ({ms})"
        rows = payload.get("rows") or []
        ids = f"{rows[0]['id']}-{rows[-1]['id']}" if rows else "none"
        return f"#{n} 200 rows {ids} from {payload.get('dataset')}@{payload.get('version')} ({ms})"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return f"#{n} failed: {describe_error(e)}"
    finally:
        conn.close()


def run_client(target: Target, api: str, model: str, name: str, interval: float, count: int) -> int:
    print(f"{name}: calling http://{target.host}:{target.port} every {interval:g}s", flush=True)
    n = 0
    try:
        while count <= 0 or n < count:
            n += 1
            started = time.monotonic()
            print(call_once(target, api, model, name, n, timeout=min(5.0, max(1.0, interval * 4))), flush=True)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except Stop:
        pass
    return 0


# ---- entry -----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.demo.workloads", description="aimesh demo workloads")
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("model-server", "dataset-server"):
        s = sub.add_parser(role)
        s.add_argument("--name", required=True)
        s.add_argument("--version", required=True)
        s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--name", required=True)
    c.add_argument("--url", required=True, help="http://127.0.0.1:<port> of the server")
    c.add_argument("--interval", type=float, default=1.0, help="seconds between calls (0.2 .. 60)")
    c.add_argument("--api", choices=("chat", "dataset"), default="chat")
    c.add_argument("--model", default="llama", help="model (chat) or dataset name to ask for")
    c.add_argument("--count", type=int, default=0, help="stop after this many calls (0: until stopped)")
    return p


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        if args.role == "model-server":
            model = ModelInfo(args.name, args.version, args.port)
            return serve(model_routes(model), f"{args.name}@{args.version}", args.port)
        if args.role == "dataset-server":
            return serve(dataset_routes(args.name, args.version), f"{args.name}@{args.version}", args.port)
        if not 0.2 <= args.interval <= 60:
            print("--interval: must be between 0.2 and 60 seconds", file=sys.stderr)
            return 2
        try:
            target = parse_target(args.url)
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return 2
        return run_client(target, args.api, args.model, args.name, args.interval, args.count)
    except Stop:
        return 0
    except OSError as e:
        print(f"{args.role} {args.name}: {describe_error(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
