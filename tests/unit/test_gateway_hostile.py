"""Hostile input to the gateway on raw sockets: each is refused with the right status and nothing reaches the
upstream (`upstream.connections` stays empty: the upstream never even saw a connection)."""
from __future__ import annotations

import json
import socket

import pytest

from agent.gateway.server import GatewaySettings
from tests.unit.test_gateway_server import make_gateway, policy_for, upstream  # noqa: F401  (fixtures)

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _exchange(h, data: bytes, *, timeout: float = 15.0, must_close: bool = False) -> bytes:
    """Send, read until the gateway closes (must_close: a read timeout fails the test instead of ending the read)."""
    s = socket.create_connection((h.host, h.port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                assert not must_close, f"the gateway kept the connection open; read {out[:80]!r}"
                break
            if not b:
                break
            out += b
        return out
    finally:
        s.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


def _json_body(resp: bytes) -> dict:
    return json.loads(resp.split(b"\r\n\r\n", 1)[1])


@pytest.fixture
def gw(upstream, make_gateway):  # noqa: F811
    return make_gateway(policy_for(upstream.port, [{"models": ["gpt-4o"]}]), upstream.port,
                        settings=GatewaySettings(port=0, max_body=4096, header_timeout_s=0.3, body_timeout_s=0.5))


def test_content_length_with_transfer_encoding_is_refused(gw, upstream):  # noqa: F811
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    req = (CHAT + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
           % len(chunked) + chunked + smuggled)
    resp = _exchange(gw, req)
    assert _status(resp) == 400 and resp.count(b"HTTP/1.") == 1       # the smuggled request is never answered
    assert _json_body(resp)["error"]["code"] == "bad_http_request"      # JSON the SDKs read, never plain text
    assert upstream.connections == {} and gw.drain(1)[0]["reason"] == "bad_http: BadHttpMessage"


def test_duplicate_content_length_is_refused(gw, upstream):  # noqa: F811
    resp = _exchange(gw, CHAT + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
    assert _status(resp) == 400 and upstream.connections == {}


def test_oversized_header_is_refused(gw, upstream):  # noqa: F811
    resp = _exchange(gw, CHAT + b"X-Big: " + b"a" * 20000 + b"\r\nContent-Length: 2\r\n\r\n{}")
    assert _status(resp) == 431 and upstream.connections == {}


def test_oversized_body_is_refused_with_and_without_content_length(gw, upstream):  # noqa: F811
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 8000}]}).encode()
    resp = _exchange(gw, CHAT + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert _status(resp) == 413 and _json_body(resp)["error"]["code"] == "request_too_large"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))
    resp = _exchange(gw, CHAT + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
    assert _status(resp) == 413
    assert upstream.connections == {}
    assert [r["reason"] for r in gw.drain(2)] == ["body_too_large", "body_too_large"]


def test_slow_client_head_is_cut(gw, upstream):  # noqa: F811
    resp = _exchange(gw, CHAT + b"Content-Le", must_close=True)      # never finishes its head
    assert resp == b"" and upstream.connections == {}


def test_slow_head_on_a_kept_alive_connection_is_cut(gw, upstream):  # noqa: F811
    one = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = socket.create_connection((gw.host, gw.port), timeout=15)
    with s:
        s.sendall(CHAT + b"Content-Length: %d\r\n\r\n" % len(one) + one)
        got = b""
        while b"[DONE]" not in got and b'"usage"' not in got:
            b = s.recv(65536)
            assert b, got
            got += b
        assert _status(got) == 200
        s.sendall(CHAT + b"Content-Le")                       # the next request's head never completes
        try:
            assert s.recv(65536) == b""
        except ConnectionResetError:
            pass


def test_slow_client_body_gets_408(gw, upstream):  # noqa: F811
    resp = _exchange(gw, CHAT + b"Content-Length: 100\r\n\r\n{\"model\": ")
    assert _status(resp) == 408 and upstream.connections == {}


def test_invalid_json_and_missing_model_are_400(gw, upstream):  # noqa: F811
    for body, code in ((b'{"model": "gpt-4o", "messages": [', "invalid_json"), (b"[1, 2]", "invalid_json"),
                       (b'{"messages": []}', "missing_model"), (b'{"model": 4}', "missing_model")):
        resp = _exchange(gw, CHAT + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert _status(resp) == 400, body
        err = _json_body(resp)["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error", code)
    assert upstream.connections == {}


def test_keep_alive_serves_requests_in_order_on_one_connection(gw, upstream):  # noqa: F811
    one = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    bad = json.dumps({"model": "o1", "messages": []}).encode()
    req = (CHAT + b"Content-Length: %d\r\n\r\n" % len(one) + one + CHAT + b"Content-Length: %d\r\n\r\n" % len(bad)
           + bad + CHAT + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(one) + one)
    resp = _exchange(gw, req)
    assert [int(x.split(b" ", 1)[0]) for x in resp.split(b"HTTP/1.1 ")[1:]] == [200, 403, 200]
    assert len(upstream.wait_calls(2)) == 2
