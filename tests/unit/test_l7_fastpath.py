"""The decoder's fast paths give what the slow ones gave: the struct mirror of capture_event against the ctypes one,
the SSE leaf walk against every leaf."""
from __future__ import annotations

import ctypes as ct
import json
import struct

import pytest

from agent.kernel import abi
from agent.l7 import llm
from agent.l7.http1 import Direction
from agent.l7.capture import _EVENT, _EVENT_FIELDS, decode_capture_event, struct_format


def test_struct_mirror_matches_the_ctypes_capture_event() -> None:
    assert _EVENT.size == ct.sizeof(abi.CaptureEvent)
    values = {name: (i + 1) * 0x01010101 & ((1 << (8 * ct.sizeof(typ))) - 1)
              for i, (name, typ, *_) in enumerate(abi.CaptureEvent._fields_) if not issubclass(typ, ct.Array)}
    raw = bytes(abi.CaptureEvent(**values))
    assert dict(zip(_EVENT_FIELDS, _EVENT.unpack(raw))) == values


def test_struct_format_follows_added_fields_and_refuses_others() -> None:
    class Wider(ct.Structure):
        _fields_ = [("a", ct.c_uint8), ("b", ct.c_uint64), ("c", ct.c_int16), ("pad", ct.c_uint8 * 3)]
    fmt = struct_format(Wider)
    assert struct.calcsize(fmt) == ct.sizeof(Wider)
    w = Wider(a=7, b=2**63 + 5, c=-3)
    assert struct.unpack(fmt, bytes(w)) == (7, 2**63 + 5, -3)

    class Bad(ct.Structure):
        _fields_ = [("f", ct.c_double)]
    with pytest.raises(ValueError, match="Bad.f"):
        struct_format(Bad)


def test_decoded_chunk_fields() -> None:
    h = abi.CaptureEvent(ts_ns=5, cookie=9, tgid=3, fd=4, src_id=16, dst_id=17, actual_dst_id=18, total=10, offset=2,
                         len=3, kind=abi.CaptureKind.DATA, direction=abi.CaptureDirection.RECV,
                         flags=abi.CaptureEventFlag.TLS)
    c = decode_capture_event(bytes(h) + b"abc" + b"\0" * 10)
    assert (c.ts_ns, c.cookie, c.pid, c.fd, c.src_id, c.dst_id, c.actual_dst_id, c.total, c.offset, c.data, c.tls) == \
        (5, 9, 3, 4, 16, 17, 18, 10, 2, b"abc", True)
    assert c.kind is abi.CaptureKind.DATA and c.direction is Direction.RESPONSE




class _Recorder(llm.ResponseParse):
    def __init__(self, text: bool) -> None:
        super().__init__(llm.Protocol.OPENAI, llm.Operation.CHAT, 200, "text/event-stream", text, 1000)
        self.seen: list[tuple[str, object]] = []

    def _absorb(self, path: str, value: object) -> None:
        self.seen.append((path, value))


EVENTS = [
    {"model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": [
        {"token": "hi", "logprob": -0.1, "top_logprobs": [{"logprob": -2}]}]}, "finish_reason": None}]},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}},
    {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 3, "cache_read_input_tokens": 2}}},
    {"type": "response.output_text.delta", "delta": "x", "error": {"type": "t", "code": "c"}},
    {"error": "boom", "choices": {"item": {"finish_reason": "odd"}}, "x": [[1, 2], {"model": 3}]},
    {"response": {"model": "r", "status": "completed", "usage": {"output_tokens": 4}}, "done_reason": "stop"},
]


@pytest.mark.parametrize("text", [True, False])
@pytest.mark.parametrize("event", EVENTS)
def test_leaf_walk_absorbs_what_every_leaf_gives(event: dict, text: bool) -> None:
    r = _Recorder(text)
    r._absorb_tree(json.loads(json.dumps(event)), r._trie)
    used = llm._ABSORBED if text else llm._ABSORBED - llm._COMPLETION - {"delta"}
    assert r.seen == [(p, v) for p, v in llm._leaves(event, "") if p in used and v is not None]
    assert r.seen    # every event above has something to absorb
