"""agent.kernel.ringbuf.walk over fake ring buffers laid out as the kernel does (no kernel, no root)."""
from __future__ import annotations

import struct

from agent.kernel.ringbuf import RINGBUF_BUSY_BIT, RINGBUF_DISCARD_BIT, walk

SIZE = 256
BASE = 16       # stands in for the producer page in front of the data


class FakeRing:
    """A data area of SIZE bytes, mapped twice after BASE bytes, written with records from position start on."""

    def __init__(self, start: int = 0) -> None:
        self.data = bytearray(SIZE)
        self.start = start
        self.prod = start

    def put(self, payload: bytes, flags: int = 0) -> int:
        pos = self.prod
        rec = struct.pack("=II", len(payload) | flags, 0) + payload
        for i, b in enumerate(rec):
            self.data[(pos + i) % SIZE] = b
        self.prod += (len(rec) + 7) & ~7
        return pos

    def image(self) -> tuple[memoryview, bytes]:
        buf = bytes(BASE) + bytes(self.data) * 2
        return memoryview(buf).cast("I"), buf

    def walk(self, max_records: int = 100, pos: int | None = None, count_from: int = 0) -> tuple[list[bytes], int, int]:
        hdr32, buf = self.image()
        out: list[bytes] = []
        end, discarded = walk(hdr32, buf, BASE, SIZE - 1, self.start if pos is None else pos, self.prod,
                              max_records, out, count_from)
        return out, end, discarded


def test_records_in_order_with_alignment():
    r = FakeRing()
    r.put(b"a")
    r.put(b"12345678")
    r.put(b"")
    out, end, discarded = r.walk()
    assert out == [b"a", b"12345678", b""]
    assert end == 16 + 16 + 8 == r.prod and discarded == 0


def test_discarded_skipped_and_busy_stops():
    r = FakeRing()
    r.put(b"one")
    r.put(b"gone", RINGBUF_DISCARD_BIT)
    r.put(b"two")
    busy = r.put(b"later", RINGBUF_BUSY_BIT)
    r.put(b"after busy")
    out, end, discarded = r.walk()
    assert out == [b"one", b"two"] and discarded == 1 and end == busy


def test_max_records_and_count_from():
    r = FakeRing()
    r.put(b"one")
    second = r.put(b"x", RINGBUF_DISCARD_BIT)
    r.put(b"two")
    r.put(b"three")
    out, end, discarded = r.walk(max_records=2)
    assert out == [b"one", b"two"] and discarded == 1
    out, end2, discarded = r.walk(pos=0, count_from=second + 8)   # walked before: not counted again
    assert out == [b"one", b"two", b"three"] and discarded == 0 and end2 == r.prod > end


def test_record_straddling_the_end_is_contiguous():
    r = FakeRing(start=10 * SIZE + SIZE - 24)       # many wraps in; 24 bytes before the end of the data area
    r.put(b"abcdefgh")                               # 16 bytes: fits
    r.put(bytes(range(40)))                          # header fits, payload crosses the end
    r.put(b"tail")
    out, end, _ = r.walk()
    assert out == [b"abcdefgh", bytes(range(40)), b"tail"] and end == r.prod
