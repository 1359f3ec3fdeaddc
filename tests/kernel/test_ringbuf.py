"""agent.kernel.ringbuf.RingReader against real BPF ring buffers filled by a tracepoint on getppid().

The program emits one struct per getppid() call of this test process: a sequence number from an array counter and a
payload derived from it, so every record can be checked. Every DISCARD_EVERY-th sequence number is reserved and
discarded instead; a failed output or reserve (ring full) is counted in a slot of the counter array.
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import select
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from bcc import BPF, libbcc

from agent.kernel.ringbuf import RingError, RingReader

REPO = Path(__file__).resolve().parents[2]

PROGRAM = r"""
struct event {
    u64 seq;
    u32 pid;
    u32 len;
    u64 words[WORDS];
};

BPF_RINGBUF_OUTPUT(events, PAGES);
BPF_ARRAY(counters, u64, 4);    /* 0 next seq, 1 dropped (output/reserve failed), 2 discarded */

static __always_inline void bump(u32 slot) {
    u64 *v = counters.lookup(&slot);
    if (v)
        __sync_fetch_and_add(v, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != TEST_PID)
        return 0;
    u32 k = 0;
    u64 *next = counters.lookup(&k);
    if (!next)
        return 0;
    u64 seq = __sync_fetch_and_add(next, 1);
    if (DISCARD_EVERY && seq % DISCARD_EVERY == DISCARD_EVERY - 1) {
        struct event *r = events.ringbuf_reserve(sizeof(struct event));
        if (!r) {
            bump(1);
            return 0;
        }
        r->seq = seq;
        events.ringbuf_discard(r, 0);
        bump(2);
        return 0;
    }
    struct event e = {};
    e.seq = seq;
    e.pid = TEST_PID;
    e.len = sizeof(e);
#pragma unroll
    for (int i = 0; i < WORDS; i++)
        e.words[i] = seq * 0x9E3779B97F4A7C15ULL + i;
    if (events.ringbuf_output(&e, sizeof(e), 0) != 0)
        bump(1);
    return 0;
}
"""

HEAD = struct.Struct("=QII")
SLOT_NEXT, SLOT_DROPPED, SLOT_DISCARDED = 0, 1, 2


@dataclass
class Producer:
    bpf: BPF
    fd: int
    words: int
    discard_every: int

    @property
    def record_size(self) -> int:
        return HEAD.size + 8 * self.words

    def emit(self, n: int) -> None:
        for _ in range(n):
            os.getppid()

    def counter(self, slot: int) -> int:
        return int(self.bpf[b"counters"][ct.c_int(slot)].value)

    def kept(self, seqs: range) -> list[int]:
        """The sequence numbers in seqs that are output, not discarded."""
        d = self.discard_every
        return [s for s in seqs if not d or s % d != d - 1]


def decode(rec: bytes, words: int) -> int:
    """The record's sequence number, after checking every field derived from it."""
    seq, pid, ln = HEAD.unpack_from(rec)
    assert len(rec) == HEAD.size + 8 * words == ln, f"record length {len(rec)}, header says {ln}"
    assert pid == os.getpid()
    got = struct.unpack_from(f"={words}Q", rec, HEAD.size)
    want = tuple((seq * 0x9E3779B97F4A7C15 + i) & (2 ** 64 - 1) for i in range(words))
    assert got == want, f"payload of seq {seq} is corrupt"
    return seq


@pytest.fixture
def producer_factory() -> Iterator:
    loaded: list[BPF] = []

    def make(pages: int, words: int, discard_every: int = 3) -> Producer:
        b = BPF(text=PROGRAM.encode(), cflags=[f"-DTEST_PID={os.getpid()}", f"-DPAGES={pages}", f"-DWORDS={words}",
                                      f"-DDISCARD_EVERY={discard_every}"])
        loaded.append(b)
        fd = libbcc.lib.bpf_table_fd(b.module, b"events")
        assert fd >= 0
        return Producer(b, fd, words, discard_every)

    yield make
    for b in loaded:
        b.cleanup()


def drain(reader: RingReader, words: int, batch: int = 1000) -> list[int]:
    seqs: list[int] = []
    while True:
        recs, pos = reader.read(batch)
        reader.commit(pos)
        seqs += [decode(r, words) for r in recs]
        if not recs:
            return seqs


def test_order_no_gaps_and_discards_skipped(producer_factory):
    p = producer_factory(pages=64, words=6)
    r = RingReader(p.fd, "events")
    try:
        assert r.capacity == 64 * 4096
        assert r.pending_bytes() == 0 and r.consumer_pos == 0
        p.emit(300)
        seqs = drain(r, p.words, batch=64)
        assert seqs == p.kept(range(300))
        assert r.discarded == p.counter(SLOT_DISCARDED) == 100
        assert p.counter(SLOT_DROPPED) == 0
        assert r.pending_bytes() == 0
    finally:
        r.close()


def test_read_without_commit_repeats_and_commit_advances(producer_factory):
    p = producer_factory(pages=16, words=2)
    r = RingReader(p.fd, "events")
    try:
        p.emit(20)
        first, pos1 = r.read(5)
        again, pos2 = r.read(5)
        assert first == again and pos1 == pos2 and len(first) == 5
        assert r.discarded == 2                  # seqs 2 and 5, walked twice, counted once
        assert r.consumer_pos == 0
        r.commit(pos1)
        assert r.consumer_pos == pos1
        nxt, _ = r.read(5)
        assert [decode(x, p.words) for x in first + nxt] == p.kept(range(20))[:10]
        # bounds: never backwards, never past what the producer reserved
        with pytest.raises(RingError, match="behind consumer_pos"):
            r.commit(pos1 - 8)
        with pytest.raises(RingError, match="past producer_pos"):
            r.commit(r.consumer_pos + r.pending_bytes() + 8)
    finally:
        r.close()


def test_poll_on_fileno_tells_when_records_are_pending(producer_factory):
    p = producer_factory(pages=16, words=2)
    r = RingReader(p.fd, "events")
    try:
        poller = select.poll()
        poller.register(r.fileno(), select.POLLIN)
        assert poller.poll(0) == []
        p.emit(4)
        assert poller.poll(1000) == [(r.fileno(), select.POLLIN)]
        assert len(drain(r, p.words)) == 3
        assert poller.poll(0) == []
    finally:
        r.close()


def test_small_ring_wraps_many_times_and_straddling_records_decode(producer_factory):
    # 64-byte records (72 with header) in a one-page ring: 4096 is no multiple of 72, so records straddle the end.
    p = producer_factory(pages=1, words=6, discard_every=3)
    r = RingReader(p.fd, "events")
    total = (p.record_size + 8 + 7) & ~7
    try:
        assert r.capacity == 4096
        per_fill = r.capacity // total           # every record fits: nothing is dropped
        seqs: list[int] = []
        straddled = 0
        for _ in range(150):
            start = r.consumer_pos
            p.emit(per_fill)
            recs, pos = r.read(10_000)
            assert pos == start + per_fill * total   # discarded ones are walked over too
            # the records were laid contiguously from start: count those whose payload crosses the end of the data
            straddled += sum(1 for i in range(per_fill)
                             if ((start + i * total) & (r.capacity - 1)) + 8 < r.capacity
                             < ((start + i * total) & (r.capacity - 1)) + 8 + p.record_size)
            r.commit(pos)
            seqs += [decode(x, p.words) for x in recs]
        assert r.consumer_pos // r.capacity >= 100, "positions should have wrapped many times"
        assert straddled > 0
        assert seqs == p.kept(range(150 * per_fill))
        assert p.counter(SLOT_DROPPED) == 0
    finally:
        r.close()


def test_full_ring_drops_are_counted(producer_factory):
    p = producer_factory(pages=1, words=6, discard_every=3)
    r = RingReader(p.fd, "events")
    try:
        produced = 0
        read: list[int] = []
        for _ in range(5):
            p.emit(500)                          # far more than one page holds: the kernel drops the rest
            produced += 500
            read += drain(r, p.words)
        dropped = p.counter(SLOT_DROPPED)
        assert dropped > 0
        assert p.counter(SLOT_NEXT) == produced
        assert len(read) + r.discarded + dropped == produced
        assert read == sorted(read) and len(set(read)) == len(read)
    finally:
        r.close()


def test_restarted_reader_continues_from_committed_position(producer_factory):
    p = producer_factory(pages=16, words=2)
    first = RingReader(p.fd, "events")
    p.emit(30)
    recs, _ = first.read(8)
    first.commit(first.read(4)[1])               # commit 4 of them; the 4 after are read but not committed
    first.close()
    second = RingReader(p.fd, "events")
    try:
        assert second.consumer_pos > 0
        rest = drain(second, p.words)
        assert [decode(x, p.words) for x in recs[:4]] + rest == p.kept(range(30))
    finally:
        second.close()


CHILD = r"""
import ctypes, json, sys
from agent.kernel.ringbuf import RingReader
lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
fd = lib.bpf_obj_get(sys.argv[1].encode())
if fd < 0:
    sys.exit(f"bpf_obj_get {sys.argv[1]}: errno {ctypes.get_errno()}")
r = RingReader(fd, "events")
recs, pos = r.read(int(sys.argv[2]))
r.commit(pos)
r.close()
print(json.dumps({"recs": [x.hex() for x in recs], "pos": pos, "bcc": "bcc" in sys.modules}))
"""


def test_reader_in_another_process_through_bpffs(producer_factory):
    p = producer_factory(pages=16, words=4)
    pin_dir = Path(f"/sys/fs/bpf/aimesh-test-{uuid.uuid4().hex[:12]}")
    pin = pin_dir / "events"
    pin_dir.mkdir()
    try:
        assert libbcc.lib.bpf_obj_pin(p.fd, str(pin).encode()) == 0
        p.emit(30)
        out = subprocess.run([sys.executable, "-c", CHILD, str(pin), "10"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["bcc"] is False
        seqs = [decode(bytes.fromhex(x), p.words) for x in got["recs"]]
        want = p.kept(range(30))
        assert seqs == want[:10]
        # the child's commit is visible here: the loader's reader continues after it
        r = RingReader(p.fd, "events")
        try:
            assert r.consumer_pos == got["pos"]
            assert drain(r, p.words) == want[10:]
        finally:
            r.close()
    finally:
        if pin.exists():
            os.unlink(pin)
        pin_dir.rmdir()


def test_not_a_ringbuf_map_is_refused(producer_factory):
    p = producer_factory(pages=1, words=1)
    array_fd = libbcc.lib.bpf_table_fd(p.bpf.module, b"counters")
    with pytest.raises(RingError, match="map_type 2, not 27"):
        RingReader(array_fd, "counters")
