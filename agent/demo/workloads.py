"""The demo's workloads, one process each: `python -m agent.demo.workloads <role> ...`.

Roles:
  model-server   --name llama --version 3.1-8b --port 18001 [--tls-cert F --tls-key F]
                 the OpenAI wire format on 127.0.0.1 (agent/demo/llm_server.py, the tests' server): `GET /v1/models`,
                 `POST /v1/chat/completions` non-streamed and streamed (SSE, a usage chunk when
                 `stream_options.include_usage`, `[DONE]`), logprobs when asked, usage in bodies; the answer names the
                 model and version that answered (no ML). TLS with a certificate and key (the demo's CA signs them).
                 The model `error-<status>` gets that status with the OpenAI error body.
  dataset-server --name eval-corpus --version 2026-10 --port 18004
                 `GET /v1/datasets`, `GET /v1/datasets/<name>/rows?offset=0&limit=2` (deterministic rows).
  client         --name chat-frontend --url http://127.0.0.1:18001 --interval 0.5 [--api chat|dataset] [--model M]
                 [--ca-file F] [--error-every N]
                 calls the server in a loop on a new TCP connection per call (so each call is one connect decision)
                 and prints one line per call: what answered, or the error (e.g. EPERM when the kernel denies it).
                 Chat calls go through the official openai SDK, in a cycle: streamed with `include_usage`,
                 non-streamed with logprobs, non-streamed plain; every N-th call asks for `error-404`.
                 An https URL is trusted through `--ca-file` (the demo's CA), else through SSL_CERT_FILE.

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
import ssl
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

from agent.demo.llm_server import LLMServer, ModelPersona, SentCall

MAX_BODY = 1 << 20
CHAT_STYLES = ("stream", "logprobs", "plain")     # the cycle of a chat client's calls
ERROR_MODEL = "error-404"


class Stop(Exception):
    """Raised from the signal handler to end a workload's loop."""


def openai_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ---- model server ----------------------------------------------------------------------------------------------

def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from a PEM certificate and key, or None for plaintext; ValueError names the flag."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key: give both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-cert {cert}: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def call_line(call: SentCall) -> str:
    """The server's line per call: `200 /v1/chat/completions llama-3.1-8b -> llama-3.1-8b stream 7 tokens`."""
    text = f"{call.status} {call.path} {call.request_model or '-'} -> {call.response_model or '-'}"
    if call.stream:
        text += " stream"
    if call.output_tokens is not None:
        text += f" {call.output_tokens} tokens"
    if call.error_type:
        text += f" {call.error_type}"
    return text


def serve_model(persona: ModelPersona, tls: ssl.SSLContext | None) -> int:
    """Serve on 127.0.0.1:<persona.port> until SIGTERM/SIGINT."""
    srv = LLMServer(port=persona.port, persona=persona, tls=tls, record=False,
                    on_call=lambda c: print(call_line(c), flush=True))
    print(f"{persona.name}@{persona.version} listening on {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except Stop:
        pass
    finally:
        srv.close()
    return 0


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
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_target(url: str) -> Target:
    """`http://127.0.0.1:18001` (or https) -> Target; loopback addresses only (the demo never leaves the host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"--url: expected http(s)://<loopback address>:<port>, got {url!r}")
    try:
        ip = ipaddress.ip_address(parts.hostname)
    except ValueError:
        raise ValueError(f"--url: {parts.hostname!r} is not an IP address (use 127.0.0.1 or ::1)") from None
    if not ip.is_loopback:
        raise ValueError(f"--url: {ip} is not a loopback address")
    return Target(str(ip), parts.port, parts.scheme)


def describe_error(e: BaseException) -> str:
    """`EPERM Operation not permitted` for OS errors, the class and message otherwise."""
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{name} {e.strerror or ''}".strip()
    if isinstance(e, socket.timeout):
        return "timeout"
    return f"{type(e).__name__}: {e}"


def causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and what caused it (`raise ... from`, then the exception being handled), each once."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def os_error_in(e: BaseException) -> OSError | None:
    """The OS error under an SDK's connection error (openai -> httpx -> httpcore -> OSError), if there is one."""
    return next((c for c in causes(e) if isinstance(c, OSError) and not isinstance(c, ssl.SSLError)
                 and c.errno is not None), None)


def tls_error_in(e: BaseException) -> ssl.SSLError | None:
    """The TLS error under an SDK's connection error (ssl's errors are OSErrors whose errno means nothing)."""
    return next((c for c in causes(e) if isinstance(c, ssl.SSLError)), None)


def chat_style(n: int, error_every: int) -> str:
    """What call `n` (1-based) does: `error`, else the CHAT_STYLES cycle."""
    if error_every > 0 and n % error_every == 0:
        return "error"
    return CHAT_STYLES[(n - 1) % len(CHAT_STYLES)]


def chat_messages(client: str, n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a demo model. Answer in one sentence."},
            {"role": "user", "content": f"request {n} from {client}: which model are you?"}]


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.0f} ms"


def call_chat(sdk: Any, model: str, client: str, n: int, error_every: int) -> str:
    """One chat call through the openai SDK client `sdk`; returns the line to print (never raises for API errors)."""
    import openai

    style = chat_style(n, error_every)
    messages = chat_messages(client, n)
    started = time.monotonic_ns()
    try:
        if style == "stream":
            served, first, usage = "", None, None
            for chunk in sdk.chat.completions.create(model=model, messages=messages, stream=True,
                                                     stream_options={"include_usage": True}):
                if first is None:
                    first = time.monotonic_ns() - started
                served = chunk.model or served
                usage = chunk.usage or usage
            tokens = f"{usage.prompt_tokens}/{usage.completion_tokens} tokens" if usage else "no usage"
            ttfc = f", first chunk {_ms(first)}" if first is not None else ""
            return f"#{n} 200 answered by {served} (stream, {tokens}{ttfc}, {_ms(time.monotonic_ns() - started)})"
        r = sdk.chat.completions.create(model=ERROR_MODEL if style == "error" else model, messages=messages,
                                        logprobs=style == "logprobs" or openai.NOT_GIVEN)
        tokens = f"{r.usage.prompt_tokens}/{r.usage.completion_tokens} tokens" if r.usage else "no usage"
        extra = ""
        lp = r.choices[0].logprobs if r.choices else None
        if lp is not None and lp.content:
            import math
            probs = [math.exp(t.logprob) for t in lp.content]
            extra = f", confidence {sum(probs) / len(probs):.2f}"
        return f"#{n} 200 answered by {r.model} ({tokens}{extra}, {_ms(time.monotonic_ns() - started)})"
    except openai.APIStatusError as e:
        message = e.message.split(" - ", 1)[-1] if e.message else ""
        body = e.body if isinstance(e.body, dict) else {}
        message = str(body.get("message") or message)
        return f"#{n} HTTP {e.status_code} {message}".rstrip()
    except openai.APIConnectionError as e:
        tls_error = tls_error_in(e)
        if tls_error is not None:
            return f"#{n} TLS with {sdk.base_url.host}:{sdk.base_url.port} failed: {tls_error.reason or tls_error}"
        os_error = os_error_in(e)
        if os_error is not None:
            return f"#{n} connect {sdk.base_url.host}:{sdk.base_url.port} failed: {describe_error(os_error)}"
        root = list(causes(e))[-1]
        return f"#{n} failed: {describe_error(root)}"


def call_dataset(target: Target, dataset: str, n: int, timeout: float) -> str:
    """One dataset read on a fresh connection; returns the line to print (never raises for network errors)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as e:
            return f"#{n} connect {target.host}:{target.port} failed: {describe_error(e)}"
        conn.request("GET", f"/v1/datasets/{dataset}/rows?offset={2 * (n - 1)}&limit=2")
        resp = conn.getresponse()
        payload = json.loads(resp.read() or b"{}")
        if resp.status != 200:
            message = payload.get("error", {}).get("message", "") if isinstance(payload, dict) else ""
            return f"#{n} HTTP {resp.status} {message}".rstrip()
        rows = payload.get("rows") or []
        ids = f"{rows[0]['id']}-{rows[-1]['id']}" if rows else "none"
        ms = f"{(time.monotonic() - started) * 1000:.0f} ms"
        return f"#{n} 200 rows {ids} from {payload.get('dataset')}@{payload.get('version')} ({ms})"
    except (OSError, http.client.HTTPException, ValueError) as e:
        return f"#{n} failed: {describe_error(e)}"
    finally:
        conn.close()


def openai_client(target: Target, ca_file: str | None, timeout: float) -> Any:
    """The SDK client: no retries (each call is one connect decision), no keep-alive (a new connection per call, so
    the kernel decides, and a weighted redirect splits, per call), the demo's CA for https when given."""
    import httpx
    import openai

    verify: ssl.SSLContext | bool = True
    if target.scheme == "https" and ca_file:
        verify = ssl.create_default_context(cafile=ca_file)
    http_client = openai.DefaultHttpxClient(verify=verify, timeout=timeout,
                                            limits=httpx.Limits(max_keepalive_connections=0))
    return openai.OpenAI(base_url=f"{target.url}/v1", api_key="sk-aimesh-demo", max_retries=0,
                         http_client=http_client)


def run_client(target: Target, api: str, model: str, name: str, interval: float, count: int,
               ca_file: str | None = None, error_every: int = 0) -> int:
    print(f"{name}: calling {target.url} every {interval:g}s", flush=True)
    timeout = min(5.0, max(1.0, interval * 4))
    sdk = openai_client(target, ca_file, timeout) if api == "chat" else None
    n = 0
    try:
        while count <= 0 or n < count:
            n += 1
            started = time.monotonic()
            if sdk is not None:
                line = call_chat(sdk, model, name, n, error_every)
            else:
                line = call_dataset(target, model, n, timeout)
            print(line, flush=True)
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except Stop:
        pass
    finally:
        if sdk is not None:
            sdk.close()
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
        if role == "model-server":
            s.add_argument("--tls-cert", default=None, help="PEM certificate: serve https")
            s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    c = sub.add_parser("client")
    c.add_argument("--name", required=True)
    c.add_argument("--url", required=True, help="http(s)://127.0.0.1:<port> of the server")
    c.add_argument("--interval", type=float, default=1.0, help="seconds between calls (0.2 .. 60)")
    c.add_argument("--api", choices=("chat", "dataset"), default="chat")
    c.add_argument("--model", default="llama", help="model (chat) or dataset name to ask for")
    c.add_argument("--count", type=int, default=0, help="stop after this many calls (0: until stopped)")
    c.add_argument("--ca-file", default=None, help="PEM CA the https server's certificate chains to")
    c.add_argument("--error-every", type=int, default=0, help=f"every N-th chat call asks for {ERROR_MODEL} (0: never)")
    return p


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        if args.role == "model-server":
            try:
                tls = server_tls(args.tls_cert, args.tls_key)
            except ValueError as e:
                print(str(e), file=sys.stderr)
                return 2
            return serve_model(ModelPersona(args.name, args.version, args.port), tls)
        if args.role == "dataset-server":
            return serve(dataset_routes(args.name, args.version), f"{args.name}@{args.version}", args.port)
        if not 0.2 <= args.interval <= 60:
            print("--interval: must be between 0.2 and 60 seconds", file=sys.stderr)
            return 2
        if args.error_every < 0:
            print("--error-every: must be >= 0", file=sys.stderr)
            return 2
        try:
            target = parse_target(args.url)
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return 2
        if args.api == "chat":
            try:
                import openai  # noqa: F401  (the chat client is the official SDK)
            except ImportError:
                print("client: the openai SDK is not installed (`make setup` installs it)", file=sys.stderr)
                return 2
        return run_client(target, args.api, args.model, args.name, args.interval, args.count, args.ca_file,
                          args.error_every)
    except Stop:
        return 0
    except OSError as e:
        print(f"{args.role} {args.name}: {describe_error(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
