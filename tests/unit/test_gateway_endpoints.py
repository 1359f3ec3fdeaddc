"""Request targets and bodies read the way real upstreams read them (agent/l7/endpoints.py), the capture path
recording the model the upstream used (pure), and the gateway in-process acting on them (loopback sockets)."""
from __future__ import annotations

import json

import pytest

from agent.gateway.policy import GatewayPolicy, PolicyError
from agent.l7.endpoints import (BodyShape, Endpoint, Judged, Unclear, judged_model, parse_target, read_form_model,
                                read_json, target_model)
from agent.l7.http1 import Direction
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ConnectionDecoder
from tests.unit.test_gateway_server import MSG, make_gateway, policy_for  # noqa: F401  (fixtures)


def ep(method: str, target: str) -> Endpoint:
    e = parse_target(method, target)
    assert isinstance(e, Endpoint), e
    return e


def unclear(method: str, target: str) -> str:
    e = parse_target(method, target)
    assert isinstance(e, Unclear), e
    return e.code


# -- item 1: the model named by the path or the query string ----------------------------------------------------
def test_azure_deployment_path_names_the_model() -> None:
    e = ep("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01")
    assert (e.name, e.kind, e.path_model, e.query_model) == ("chat", (Protocol.OPENAI, Operation.CHAT), "gpt-4o", None)
    assert judged_model(e, "gpt-4o") == Judged("gpt-4o", "path+body")
    assert judged_model(e, None) == Judged("gpt-4o", "path")          # the Azure SDK sends no body model
    assert isinstance(m := judged_model(e, "o1-preview"), Unclear) and m.code == "model_mismatch"
    assert "gpt-4o" in m.message and "o1-preview" in m.message


def test_deployments_and_engines_under_any_prefix_name_the_model() -> None:
    assert ep("POST", "/openai/v1/deployments/o1/chat/completions").path_model == "o1"
    assert ep("POST", "/deployments/o1/embeddings").path_model == "o1"
    assert ep("POST", "/engines/o1/chat/completions").path_model == "o1"


def test_engines_path_and_query_model() -> None:
    e = ep("POST", "/engines/o1-preview/completions")
    assert (e.name, e.path_model) == ("completion", "o1-preview")
    e = ep("POST", "/v1/chat/completions?model=o1-preview")
    assert e.query_model == "o1-preview"
    assert judged_model(e, "gpt-4o").code == "model_mismatch"          # type: ignore[union-attr]
    assert judged_model(e, "o1-preview") == Judged("o1-preview", "query+body")
    assert unclear("POST", "/v1/chat/completions?model=a&model=b") == "duplicate_model"
    assert unclear("POST", "/v1/chat/completions?mod%65l=a&model=b") == "duplicate_model"   # names decoded too


def test_percent_encoded_path_model_is_decoded_and_rewritten_encoded() -> None:
    e = ep("POST", "/openai/deployments/gpt%2D4/chat/completions?api-version=1")
    assert e.path_model == "gpt-4"
    assert e.with_model("gpt-4o") == "/openai/deployments/gpt-4o/chat/completions?api-version=1"
    e = ep("POST", "/v1/chat/completions?model=gpt-4&x=1")
    assert e.with_model("gpt 4o") == "/v1/chat/completions?model=gpt%204o&x=1"


def test_no_model_anywhere_is_missing() -> None:
    assert judged_model(ep("POST", "/v1/chat/completions"), None).code == "missing_model"   # type: ignore[union-attr]
    assert judged_model(ep("POST", "/v1/chat/completions"), 5).code == "missing_model"      # type: ignore[union-attr]


# -- item 2: every model-bearing endpoint; what is not understood -----------------------------------------------
@pytest.mark.parametrize("path,name,body", [
    ("/completions", "completion", BodyShape.JSON),
    ("/v1/completions", "completion", BodyShape.JSON),
    ("/litellm/v1/embeddings", "embeddings", BodyShape.JSON),
    ("/v1/images/generations", "images", BodyShape.JSON),
    ("/v1/images/edits", "images", BodyShape.MULTIPART),
    ("/v1/audio/speech", "audio", BodyShape.JSON),
    ("/v1/audio/transcriptions", "audio", BodyShape.MULTIPART),
    ("/v1/moderations", "moderations", BodyShape.JSON),
    ("/v1/rerank", "rerank", BodyShape.JSON),
    ("/v2/rerank", "rerank", BodyShape.JSON),
    ("/v1/responses", "responses", BodyShape.JSON),
    ("/v1/threads/runs", "runs", BodyShape.JSON),
    ("/v1/threads/thread_1/runs", "runs", BodyShape.JSON),
    ("/v1/assistants", "assistants", BodyShape.JSON),
    ("/v1/fine_tuning/jobs", "fine_tuning", BodyShape.JSON),
    ("/v1/realtime/sessions", "realtime", BodyShape.JSON),
    ("/v1/messages", "messages", BodyShape.JSON),
    ("/api/generate", "completion", BodyShape.JSON),
])
def test_model_endpoints_are_judged(path: str, name: str, body: BodyShape) -> None:
    e = ep("POST", path)
    assert (e.name, e.model_bearing, e.judged, e.body) == (name, True, True, body)


def test_batches_are_never_judged_and_realtime_is_judged_by_its_query() -> None:
    b = ep("POST", "/v1/batches")
    assert (b.model_bearing, b.judged) == (True, False)
    assert ep("GET", "/v1/batches").model_bearing is False                       # listing runs no model
    assert ep("POST", "/v1/batches/batch_1/cancel").model_bearing is False
    r = ep("GET", "/v1/realtime?model=gpt-4o-realtime-preview")
    assert (r.name, r.query_model, r.body) == ("realtime", "gpt-4o-realtime-preview", BodyShape.NONE)
    assert judged_model(r, None) == Judged("gpt-4o-realtime-preview", "query")


@pytest.mark.parametrize("method,path", [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
                                         ("DELETE", "/v1/embeddings"), ("OPTIONS", "/v1/responses"),
                                         ("POST", "/v1/realtime?model=x"), ("GET", "/engines/x/completions")])
def test_other_methods_on_model_endpoints_are_refused(method: str, path: str) -> None:
    assert unclear(method, path) == "method_not_judged"


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/v1/models/gpt-4o"), ("POST", "/v1/files"),
                                         ("GET", "/v1/files/file-1/content"), ("GET", "/api/tags"),
                                         ("POST", "/v1/threads"), ("POST", "/v1/threads/t1/messages")])
def test_plain_endpoints_run_no_model(method: str, path: str) -> None:
    assert ep(method, path).model_bearing is False


@pytest.mark.parametrize("method,path", [("POST", "/v1/foo"), ("POST", "/v1/models"), ("DELETE", "/v1/models/ft-1"),
                                         ("POST", "/v1/threads/t/runs/r/submit_tool_outputs"), ("POST", "/api/pull"),
                                         ("POST", "/v1beta/models/gemini-pro:generateContent"),
                                         ("GET", "/some/prefix/v1/models")])
def test_what_is_not_understood_is_none(method: str, path: str) -> None:
    assert parse_target(method, path) is None


def test_unknown_endpoints_option_defaults_to_deny_and_round_trips() -> None:
    assert GatewayPolicy.from_config_dict({}).unknown_endpoints == "deny"
    p = GatewayPolicy.from_config_dict({"gateway": {"unknown_endpoints": "audit"}})
    assert GatewayPolicy.from_json(p.to_json()).unknown_endpoints == "audit"
    with pytest.raises(PolicyError, match="unknown_endpoints"):
        GatewayPolicy.from_config_dict({"gateway": {"unknown_endpoints": "maybe"}})


# -- item 5: parser differentials ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1%2Fchat/completions",
                                  "/v1/chat/completions%00", "/v1/x/../chat/completions", "/v1/./chat/completions",
                                  "/v1/chat\\completions", "/v1/chat/%2e%2e/completions"])
def test_encoded_slashes_and_dot_segments_are_refused(path: str) -> None:
    assert unclear("POST", path) == "ambiguous_path"


def test_absolute_form_is_judged_by_its_path_and_forwarded_in_origin_form() -> None:
    e = ep("POST", "http://evil.example/openai/deployments/o1/chat/completions?api-version=1")
    assert (e.path, e.target, e.path_model) == ("/openai/deployments/o1/chat/completions",
                                                "/openai/deployments/o1/chat/completions?api-version=1", "o1")
    assert unclear("POST", "ftp://h/v1/chat/completions") == "ambiguous_target"
    assert unclear("POST", "*") == "ambiguous_target"


def test_duplicate_keys_are_refused_anywhere_and_escapes_are_decoded() -> None:
    assert read_json(b'{"model": "o1", "model": "gpt-4o"}').code == "duplicate_key"            # type: ignore
    assert read_json(b'{"model": "gpt-4o", "x": {"a": 1, "a": 2}}').code == "duplicate_key"   # type: ignore
    assert read_json(b'{"model": "gpt\\u002d4o"}') == {"model": "gpt-4o"}       # judged as the upstream reads it
    assert read_json('{"model": "gpt-4o"}'.encode("utf-16")).code == "invalid_json"   # type: ignore  # not UTF-8
    e = ep("POST", "/v1/chat/completions")
    assert judged_model(e, "gpt-4o\u0000o1").code == "ambiguous_model"           # type: ignore[union-attr]
    assert judged_model(e, "\ud800").code == "ambiguous_model"                   # type: ignore[union-attr]
    assert judged_model(e, "").code == "missing_model"                           # type: ignore[union-attr]


def _form(fields: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    b = "----aimesh"
    body = b"".join(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n".encode() + v + b"\r\n"
                    for k, v in fields) + f"--{b}--\r\n".encode()
    return f"multipart/form-data; boundary={b}", body


def test_multipart_model_field() -> None:
    assert read_form_model(*_form([("file", b"RIFF...."), ("model", b"whisper-1")])) == "whisper-1"
    assert read_form_model(*_form([("file", b"x")])) is None
    assert read_form_model(*_form([("model", b"a"), ("model", b"b")])).code == "duplicate_key"   # type: ignore
    assert read_form_model("application/json", b"{}").code == "invalid_form"   # type: ignore[union-attr]


# -- the capture path records the model the upstream used -----------------------------------------------------
def _post(path: str, body: dict[str, object]) -> bytes:
    b = json.dumps(body).encode()
    return b"POST %s HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(), len(b), b)


def _resp(model: str) -> bytes:
    b = json.dumps({"model": model, "choices": [{"finish_reason": "stop", "message": {"content": "x"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)


@pytest.mark.parametrize("path,body,want", [
    ("/openai/deployments/o1-preview/chat/completions", {"model": "gpt-4o", "messages": []}, "o1-preview"),
    ("/v1/chat/completions?model=o1-preview", {"model": "gpt-4o", "messages": []}, "o1-preview"),
    ("/openai/deployments/o1-preview/chat/completions", {"messages": []}, "o1-preview"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": []}, "gpt-4o"),
    ("/engines/o1-preview/completions", {"model": "gpt-4o", "prompt": "hi"}, "o1-preview"),
])
def test_capture_records_the_path_or_query_model(path: str, body: dict[str, object], want: str) -> None:
    dec = ConnectionDecoder("c")
    recs = dec.feed(Direction.REQUEST, 0, _post(path, body)) + dec.feed(Direction.RESPONSE, 1, _resp("gpt-4o"))
    recs += dec.close(2)
    assert [r.request_model for r in recs] == [want]
    assert target_model("POST", path) == (want if want == "o1-preview" else None)


# -- the gateway in-process (tests/unit/test_gateway_server.py's harness) with an upstream that notes what it got ---
class _Noting:
    """Answers every POST/GET with a chat completion naming the body's model; notes (method, target, body model)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.got: list[tuple[str, str, object]] = []
        owner = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def _any(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    model = json.loads(raw).get("model") if raw else None
                except ValueError:
                    model = None
                owner.got.append((self.command, self.path, model))
                out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": str(model),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "ok"}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_POST = do_GET = _any

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def noting():
    n = _Noting()
    yield n
    n.close()


def test_a_retired_model_in_the_deployment_path_is_rewritten_there_too(noting, make_gateway):
    import openai
    llm = {"models": [{"name": "gpt-4-0613", "deprecated": {"sunset": "2020-01-01T00:00:00Z", "successor": "gpt-4o"}}]}
    h = make_gateway(policy_for(noting.port, [{"models": ["gpt-4o*"]}], llm=llm), noting.port)
    c = openai.AzureOpenAI(azure_endpoint=h.url(suffix=""), api_version="2024-06-01", api_key="k", max_retries=0)
    c.chat.completions.create(model="gpt-4-0613", messages=MSG)
    assert noting.got == [("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01", "gpt-4o")]
    rec = h.drain(1)[0]
    assert (rec["request_model"], rec["sent_model"], rec["model_from"], rec["decision"]) == (
        "gpt-4-0613", "gpt-4o", "path+body", "served")


@pytest.mark.parametrize("mode,decision,status", [("deny", "refused", 403), ("allow", "served", 200),
                                                  ("audit", "would_deny", 200)])
def test_unknown_endpoints_option(noting, make_gateway, mode: str, decision: str, status: int) -> None:
    import dataclasses

    import httpx
    pol = dataclasses.replace(policy_for(noting.port, [{"models": ["gpt-4o*"]}]), unknown_endpoints=mode)
    h = make_gateway(pol, noting.port)
    r = httpx.post(h.url() + "/some/new/api", json={"model": "o1"}, timeout=10)
    assert r.status_code == status, r.text
    if mode == "deny":
        assert "POST /v1/some/new/api" in r.json()["error"]["message"] and noting.got == []
    else:
        assert noting.got == [("POST", "/v1/some/new/api", "o1")]
    rec = h.drain(1)[0]
    assert (rec["decision"], rec["reason"]) == (decision, "endpoint_not_understood")


def test_multipart_model_from_the_sdk_is_judged(noting, make_gateway) -> None:
    import openai
    h = make_gateway(policy_for(noting.port, [{"models": ["whisper-1"]}]), noting.port)
    c = openai.OpenAI(base_url=h.url(), api_key="k", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", b"RIFF0000WAVE", "audio/wav"))
    assert "gpt-4o-transcribe" in str(e.value) and noting.got == []
    c.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF0000WAVE", "audio/wav"))
    assert [(m, p) for m, p, _ in noting.got] == [("POST", "/v1/audio/transcriptions")]
    recs = h.drain(2)
    assert [(r["request_model"], r["decision"], r["operation"]) for r in recs] == [
        ("gpt-4o-transcribe", "refused", "audio"), ("whisper-1", "served", "audio")]
