"""Issue 22 item 6: the GenAI span attributes the OpenTelemetry conventions ask for, one test per attribute
(span_attributes, the pure part of the OTLP sink), and the capture decoder filling what they read."""
from __future__ import annotations

from dataclasses import replace

from agent.export.otlp import span_attributes
from agent.flows.model import IdentityData
from agent.l7.llm import Operation, Protocol, RequestScan, ResponseParse
from tests.unit.test_otlp import make_call

WEB = IdentityData("chat-frontend", "workload", "v1")
LLAMA = IdentityData("llama", "model", "")


def attrs(**kw: object) -> dict[str, object]:
    return span_attributes(make_call(**kw), WEB, LLAMA, 1, "c")


def test_request_stream_is_set_only_when_streaming():
    assert attrs(stream=True)["gen_ai.request.stream"] is True
    assert "gen_ai.request.stream" not in attrs(stream=False)      # "if and only if the request is streaming"


def test_no_time_to_first_chunk_on_a_non_streamed_span():
    assert attrs(stream=True, time_to_first_chunk_ns=150_000_000)["gen_ai.response.time_to_first_chunk"] == 0.15
    assert "gen_ai.response.time_to_first_chunk" not in attrs(stream=False, time_to_first_chunk_ns=150_000_000)


def test_choice_count_when_named_and_not_one():
    assert attrs(choice_count=8)["gen_ai.request.choice.count"] == 8
    assert "gen_ai.request.choice.count" not in attrs(choice_count=1)
    assert "gen_ai.request.choice.count" not in attrs(choice_count=None)


def test_response_id():
    assert attrs(response_id="chatcmpl-123")["gen_ai.response.id"] == "chatcmpl-123"
    assert "gen_ai.response.id" not in attrs(response_id=None)


def test_openai_api_type_names_the_responses_api():
    assert attrs(operation=Operation.RESPONSES)["openai.api.type"] == "responses"
    assert attrs(operation=Operation.CHAT)["openai.api.type"] == "chat_completions"
    assert "openai.api.type" not in attrs(protocol=Protocol.ANTHROPIC, operation=Operation.MESSAGES)


def _response(proto: Protocol, op: Operation, ctype: str, body: bytes) -> str | None:
    p = ResponseParse(proto, op, 200, ctype, False, 0)
    p.feed(1, body)
    return p.finish(2, True).response_id


def test_the_decoder_reads_the_response_id_in_each_shape():
    assert _response(Protocol.OPENAI, Operation.CHAT, "application/json",
                     b'{"id":"chatcmpl-1","model":"m","choices":[]}') == "chatcmpl-1"
    assert _response(Protocol.OPENAI, Operation.CHAT, "text/event-stream",
                     b'data: {"id":"chatcmpl-2","choices":[]}\n\ndata: [DONE]\n\n') == "chatcmpl-2"
    assert _response(Protocol.ANTHROPIC, Operation.MESSAGES, "text/event-stream",
                     b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"c"}}\n\n'
                     b'event: message_stop\ndata: {"type":"message_stop"}\n\n') == "msg_1"
    assert _response(Protocol.OPENAI, Operation.RESPONSES, "text/event-stream",
                     b'data: {"type":"response.created","response":{"id":"resp_1"}}\n\n'
                     b'data: {"type":"response.completed","response":{"id":"resp_1"}}\n\n') == "resp_1"


def test_the_decoder_reads_the_choice_count():
    s = RequestScan(Protocol.OPENAI, Operation.CHAT, False, 0)
    s.feed(b'{"model":"m","n":3,"messages":[]}')
    assert s.finish().choice_count == 3
    s = RequestScan(Protocol.OPENAI, Operation.CHAT, False, 0)
    s.feed(b'{"model":"m"}')
    assert s.finish().choice_count is None
    assert replace(make_call(), choice_count=3).choice_count == 3


def test_the_decoder_records_the_largest_token_limit_as_the_gateway_judges_it():
    s = RequestScan(Protocol.OPENAI, Operation.CHAT, False, 0)
    s.feed(b'{"model":"m","max_tokens":50,"max_completion_tokens":5000,"messages":[]}')
    assert s.finish().max_tokens == 5000
