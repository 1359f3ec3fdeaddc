"""The decoder's fast paths give what the slow ones gave: the struct mirror of capture_event against the ctypes one,
the SSE leaf walk against every leaf, a chunked body read in any pieces against one read."""
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


def _records(cuts: list[int]) -> list:
    from agent.l7.record import ConnectionDecoder
    from bench.decode_micro import llm_request, llm_response
    req, resp = llm_request(4096), b"".join(llm_response(20))
    dec = ConnectionDecoder("c")
    out = []
    for n in range(2):
        out += dec.feed(Direction.REQUEST, 10 * n + 1, req)
        at = 0
        for i, cut in enumerate(sorted(set(cuts)) + [len(resp)]):
            out += dec.feed(Direction.RESPONSE, 10 * n + 2, resp[at:cut])
            at = cut
    return out + dec.close(99)


@pytest.mark.parametrize("cuts", [[1, 2, 3], [100, 101, 2000, 4096], list(range(0, 5000, 97))])
def test_chunked_body_cut_anywhere_gives_what_one_read_gives(cuts: list[int]) -> None:
    """The pieces fed to llhttp end at each CRLF CRLF of a chunked body: reads cut anywhere end the call alike."""
    split, whole = _records(cuts), _records([])
    assert len(split) == 2 and split == whole
    assert split[0].output_tokens == 20 and split[0].output_chunks == 22 and not split[0].incomplete


def test_a_bad_chunk_size_is_a_protocol_error() -> None:
    from agent.l7.http1 import Http1Connection, Undecoded, UndecodedReason
    from bench.decode_micro import llm_request
    h = Http1Connection()
    h.feed(Direction.REQUEST, 1, llm_request(300))
    out = h.feed(Direction.RESPONSE, 2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz\r\n")
    assert [e.reason for e in out if isinstance(e, Undecoded)] == [UndecodedReason.PROTOCOL_ERROR]


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n0\r\nX-T: 1\r\n\r\n"
EXCHANGES = {   # request messages, response messages (a 1xx goes with its final response), response bodies
    "head": ([b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", GET],
             [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"],
             [b"", b"hi"]),
    "continue": ([b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"],
                 [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], [b"ok"]),
    "until-close": ([GET], [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nrest\r\n\r\nof it"], [b"rest\r\n\r\nof it"]),
    "chunked+trailer": ([GET, GET], [CHUNKED, CHUNKED], [b"\r\n\r\n"] * 2),
}


@pytest.mark.parametrize("name", sorted(EXCHANGES))
@pytest.mark.parametrize("step", [1, 2, 3, 5, 1000])
def test_message_ends_follow_the_request_and_the_framing(name: str, step: int) -> None:
    from agent.l7.http1 import Body, Http1Connection, MessageEnd, Undecoded
    reqs, resps, want = EXCHANGES[name]
    h = Http1Connection()
    evs = []
    for d, wire in ((Direction.REQUEST, b"".join(reqs)), (Direction.RESPONSE, b"".join(resps))):
        for i in range(0, len(wire), step):
            evs += h.feed(d, 1, wire[i:i + step])
    evs += h.close(2)
    ends = [e for e in evs if isinstance(e, MessageEnd)]
    assert not [e for e in evs if isinstance(e, Undecoded)] and all(e.complete for e in ends)
    assert ([e.wire_bytes for e in ends if e.direction is Direction.REQUEST],
            [e.wire_bytes for e in ends if e.direction is Direction.RESPONSE]) == ([len(m) for m in reqs],
                                                                                   [len(m) for m in resps])
    bodies, cur = [], b""
    for e in evs:
        if isinstance(e, Body) and e.direction is Direction.RESPONSE:
            cur += e.data
        elif isinstance(e, MessageEnd) and e.direction is Direction.RESPONSE:
            bodies, cur = bodies + [cur], b""
    assert bodies == want


def test_call_dispatch_follows_a_reload_and_survives_a_sink() -> None:
    from agent.export.call_sinks import CallDispatch
    from agent.policy.identities import IdentityMeta

    class Sink:
        def __init__(self, fail: bool) -> None:
            self.fail, self.got = fail, []

        def emit_call(self, call, source, destination, pid, comm, *, server_address="", server_port=0, dialed=None):
            if self.fail:
                raise RuntimeError("boom")
            self.got.append((source.name, destination.name, dialed.name, comm))

    ids = {1: IdentityMeta(1, "a", "service"), 2: IdentityMeta(2, "m", "model")}
    bad, good, errors = Sink(True), Sink(False), []
    d = CallDispatch(lambda: ids, lambda pid: f"p{pid}", lambda: [bad, good], lambda s, e: errors.append(str(e)))

    class Call:
        record, cookie, pid, src_id, dst_id, actual_dst_id = None, 1, 7, 1, 2, 0
        server_address, server_port = "", 0
    d([Call()])
    ids = {1: IdentityMeta(1, "a2", "service"), 2: IdentityMeta(2, "m", "model")}
    d([Call()])
    assert good.got == [("a", "m", "m", "p7"), ("a2", "m", "m", "p7")]
    assert errors == ["boom", "boom"] and d.calls == 2
