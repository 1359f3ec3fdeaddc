"""Read a BPF_MAP_TYPE_RINGBUF map from its mmap'd pages, in batches, without bcc or libbpf.

The map's fd is mmap'd the way libbpf's ring_buffer__add() does (tools/lib/bpf/ringbuf.c; the kernel side is
kernel/bpf/ringbuf.c):

    offset 0          one page, read-write: u64 consumer_pos (ours to write)
    offset PAGE_SIZE  one page, read-only:  u64 producer_pos (the kernel's)
                      then the data area, size bytes, mapped twice in a row, so a record that wraps is contiguous

Each record starts at data[pos & (size - 1)] with an 8-byte header, u32 len (bit 31 BUSY: reserved, not yet
committed; bit 30 DISCARD; the low 30 bits the payload length) and u32 pg_off (the kernel's), and takes
round_up(len + 8, 8) bytes. Positions only grow (u64, they do not wrap in practice).

Reading never moves the consumer position: read() returns the records and the position after them; commit(pos)
hands that space back to the kernel once the caller has dealt with the records. So a reader that dies between the
two, or a new RingReader on the same map (a restarted agent), sees the uncommitted records again.

Memory order: x86 is TSO, the kernel publishes a record by clearing BUSY with an xchg after writing the payload, and
every load below is a fresh read of the shared pages (native-width loads through a memoryview and struct), so the
header is read before the payload and producer_pos is read once per batch. Native byte order: the kernel writes it.
"""
from __future__ import annotations

import mmap
import select
import struct
from typing import Optional

BPF_MAP_TYPE_RINGBUF = 27
RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30
RINGBUF_LEN_MASK = RINGBUF_DISCARD_BIT - 1
RINGBUF_HDR_SZ = 8

_POS = struct.Struct("=Q")      # native, one 8-byte load/store (memcpy), never torn on x86-64


class RingError(Exception):
    """A ring buffer map that cannot be opened or a position that cannot be committed."""


def map_info(map_fd: int) -> dict[str, str]:
    """The key: value lines of /proc/self/fdinfo/<map_fd> (map_type, max_entries, map_id, ...)."""
    try:
        with open(f"/proc/self/fdinfo/{map_fd}", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RingError(f"map fd {map_fd}: cannot read its fdinfo ({e.strerror})") from None
    info: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def walk(hdr32: memoryview, data: bytes | mmap.mmap, base: int, mask: int, pos: int, prod: int,
         max_records: int, out: list[bytes], count_from: int = 0) -> tuple[int, int]:
    """Append to out the payloads of up to max_records committed records between pos and prod.

    hdr32 is data cast to native u32 (for the headers), data anything whose slices are bytes (the mmap), base the
    offset of the data area in data, mask its size - 1. Discarded records are skipped, a BUSY record ends the walk.
    Returns (position after the last record walked, discarded records skipped at or after count_from: a walk that
    goes over the same records again does not count them twice). Pure: the unit tests drive it with
    a fake buffer.
    """
    discarded = 0
    left = max_records
    app = out.append
    flags_from = RINGBUF_DISCARD_BIT        # locals: a global lookup per record costs more than the compare
    busy = RINGBUF_BUSY_BIT
    len_mask = RINGBUF_LEN_MASK
    while pos < prod and left > 0:
        off = base + (pos & mask)
        ln = hdr32[off >> 2]
        if ln < flags_from:                            # neither BUSY nor DISCARD: the common case
            app(data[off + 8:off + 8 + ln])            # the header is 8 bytes
            left -= 1
            pos += (ln + 15) & ~7                      # round_up(8 + len, 8)
        elif ln & busy:                                # reserved, not committed yet: later records wait for it
            break
        else:
            if pos >= count_from:
                discarded += 1
            pos += ((ln & len_mask) + 15) & ~7
    return pos, discarded


class RingReader:
    """One BPF_MAP_TYPE_RINGBUF map, read from its mmap'd pages in batches."""

    def __init__(self, map_fd: int, name: str) -> None:
        self.name = name
        self._fd = map_fd
        info = map_info(map_fd)
        if info.get("map_type") != str(BPF_MAP_TYPE_RINGBUF):
            raise RingError(f"ring {name}: map fd {map_fd} has map_type {info.get('map_type')}, not "
                            f"{BPF_MAP_TYPE_RINGBUF} (ringbuf)")
        try:
            size = int(info["max_entries"])
        except (KeyError, ValueError):
            raise RingError(f"ring {name}: map fd {map_fd} fdinfo has no max_entries") from None
        page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % page:
            raise RingError(f"ring {name}: max_entries {size} is not a power-of-2 multiple of the page size")
        self._size = size
        self._mask = size - 1
        self._base = page                      # data area offset in the producer mapping
        self.discarded = 0                     # discarded records skipped by read(), each counted once
        self._walked = 0                       # furthest position a read() reached
        try:
            self._cons_mm = mmap.mmap(map_fd, page, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except OSError as e:
            raise RingError(f"ring {name}: mmap of the consumer page failed ({e.strerror})") from None
        try:
            self._prod_mm = mmap.mmap(map_fd, page + 2 * size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ, offset=page)
        except OSError as e:
            self._cons_mm.close()
            raise RingError(f"ring {name}: mmap of the producer page and data failed ({e.strerror})") from None
        # Python's mmap keeps a dup of map_fd until close(); the mappings hold the map either way.
        self._hdr32 = memoryview(self._prod_mm).cast("I")
        self._closed = False

    def fileno(self) -> int:
        """The map fd: poll()/select() on it is readable while records are pending."""
        return self._fd

    @property
    def capacity(self) -> int:
        """Data bytes of the ring (max_entries)."""
        return self._size

    @property
    def consumer_pos(self) -> int:
        return _POS.unpack_from(self._cons_mm, 0)[0]

    @property
    def producer_pos(self) -> int:
        return _POS.unpack_from(self._prod_mm, 0)[0]

    def pending_bytes(self) -> int:
        """Bytes reserved by the producer and not yet committed by a reader (including records still BUSY)."""
        return _POS.unpack_from(self._prod_mm, 0)[0] - _POS.unpack_from(self._cons_mm, 0)[0]

    def read(self, max_records: int, start: Optional[int] = None) -> tuple[list[bytes], int]:
        """Up to max_records committed records from the consumer position on (or from `start`, a position between
        the consumer and the producer returned by an earlier read: a reader that saves records asynchronously reads
        ahead of what it has committed), as bytes (copies of the payload, without the 8-byte header); discarded
        records are skipped (counted in self.discarded), a BUSY record stops the walk. Returns (records, position
        after the last record walked). Does NOT advance the consumer position."""
        out: list[bytes] = []
        return out, self.read_into(max_records, out, start)

    def read_into(self, max_records: int, out: list[bytes], start: Optional[int] = None) -> int:
        """read(), appending to out; returns the position after the last record walked."""
        cons = _POS.unpack_from(self._cons_mm, 0)[0]
        if start is None or start < cons:
            start = cons
        pos, discarded = walk(self._hdr32, self._prod_mm, self._base, self._mask,
                              start, _POS.unpack_from(self._prod_mm, 0)[0],
                              max_records, out, self._walked)
        if discarded:
            self.discarded += discarded
        if pos > self._walked:
            self._walked = pos
        return pos

    def commit(self, pos: int) -> None:
        """Give the space before pos back to the kernel: pos becomes consumer_pos (never backwards, never past
        producer_pos, 8-byte aligned as every record boundary is)."""
        cons = _POS.unpack_from(self._cons_mm, 0)[0]
        if pos == cons:
            return
        if pos < cons:
            raise RingError(f"ring {self.name}: commit position {pos} is behind consumer_pos {cons}")
        prod = _POS.unpack_from(self._prod_mm, 0)[0]
        if pos > prod:
            raise RingError(f"ring {self.name}: commit position {pos} is past producer_pos {prod}")
        if pos & 7:
            raise RingError(f"ring {self.name}: commit position {pos} is not 8-byte aligned")
        _POS.pack_into(self._cons_mm, 0, pos)

    def close(self) -> None:
        """Unmap both mappings (the map fd stays open: it is the caller's)."""
        if self._closed:
            return
        self._closed = True
        self._hdr32.release()
        self._prod_mm.close()
        self._cons_mm.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_readable(readers: list[RingReader], timeout_ms: int) -> list[RingReader]:
    """The readers whose rings have pending records, waiting up to timeout_ms for one (poll(2) on the map fds)."""
    p = select.poll()
    by_fd = {r.fileno(): r for r in readers}
    for fd in by_fd:
        p.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in p.poll(timeout_ms)]
