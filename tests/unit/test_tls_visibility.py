"""agent/l7/tls_visibility.py: which captured connections start TLS that aimesh cannot read."""
from __future__ import annotations

from agent.kernel import abi
from agent.l7.capture import CaptureChunk
from agent.l7.http1 import Direction
from agent.l7.tls_visibility import (NotVisible, ProcessInfo, TlsNotVisibleTally, TlsVisibility,
                                     describe_not_visible, looks_like_tls_handshake)

CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]) + b"\x11" * 32
S = 10**9


def chunk(cookie: int, data: bytes = b"", *, ts: int = 0, tls: bool = False, pid: int = 100, offset: int = 0,
          direction: Direction = Direction.REQUEST, close: bool = False) -> CaptureChunk:
    kind = abi.CaptureKind.CLOSE if close else abi.CaptureKind.DATA
    return CaptureChunk(ts, cookie, pid, 3, 16, 17, 17, kind, None if close else direction, len(data), offset, data,
                        tls)


def procs(pid: int) -> ProcessInfo:
    return ProcessInfo(pid, f"app{pid}", f"/usr/bin/app{pid}")


def test_handshake_records_are_recognised():
    assert looks_like_tls_handshake(CLIENT_HELLO)
    assert looks_like_tls_handshake(CLIENT_HELLO[:3])
    assert not looks_like_tls_handshake(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert not looks_like_tls_handshake(b"\x16\x03")
    assert not looks_like_tls_handshake(bytes([0x17, 0x03, 0x03, 0, 5, 1]))    # application data
    assert not looks_like_tls_handshake(bytes([0x16, 0x03, 0x09, 0, 5, 1]))    # no such version
    assert not looks_like_tls_handshake(bytes([0x16, 0x03, 0x03, 0, 5, 2]))    # a ServerHello is not a client start
    assert not looks_like_tls_handshake(b"PRI * HTTP/2.0\r\n")


def test_a_handshake_with_no_plaintext_is_reported_at_close_once_per_process():
    v = TlsVisibility(procs)
    assert v.on_chunk(chunk(1, CLIENT_HELLO)) == []
    assert v.on_chunk(chunk(1, b"\x17\x03\x03junk", direction=Direction.RESPONSE)) == []
    [nv] = v.on_chunk(chunk(1, close=True))
    assert nv == NotVisible(1, 16, ProcessInfo(100, "app100", "/usr/bin/app100"), True)
    v.on_chunk(chunk(2, CLIENT_HELLO))
    [nv2] = v.on_chunk(chunk(2, close=True))
    assert nv2.cookie == 2 and not nv2.first_of_process        # the same process: counted, not logged again
    v.on_chunk(chunk(3, CLIENT_HELLO, pid=200))
    [nv3] = v.on_chunk(chunk(3, close=True, pid=200))
    assert nv3.first_of_process and nv3.process.pid == 200
    line = describe_not_visible(nv3, "chat")
    assert "app200" in line and "pid 200" in line and "/usr/bin/app200" in line and "chat" in line


def test_plaintext_from_the_probes_makes_a_connection_visible():
    v = TlsVisibility(procs)
    v.on_chunk(chunk(1, CLIENT_HELLO))                # uprobes attached late: the handshake went by in the clear
    assert v.on_chunk(chunk(1, b"POST /v1/chat/completions HTTP/1.1\r\n", tls=True)) == []
    assert v.on_chunk(chunk(1, close=True)) == []
    assert v.expire(100 * S) == []


def test_only_the_first_request_bytes_of_a_connection_count():
    v = TlsVisibility(procs)
    v.on_chunk(chunk(1, b"POST /v1/chat/completions HTTP/1.1\r\n"))
    v.on_chunk(chunk(1, CLIENT_HELLO))                              # a body that happens to look like one
    v.on_chunk(chunk(2, CLIENT_HELLO, offset=4096))                 # not the start of a send
    v.on_chunk(chunk(3, CLIENT_HELLO, direction=Direction.RESPONSE))
    assert [v.on_chunk(chunk(c, close=True)) for c in (1, 2, 3)] == [[], [], []]


def test_a_connection_left_open_is_reported_after_the_grace_period():
    v = TlsVisibility(procs, grace_ns=10 * S)
    v.on_chunk(chunk(1, CLIENT_HELLO, ts=5 * S))
    assert v.expire(14 * S) == []
    [nv] = v.expire(15 * S)
    assert nv.cookie == 1
    assert v.expire(100 * S) == [] and v.on_chunk(chunk(1, close=True)) == []   # reported once


def test_a_handshake_seen_elsewhere_counts_the_same():
    v = TlsVisibility(procs)
    v.on_handshake(9, 300, 16, 0)
    [nv] = v.on_chunk(chunk(9, close=True, pid=300))
    assert nv.process.comm == "app300"


def test_state_is_bounded():
    v = TlsVisibility(procs, max_connections=8)
    for c in range(100):
        v.on_chunk(chunk(c, CLIENT_HELLO))
        v.on_chunk(chunk(1000 + c, b"GET / HTTP/1.1\r\n"))
    assert len(v._pending) <= 8 and len(v._seen) <= 8
    assert len(v.expire(10**18)) == 8


def test_the_counter_is_labelled_by_source():
    t = TlsNotVisibleTally()
    t.add("chat")
    t.add("chat")
    t.add("batch")
    [fam] = list(t.collect())
    got = {s.labels["source"]: s.value for s in fam.samples if s.name.endswith("_total")}
    assert fam.name == "aimesh_tls_not_visible" and got == {"batch": 1, "chat": 2}
