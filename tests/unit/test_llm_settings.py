"""The global `llm:` section and per-identity `llm:`: content capture's default, redaction rules, the content cap and a
forced protocol, from the config to the decoder."""
from __future__ import annotations

import json

import pytest

from agent.config import ConfigError, parse_config
from agent.l7.llm import Protocol
from agent.l7.record import ConnectionDecoder, DecoderOptions
from agent.l7.http1 import Direction
from agent.l7.redact import compile_redaction

BASE = """
identities:
  - {name: app, kind: service, select: {cgroups: ["/app*"]}}
  - {name: llama, kind: model, version: "1", endpoints: ["127.0.0.1:8000"]}
  - {name: scribe, kind: model, version: "1", endpoints: ["127.0.0.1:8001"], llm: {capture_content: false}}
policies:
  - {from: app, to: [llama, scribe]}
"""


def _call(model: str, text: str) -> bytes:
    b = json.dumps({"messages": [{"role": "user", "content": text}], "model": model}).encode()
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b


def _answer(model: str, text: str) -> bytes:
    b = json.dumps({"model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b) + b


def _decode(d: ConnectionDecoder, req: bytes, resp: bytes):
    out = d.feed(Direction.REQUEST, 1, req)
    out += d.feed(Direction.RESPONSE, 2, resp)
    return out


def test_global_capture_content_is_the_default_and_an_identity_overrides_it():
    cfg = parse_config(BASE + "llm: {capture_content: true}\n")
    assert cfg.capture_content(cfg.identity("llama")) is True
    assert cfg.capture_content(cfg.identity("scribe")) is False          # its own false wins
    assert parse_config(BASE).capture_content(parse_config(BASE).identity("llama")) is False


def test_redaction_rules_and_content_cap_reach_the_text():
    cfg = parse_config(BASE + "llm: {capture_content: true, content_max_chars: 40, redact: ['order-[0-9]+']}\n")
    opts = DecoderOptions(capture_content=True, redact=tuple(compile_redaction(r) for r in cfg.llm.redact),
                          content_cap=cfg.llm.content_max_chars)
    [rec] = _decode(opts.decoder(1), _call("m", "about order-12345 from bob@example.com " + "x" * 100),
                    _answer("m", "ok"))
    assert rec.prompt_text is not None and "order-12345" not in rec.prompt_text
    assert "bob@example.com" not in rec.prompt_text          # the built-in rule applies as well
    assert len(rec.prompt_text) <= 40 + len("[REDACTED]") * 2 and rec.completion_text == "ok"


def test_a_forced_protocol_records_only_its_own_calls():
    anth = DecoderOptions(protocol=Protocol.ANTHROPIC)
    assert _decode(anth.decoder(1), _call("m", "hi"), _answer("m", "ok")) == []        # an OpenAI path: not a call
    auto = DecoderOptions()
    assert [r.request_model for r in _decode(auto.decoder(2), _call("m", "hi"), _answer("m", "ok"))] == ["m"]


@pytest.mark.parametrize("section,field", [
    ("{redact: ['(unclosed']}", "redact.0"),
    ("{content_max_chars: -1}", "content_max_chars"),
    ("{capture: true}", "capture"),
])
def test_bad_llm_settings_name_the_field(section, field):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + f"llm: {section}\n")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_a_catastrophic_backtracking_pattern_runs_in_linear_time():
    """`(a+)+$` on 'a' * 50 + '!' backtracks ~2**50 steps with Python's re (minutes); RE2 returns at once: the test
    proves it by completing. The pattern is the config's, the text the workload's prompt."""
    cfg = parse_config(BASE + "llm: {capture_content: true, redact: ['(a+)+$', 'x(b+)+y']}\n")
    opts = DecoderOptions(capture_content=True, redact=tuple(compile_redaction(r) for r in cfg.llm.redact))
    evil = "a" * 50 + "!"
    [rec] = _decode(opts.decoder(1), _call("m", evil + " " + "x" + "b" * 5000 + "z"), _answer("m", "a" * 50))
    assert rec.prompt_text == evil + " x" + "b" * 5000 + "z"     # neither matches: nothing redacted
    assert rec.completion_text == "[REDACTED]"                   # (a+)+$ does match a run of a's at the end


@pytest.mark.parametrize("pattern", [r"(secret)-\1", "(?=token)tok", "(?<!x)key"],
                         ids=["backreference", "lookahead", "lookbehind"])
def test_a_pattern_re2_cannot_compile_is_refused_at_load_naming_the_field_and_the_pattern(pattern):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + "llm: {redact: ['order-[0-9]+', '%s']}\n" % pattern)
    msg = str(e.value)
    assert "redact.1" in msg and repr(pattern) in msg and "RE2" in msg and "\n" not in msg
