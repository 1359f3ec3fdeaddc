"""Real HTTP clients in loops (issue 23): `server PORT` serves a minimal OpenAI-style chat completion over HTTP/1.1
(keep-alive, TCP_NODELAY, every response in one write: no Nagle/delayed-ACK stall); `client PORT N` makes N calls
with each of requests (a Session, and a new connection per call), httpx and the openai SDK, and prints one JSON
object: client -> {"ok": calls answered right, "errors": {exception type: count}}. Run with the fast path on, off
and without an agent by tests/kernel/test_fastpath_clients.py: any error, or any difference, fails."""
from __future__ import annotations

import json
import socket
import sys
import threading

HOST = "127.0.0.1"
ANSWER = "pong"


def _response(body: bytes, close: bool) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + (b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n") + b"\r\n")
    return head + body


def _completion(n: int) -> bytes:
    return json.dumps({"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": "tiny",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": ANSWER}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def _handle(c: socket.socket) -> None:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, n = b"", 0
    while True:
        while b"\r\n\r\n" not in buf:
            b = c.recv(65536)
            if not b:
                return
            buf += b
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(hdrs.get("content-length", "0"))
        while len(buf) < length:
            b = c.recv(65536)
            if not b:
                return
            buf += b
        buf = buf[length:]
        close = hdrs.get("connection", "").lower() == "close"
        n += 1
        c.sendall(_response(_completion(n), close))
        if close:
            return


def serve(port: int) -> None:
    ls = socket.create_server((HOST, port), backlog=512)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        c, _ = ls.accept()

        def one(c: socket.socket = c) -> None:
            try:
                _handle(c)
            except OSError:
                pass
            finally:
                c.close()
        threading.Thread(target=one, daemon=True).start()


def _loop(n: int, call) -> dict:
    ok, errors = 0, {}
    for _ in range(n):
        try:
            ok += call() == ANSWER
        except Exception as e:       # what the application would have raised is the result
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    return {"ok": ok, "errors": errors}


def run(port: int, n: int) -> dict:
    import httpx
    import openai
    import requests
    url = f"http://{HOST}:{port}/v1/chat/completions"
    req = {"model": "tiny", "messages": [{"role": "user", "content": "ping"}]}

    def content(d: dict) -> str:
        return d["choices"][0]["message"]["content"]
    out = {}
    with requests.Session() as s:
        out["requests_session"] = _loop(n, lambda: content(s.post(url, json=req, timeout=10).json()))
    out["requests_new_connection"] = _loop(
        n, lambda: content(requests.post(url, json=req, headers={"Connection": "close"}, timeout=10).json()))
    with httpx.Client(timeout=10) as h:
        out["httpx"] = _loop(n, lambda: content(h.post(url, json=req).json()))
    with openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0, timeout=10) as oa:
        out["openai"] = _loop(n, lambda: oa.chat.completions.create(**req).choices[0].message.content)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        print(json.dumps(run(int(sys.argv[2]), int(sys.argv[3]))), flush=True)
