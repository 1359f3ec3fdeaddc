"""`python -m bench.ringbuf`: agent CPU per ring buffer record, bcc's callback reader against RingReader.

One bcc program (a tracepoint on getppid() filtered to this process) writes fixed-size records (a sequence number and
a payload) into one BPF_RINGBUF_OUTPUT ring. Each round, for each reader in an order rotated per round, the bench
produces --events records in chunks that fit the ring (a tight os.getppid() loop) and after each chunk drains it
with that reader; only the drain is timed, with time.process_time (this process's CPU, user + system). Readers:

  bcc callback   b['events'].open_ring_buffer(cb) + b.ring_buffer_consume(); cb copies the record with ct.string_at
                 (what agent/kernel/datapath.py does today)
  read+commit    agent.kernel.ringbuf.RingReader.read(batch) + commit(pos) until the ring is empty
  read_into      RingReader.read_into(batch, out) into one list cleared per batch, + commit(pos)

Every reader ends up with the same list of bytes per record; the bench checks the count and the sequence numbers.
Figures: the median over rounds of µs per record, min-max across rounds, and the paired ratio to bcc's reader.
"""
from __future__ import annotations

import argparse
import ctypes as ct
import os
import platform
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

PROGRAM = r"""
struct event {
    u64 seq;
    u8 payload[PAYLOAD];
};

BPF_RINGBUF_OUTPUT(events, PAGES);
BPF_ARRAY(counters, u64, 2);    /* 0 next seq, 1 dropped (ring full) */

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != BENCH_PID)
        return 0;
    u32 k = 0;
    u64 *next = counters.lookup(&k);
    if (!next)
        return 0;
    struct event e = {};
    e.seq = __sync_fetch_and_add(next, 1);
    e.payload[0] = e.seq;
    if (events.ringbuf_output(&e, sizeof(e), 0) != 0) {
        k = 1;
        u64 *dropped = counters.lookup(&k);
        if (dropped)
            __sync_fetch_and_add(dropped, 1);
    }
    return 0;
}
"""

SEQ = struct.Struct("=Q")
SEQ_SIZE = 8


@dataclass(frozen=True)
class Settings:
    events: int
    record_bytes: int
    rounds: int
    pages: int
    batch: int

    @property
    def chunk(self) -> int:
        """Records produced before each drain: half the ring, so the kernel never drops."""
        total = (self.record_bytes + 8 + 7) & ~7
        return max(1, self.pages * 4096 // 2 // total)


# A drain: empties the ring into records, returns how many it took.
Drain = Callable[[list], int]


def bcc_drain(b: object) -> Drain:
    def cb(_ctx: int, data: int, size: int) -> None:
        sink.append(ct.string_at(data, size))

    sink: list[bytes] = []
    b[b"events"].open_ring_buffer(cb)             # type: ignore[index]

    def drain(out: list) -> int:
        sink.clear()
        b.ring_buffer_consume()                   # type: ignore[attr-defined]
        out.extend(sink)
        return len(sink)
    return drain


def reader_drain(reader: object, batch: int) -> Drain:
    def drain(out: list) -> int:
        n = 0
        while True:
            recs, pos = reader.read(batch)        # type: ignore[attr-defined]
            if not recs:
                return n
            reader.commit(pos)                    # type: ignore[attr-defined]
            out.extend(recs)
            n += len(recs)
    return drain


def reader_into_drain(reader: object, batch: int) -> Drain:
    buf: list[bytes] = []

    def drain(out: list) -> int:
        n = 0
        while True:
            buf.clear()
            pos = reader.read_into(batch, buf)    # type: ignore[attr-defined]
            if not buf:
                return n
            reader.commit(pos)                    # type: ignore[attr-defined]
            out.extend(buf)
            n += len(buf)
    return drain


def one_run(drain: Drain, s: Settings) -> tuple[float, list[bytes]]:
    """Produce s.events records chunk by chunk, draining after each; CPU seconds of the drains, and the records."""
    cpu = 0.0
    got: list[bytes] = []
    left = s.events
    getppid = os.getppid
    while left > 0:
        n = min(left, s.chunk)
        for _ in range(n):
            getppid()
        left -= n
        t0 = time.process_time()
        drain(got)
        cpu += time.process_time() - t0
    return cpu, got


def check(name: str, got: list[bytes], first_seq: int, s: Settings) -> Optional[str]:
    if len(got) != s.events:
        return f"{name}: read {len(got)} records, produced {s.events}"
    if len(got[0]) != s.record_bytes or SEQ.unpack_from(got[0])[0] != first_seq \
            or SEQ.unpack_from(got[-1])[0] != first_seq + s.events - 1:
        return f"{name}: records out of sequence or of the wrong size"
    return None


def run(s: Settings) -> int:
    from bcc import BPF, libbcc

    from agent.kernel.ringbuf import RingReader

    b = BPF(text=PROGRAM.encode(), cflags=[f"-DBENCH_PID={os.getpid()}", f"-DPAGES={s.pages}",
                                           f"-DPAYLOAD={s.record_bytes - SEQ_SIZE}"])
    reader = None
    try:
        fd = libbcc.lib.bpf_table_fd(b.module, b"events")
        reader = RingReader(fd, "events")
        drains: dict[str, Drain] = {"bcc callback": bcc_drain(b), "read+commit": reader_drain(reader, s.batch),
                                    "read_into": reader_into_drain(reader, s.batch)}
        names = list(drains)
        per: dict[str, list[float]] = {n: [] for n in names}
        print(f"ringbuf bench: {s.events} records of {s.record_bytes} B per reader per round, {s.rounds} rounds, "
              f"ring {s.pages} pages, {s.chunk} records per drain, RingReader batch {s.batch}; "
              f"kernel {platform.release()}, python {platform.python_version()}", flush=True)
        seq = 0
        for rnd in range(s.rounds + 1):           # round 0 warms up (page faults, caches) and is not counted
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                cpu, got = one_run(drains[name], s)
                err = check(name, got, seq, s)
                if err:
                    print(f"ringbuf bench: {err}", file=sys.stderr)
                    return 1
                seq += s.events
                if rnd:
                    per[name].append(cpu / s.events * 1e6)
            if rnd:
                print(f"  round {rnd}: " + ", ".join(f"{n} {per[n][-1]:.3f}" for n in names) + " µs/record",
                      flush=True)
        dropped = int(b[b"counters"][ct.c_int(1)].value)
        base = per[names[0]]
        print(f"\n{'reader':<16}{'µs/record median':>18}{'min-max':>18}{'÷ bcc (paired)':>16}")
        for n in names:
            v = per[n]
            ratio = statistics.median(x / y for x, y in zip(v, base))
            print(f"{n:<16}{statistics.median(v):>18.3f}{f'{min(v):.3f}-{max(v):.3f}':>18}{ratio:>16.3f}")
        print(f"kernel drops: {dropped}")
        return 0
    finally:
        if reader is not None:
            reader.close()
        b.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ringbuf", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="records per reader per round")
    p.add_argument("--record-bytes", type=int, default=200, help="payload bytes per record (>= 8)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pages", type=int, default=1024, help="ring size in pages (the agent's flow ring: 1024)")
    p.add_argument("--batch", type=int, default=1024, help="max_records per RingReader.read")
    a = p.parse_args(argv)
    if a.events < 1 or a.rounds < 1 or a.batch < 1 or a.record_bytes < SEQ_SIZE or a.pages < 1 \
            or a.pages & (a.pages - 1):
        p.error("--events, --rounds, --batch >= 1; --record-bytes >= 8; --pages a power of 2")
    if os.geteuid() != 0:
        print("bench.ringbuf: must run as root (it loads a BPF program)", file=sys.stderr)
        return 1
    return run(Settings(events=a.events, record_bytes=a.record_bytes, rounds=a.rounds, pages=a.pages,
                        batch=a.batch))


if __name__ == "__main__":
    sys.exit(main())
