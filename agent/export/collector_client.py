"""The agent's exporters to the collector: batch records and push them, surviving collector outages.

One implementation (BatchExporter) serves every kind of record the collector stores; a BatchKind names the RPC, the
batch message and how a record becomes its proto. FlowExporter pushes flow records (Push, FlowBatch),
ModelCallExporter model calls (PushCalls, ModelCallBatch). Each exporter has its own spool directory and its own
sequence space (the collector keeps sequences per agent and per kind).

    exporter = FlowExporter(ExporterConfig(target="collector:4317", agent_id="node-a", spool_dir=Path(...)))
    exporter.start()
    exporter.submit(record)      # cheap, never blocks; False when the queue is full (counted)
    ...
    exporter.close()             # sends what it can within close_timeout_s, spools the rest

Pipeline, all but submit() on one background thread:
  submit -> incoming queue (max_queue_records) -> batch builder (batch_max_records / batch_max_bytes /
  flush_interval_s) -> sealed batch with (agent_id, sequence) -> outbox -> Push.
The outbox is memory (memory_max_bytes) backed by the spool directory (spool_max_bytes): when memory is full, or
while the spool holds anything (to keep order), sealed batches go to disk, one file per batch. A batch that fits
neither is dropped and counted. Spooled batches survive an agent restart and are sent first.

A batch keeps its sequence through every retry, so the collector stores it once even when a reply was lost.
Sequences start at the wall clock in microseconds (or after the spool's last one), so a restarted agent never
reuses one. Retries back off exponentially with jitter. A batch the collector refuses for its size or content is
split in halves (new sequences: it was not stored), down to single records, which are then dropped and counted.
"""

from __future__ import annotations

import bisect
import queue
import logging
import os
import random
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import grpc

from google.protobuf.message import Message

from agent._gen.aimesh.v1 import collector_pb2
from agent.collector.channel import (MD_MAX_BYTES, MD_MAX_RECORDS, ClientTls, ConfigError, call_metadata, open_channel,
                                     parse_hostport)
from agent.export import model_calls
from agent.export.records import FlowRecordData, to_proto
from agent.flows.model import IdentityData
from agent.l7.record import ModelCallRecord

log = logging.getLogger(__name__)

PUSH_METHOD = "/aimesh.v1.FlowCollector/Push"
PUSH_CALLS_METHOD = "/aimesh.v1.FlowCollector/PushCalls"
CALLS_SPOOL = "calls"   # the model-call spool: a subdirectory of the flow spool directory
_RECORD_OVERHEAD = 6  # field tag and length prefix of a record inside a batch
_BATCH_OVERHEAD = 32  # batch header besides agent_id
# why a spool file was set aside: it could not be read, it is shorter than written, its bytes are not the ones
# written (CRC), or it checks but does not parse as the batch it says (a faulty writer; an old-format file)
SPOOL_DAMAGE_REASONS = ("unreadable", "truncated", "checksum", "undecodable")


@dataclass(frozen=True, slots=True)
class BatchKind:
    """What one exporter ships: the RPC, its batch message (agent_id = 1, sequence = 2, repeated records = 3) and how
    a submitted item becomes the proto record (raises ValueError, naming the field, for a value that does not fit)."""

    noun: str                                   # in logs: "flow", "model call"
    method: str                                 # the gRPC method
    batch_type: type                            # the batch message class
    field: str                                  # its repeated record field
    encode: Callable[[object], Message]


FLOWS = BatchKind("flow", PUSH_METHOD, collector_pb2.FlowBatch, "records", to_proto)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PendingCall:
    """A model call waiting for the collector: the record and where it happened (agent/export/model_calls.py)."""

    record: ModelCallRecord
    source: IdentityData
    destination: IdentityData   # as dialed
    actual: IdentityData        # as reached
    pid: int
    comm: str
    agent_id: str
    node: str
    mono_to_wall_ns: int


def _encode_call(item: PendingCall) -> Message:
    return model_calls.to_proto(item.record, item.source, item.destination, item.actual, pid=item.pid,
                                comm=item.comm, agent_id=item.agent_id, node=item.node,
                                mono_to_wall_ns=item.mono_to_wall_ns)


CALLS = BatchKind("model call", PUSH_CALLS_METHOD, collector_pb2.ModelCallBatch, "calls",
                  _encode_call)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    target: str  # collector HOST:PORT
    agent_id: str
    tls: ClientTls | None = None
    token: str | None = None
    spool_dir: Path | None = None  # None: memory only
    spool_max_bytes: int = 256 << 20
    memory_max_bytes: int = 16 << 20  # sealed batches kept in memory before spilling to the spool
    max_queue_records: int = 100_000  # submitted records not yet batched
    batch_max_records: int = 500
    batch_max_bytes: int = 1 << 20
    flush_interval_s: float = 1.0  # a partial batch is sent after this long
    rpc_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    close_timeout_s: float = 5.0
    # Durable: records are sealed into the spool on the caller's thread by persist() (fsync'd before it returns),
    # and the sender only sends what the spool holds, so a crash loses nothing persist() returned for.
    durable: bool = False

    def validate(self) -> None:
        parse_hostport(self.target, what="collector address")
        if not self.agent_id.strip():
            raise ConfigError("agent_id is required")
        sizes = ("spool_max_bytes", "memory_max_bytes", "max_queue_records", "batch_max_records", "batch_max_bytes")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        for name in ("flush_interval_s", "rpc_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.close_timeout_s < 0:
            raise ConfigError("close_timeout_s must be >= 0")
        if self.durable and self.spool_dir is None:
            raise ConfigError("durable export needs a spool_dir")


@dataclass(frozen=True, slots=True)
class ExporterStats:
    """Counters since start (records unless named otherwise) and the current backlog."""

    submitted: int = 0
    sent_records: int = 0  # confirmed stored by the collector
    sent_batches: int = 0
    duplicate_batches: int = 0  # retries the collector had already stored (their records count in sent_records)
    dropped_queue_full: int = 0  # submit() found the incoming queue full
    dropped_spool_full: int = 0  # neither memory nor spool had room (or, at close, no spool to keep them in)
    rejected_records: int = 0  # refused by the collector even as a single-record batch
    invalid_records: int = 0  # could not be encoded (a field out of range)
    corrupt_spool_files: int = 0  # damaged spool files (batches), set aside in damaged/ (see Spool)
    export_errors: int = 0  # failed Push attempts
    queued_records: int = 0  # submitted, not yet in a batch
    memory_batches: int = 0
    memory_bytes: int = 0
    spool_batches: int = 0
    spool_bytes: int = 0
    last_error: str = ""
    # damaged spool batches and the records they held, by reason (SPOOL_DAMAGE_REASONS); a batch spooled by a version
    # before checksums whose file does not parse holds an unknown number: it counts as a batch only
    spool_discarded_batches: tuple[tuple[str, int], ...] = ()
    spool_discarded_records: tuple[tuple[str, int], ...] = ()

    @property
    def dropped(self) -> int:
        return (self.dropped_queue_full + self.dropped_spool_full + self.rejected_records + self.invalid_records
                + sum(n for _, n in self.spool_discarded_records))


@dataclass(frozen=True, slots=True)
class SealedBatch:
    sequence: int
    payload: bytes  # serialized batch (aimesh.v1.FlowBatch, ModelCallBatch)
    records: int


class _Cancelled(grpc.RpcError):
    """close() cancelled the push in flight."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "cancelled at close"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class Outcome(Enum):
    RETRY = "retry"  # maybe stored, maybe not: send the same batch again later
    SPLIT = "split"  # refused for its size or content, not stored: send its halves under new sequences
    DROP = "drop"  # a single record refused: give up on it
    RESEND = "resend"  # the sequence holds other records at the collector: the same records under a new sequence


def classify_error(code: grpc.StatusCode, details: str, trailing_keys: Iterable[str], records: int) -> Outcome:
    """What to do after a failed Push. Pure."""
    keys = set(trailing_keys)
    too_large = code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        bool(keys & {MD_MAX_RECORDS, MD_MAX_BYTES}) or "larger than max" in details.lower()
    )
    if too_large or code == grpc.StatusCode.INVALID_ARGUMENT:
        return Outcome.SPLIT if records > 1 else Outcome.DROP
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return Outcome.RESEND   # the sequence was used for other records (a clock stepped back): a new sequence
    return Outcome.RETRY  # unavailable, deadline, unauthenticated (fix the token: keep the data), overload, ...


def backoff_delay(attempt: int, initial: float, cap: float, rand: float) -> float:
    """Delay before retry number `attempt` (1, 2, ...): exponential, capped, with "equal jitter" (rand in [0, 1))."""
    base = min(cap, initial * (2 ** min(max(attempt - 1, 0), 32)))
    return base / 2 + base / 2 * rand


def encode_batch(agent_id: str, sequence: int, records: Iterable[Message], kind: BatchKind = FLOWS) -> bytes:
    batch = kind.batch_type(agent_id=agent_id, sequence=sequence)
    getattr(batch, kind.field).extend(records)
    return batch.SerializeToString()


def batch_records(payload: bytes, kind: BatchKind = FLOWS) -> list[Message]:
    """The records of a serialized batch (raises DecodeError for one that does not parse)."""
    return list(getattr(kind.batch_type.FromString(payload), kind.field))


class DamagedBatch(ValueError):
    """A spool file that cannot be sent as it was written: set aside (damaged/), counted by reason."""

    def __init__(self, message: str, reason: str, records: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.records = records     # what the batch held (0: unknown, a file from before checksums)


class Spool:
    """Sealed batches on disk: <dir>/<sequence, 20 digits>.<records>.batch, each a header and a serialized batch of
    `kind`. Not thread-safe. Only *.batch files directly in the directory are the spool's: another exporter's spool
    may live in a subdirectory.

    The header (HEADER: magic, CRC-32, record count, payload length) makes damage visible: a flipped byte fails the
    CRC (over count, length and payload), a file cut short, even at a record boundary (where the protobuf still
    parses, one record fewer), fails the length. The record count is also in the file name, so a damaged header
    still says how many records were lost. A damaged file is moved to damaged/ (0700, files 0600; the oldest go
    first past DAMAGED_MAX_FILES or DAMAGED_MAX_BYTES) and counted by reason, never sent. Files of the format before
    (<sequence>.batch, a bare serialized batch) are still read; damage in them shows only when they do not parse.

    The batches hold flow records or model calls (who talked to whom, what was asked), so the directory is 0700 and
    each file 0600, whatever the umask. An existing directory open to group or others is narrowed to 0700, unless it is
    shared (world-writable or sticky, like /tmp): that is refused, the spool needs a directory of its own."""

    SUFFIX = ".batch"
    DIR_MODE = 0o700
    FILE_MODE = 0o600
    MAGIC = b"AIMSPL01"
    HEADER = struct.Struct("<8sIIQ")      # magic, crc32(count, length, payload), record count, payload length
    DAMAGED = "damaged"
    DAMAGED_MAX_FILES = 32
    DAMAGED_MAX_BYTES = 32 << 20

    def __init__(self, directory: Path, max_bytes: int, kind: BatchKind = FLOWS) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.kind = kind
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=self.DIR_MODE)
            self._make_private()
        except OSError as e:
            raise ConfigError(f"cannot create spool directory {self.directory}: {e.strerror or e}") from None
        self._sizes: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._order: list[int] = []  # sequences, ascending
        self.bytes = 0
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write cut short by a crash
            elif (seq_records := self._parse_name(path.name)) is not None:
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    path.chmod(self.FILE_MODE)  # spooled by a version that wrote them 0644
                seq = seq_records[0]
                if seq in self._sizes:     # the same sequence twice (a crash between two writes of it): keep one
                    continue
                self._sizes[seq] = st.st_size
                self._names[seq] = path.name
                self.bytes += st.st_size
        self._order = sorted(self._sizes)

    @classmethod
    def _parse_name(cls, name: str) -> tuple[int, int | None] | None:
        """(sequence, record count or None for the old format) of a spool file's name; None: not a spool file."""
        if not name.endswith(cls.SUFFIX):
            return None
        parts = name[: -len(cls.SUFFIX)].split(".")
        if not all(p.isdigit() and p.isascii() for p in parts) or len(parts) > 2:
            return None
        return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)

    def _make_private(self) -> None:
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode == self.DIR_MODE:
            return
        if mode & (stat.S_ISVTX | 0o002):
            raise ConfigError(f"spool directory {self.directory} is shared (mode {mode:04o}): give the spool a "
                              "directory of its own")
        if mode & 0o077:
            log.warning("spool directory %s had mode %04o: narrowed to %04o (the batches hold what workloads did)",
                        self.directory, mode, self.DIR_MODE)
        self.directory.chmod(self.DIR_MODE)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, sequence: int) -> bool:
        return sequence in self._sizes

    @property
    def max_sequence(self) -> int:
        return self._order[-1] if self._order else 0

    def _path(self, sequence: int) -> Path:
        return self.directory / self._names[sequence]

    @classmethod
    def frame(cls, batch: SealedBatch) -> bytes:
        """The file's bytes: header and payload."""
        head = struct.pack("<IQ", batch.records, len(batch.payload))
        crc = zlib.crc32(batch.payload, zlib.crc32(head))
        return cls.HEADER.pack(cls.MAGIC, crc, batch.records, len(batch.payload)) + batch.payload

    def put(self, batch: SealedBatch) -> bool:
        """Write a batch; False (and nothing written) when it would exceed max_bytes or the write fails."""
        data = self.frame(batch)
        size = len(data)
        old = self._sizes.get(batch.sequence, 0)
        if self.bytes - old + size > self.max_bytes:
            return False
        name = f"{batch.sequence:020d}.{batch.records}{self.SUFFIX}"
        final = self.directory / name
        tmp = final.with_name(final.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, self.FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, self.FILE_MODE)  # umask-independent
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            log.warning("cannot write spool file %s: %s", final, e)
            tmp.unlink(missing_ok=True)
            return False
        if batch.sequence not in self._sizes:
            bisect.insort(self._order, batch.sequence)
        elif self._names[batch.sequence] != name:
            self._path(batch.sequence).unlink(missing_ok=True)
        self.bytes += size - old
        self._sizes[batch.sequence] = size
        self._names[batch.sequence] = name
        return True

    @classmethod
    def decode_file(cls, data: bytes, named_records: int | None, kind: BatchKind) -> tuple[bytes, int]:
        """(payload, records) of a file's bytes (named_records: the count in its name, None for the old format);
        DamagedBatch (reason, records) when it is not as written."""
        lost = named_records or 0
        if not data.startswith(cls.MAGIC):
            if named_records is not None:       # our name, not our header
                raise DamagedBatch("no header", "checksum" if len(data) >= cls.HEADER.size else "truncated", lost)
            try:                                # the format before checksums: a bare batch
                return data, len(batch_records(data, kind))
            except Exception as e:  # DecodeError
                raise DamagedBatch(f"does not parse ({e})", "undecodable", 0) from None
        if len(data) < cls.HEADER.size:
            raise DamagedBatch(f"{len(data)} bytes, shorter than its header", "truncated", lost)
        _, crc, records, length = cls.HEADER.unpack_from(data)
        payload = data[cls.HEADER.size:]
        lost = named_records if named_records is not None else records
        if len(payload) < length:
            raise DamagedBatch(f"{len(payload)} bytes of payload, {length} written", "truncated", lost)
        if len(payload) > length or zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", records, length))) != crc:
            raise DamagedBatch("checksum mismatch", "checksum", lost)
        try:
            n = len(batch_records(payload, kind))
        except Exception as e:  # DecodeError: written so by a faulty writer
            raise DamagedBatch(f"does not parse ({e})", "undecodable", lost) from None
        if n != records:
            raise DamagedBatch(f"{n} records, {records} written", "undecodable", lost)
        return payload, n

    def oldest(self) -> SealedBatch | None:
        """The batch with the lowest sequence. Raises DamagedBatch (after setting the file aside) for a damaged one."""
        if not self._order:
            return None
        seq = self._order[0]
        path = self._path(seq)
        named = self._parse_name(path.name)
        try:
            data = path.read_bytes()
        except OSError as e:
            self.remove(seq)
            raise DamagedBatch(f"spool file {path} is unreadable ({e}); deleted", "unreadable",
                               (named[1] or 0) if named else 0) from None
        try:
            payload, records = self.decode_file(data, named[1] if named else None, self.kind)
        except DamagedBatch as e:
            kept = self._set_aside(seq, e.reason)
            raise DamagedBatch(f"spool file {path} is damaged ({e}); {kept}", e.reason, e.records) from None
        return SealedBatch(sequence=seq, payload=payload, records=records)

    def _set_aside(self, sequence: int, reason: str) -> str:
        """Move a damaged file to damaged/ (bounded: the oldest kept go first); what became of it, for the log."""
        path, size = self._path(sequence), self._sizes[sequence]
        damaged = self.directory / self.DAMAGED
        try:
            if size > self.DAMAGED_MAX_BYTES:
                raise OSError(f"{size} bytes, more than the {self.DAMAGED_MAX_BYTES} kept")
            damaged.mkdir(mode=self.DIR_MODE, exist_ok=True)
            damaged.chmod(self.DIR_MODE)
            kept = sorted((p for p in damaged.iterdir() if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name))
            total = sum(p.stat().st_size for p in kept)
            while kept and (len(kept) + 1 > self.DAMAGED_MAX_FILES or total + size > self.DAMAGED_MAX_BYTES):
                old = kept.pop(0)
                total -= old.stat().st_size
                old.unlink(missing_ok=True)
            target = damaged / f"{path.name}.{reason}"
            os.replace(path, target)
            target.chmod(self.FILE_MODE)
            what = f"kept as {target}"
        except OSError as e:
            what = f"deleted (not kept: {e})"
        self.remove(sequence)
        return what

    def remove(self, sequence: int) -> None:
        size = self._sizes.pop(sequence, None)
        if size is None:
            return
        self._order.remove(sequence)
        self.bytes -= size
        (self.directory / self._names.pop(sequence)).unlink(missing_ok=True)


def read_spool_file(path: Path, kind: BatchKind = FLOWS) -> list[Message]:
    """The records of one spool file, either format (for inspection and tests); DamagedBatch for a damaged one."""
    named = Spool._parse_name(path.name)
    payload, _ = Spool.decode_file(path.read_bytes(), named[1] if named else None, kind)
    return batch_records(payload, kind)


@dataclass
class _Counters:
    submitted: int = 0
    sent_records: int = 0
    sent_batches: int = 0
    duplicate_batches: int = 0
    dropped_queue_full: int = 0
    dropped_spool_full: int = 0
    rejected_records: int = 0
    invalid_records: int = 0
    corrupt_spool_files: int = 0
    export_errors: int = 0
    last_error: str = ""
    spool_discarded_batches: dict[str, int] = field(default_factory=dict)
    spool_discarded_records: dict[str, int] = field(default_factory=dict)


@dataclass
class _Builder:
    records: list[Message] = field(default_factory=list)
    bytes: int = 0
    started: float = 0.0  # monotonic time of the first record


class BatchExporter:
    """Ships records of one BatchKind to the collector from a background thread. submit() is thread-safe."""

    kind: BatchKind = FLOWS

    def __init__(
        self,
        config: ExporterConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        rng: random.Random | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._metadata = call_metadata(config.token)
        if config.tls is not None:
            config.tls.credentials()  # fail now, not in the sender thread, on missing or unreadable files
        self._cond = threading.Condition()
        # The spool, the memory outbox and the sequence counter: the sender thread and persist() (durable mode) share
        # them. persist() holds it from writing a batch until its caller's after() ran, so the sender cannot send and
        # delete a batch whose source (a ring position) has not been released yet.
        self._lock = threading.RLock()
        self._writes: "queue.Queue" = queue.Queue()   # persist() -> the spool writer thread (durable mode)
        self._writer: threading.Thread | None = None
        self.write_failures = 0
        self._unwritten = 0     # records persist() handed to the spool writer, not yet on disk (under _cond)
        # Shared with submit()/flush()/close(), under _cond:
        self._incoming: deque[object] = deque()
        self._counters = _Counters()
        self._stopping = False
        self._close_deadline = 0.0
        self._flush_waiters = 0
        self._idle = True
        # Owned by the sender thread (read under _cond by stats()):
        self._builder = _Builder()
        self._memory: deque[SealedBatch] = deque()
        self._memory_bytes = 0
        self._spool = Spool(config.spool_dir, config.spool_max_bytes, self.kind) if config.spool_dir else None
        spooled = self._spool.max_sequence if self._spool else 0
        self._next_sequence = max(wall_ns() // 1000, spooled + 1)
        self._attempt = 0
        self._next_try = 0.0
        self._failing = False
        self._channel: grpc.Channel | None = None
        self._push: grpc.UnaryUnaryMultiCallable | None = None
        self._inflight: grpc.Future | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        if self._spool is not None and len(self._spool):
            self._idle = False
            log.info("spool %s holds %d batches from a previous run", config.spool_dir, len(self._spool))

    # --- the caller's side ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError(f"{type(self).__name__}.start() called twice, or after close()")
        cfg = self.config
        backoff_ms = int(cfg.backoff_max_s * 1000)
        options = [
            # gRPC's own reconnect backoff defaults to 120 s; keep it within ours so a returning collector is found.
            ("grpc.initial_reconnect_backoff_ms", max(int(cfg.backoff_initial_s * 1000), 100)),
            ("grpc.min_reconnect_backoff_ms", max(int(cfg.backoff_initial_s * 1000), 100)),
            ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 100)),
        ]
        self._channel = open_channel(cfg.target, cfg.tls, options)
        self._push = self._channel.unary_unary(
            self.kind.method, request_serializer=None, response_deserializer=collector_pb2.PushReply.FromString
        )
        self._thread = threading.Thread(target=self._run, name=f"{self.kind.noun.replace(' ', '-')}-exporter",
                                        daemon=True)
        self._thread.start()
        if cfg.durable:
            self._writer = threading.Thread(target=self._writer_loop, name="spool-writer", daemon=True)
            self._writer.start()

    # Whether records handed to the spool writer count against max_queue_records. The flow exporter's are bounded by
    # the agent (it stops reading its rings while the disk is behind); the model-call exporter's by this.
    bound_unwritten = False

    def submit(self, record: object) -> bool:
        """Queue a record. False when the queue is full: the record is dropped and counted."""
        with self._cond:
            held = len(self._incoming) + (self._unwritten if self.bound_unwritten else 0)
            if self._stopping or held >= self.config.max_queue_records:
                self._counters.dropped_queue_full += 1
                return False
            self._incoming.append(record)
            self._counters.submitted += 1
            self._idle = False
            n = len(self._incoming)
            if n == 1 or n >= self.config.batch_max_records:  # start the flush clock; or a batch is ready
                self._cond.notify_all()
            return True

    def submit_many(self, records: Iterable[object]) -> int:
        """Queue records; returns how many were accepted."""
        return sum(1 for r in records if self.submit(r))

    def persist(self, before: Callable[[int], None] | None = None, after: Callable[[], None] | None = None) -> None:
        """Durable mode: seal every record submitted so far into spool batches. The spool writer thread writes and
        fsyncs them in order, so the caller (the agent's main loop) never waits for the disk; before(sequence) runs
        there before the last batch is written, after() once every batch is on disk (both under the spool lock, so
        the sender cannot send and delete a batch before after() ran). after() is not called if the write failed
        (write_failures counts it): the caller then reads its source again."""
        if not self.config.durable:
            raise RuntimeError("persist() is for durable exporters")
        with self._cond:
            incoming, self._incoming = self._incoming, deque()
            self._unwritten += len(incoming)
        if self._writer is None:          # not started (or closed): write on the caller's thread
            self._write_item((list(incoming), before, after))
        else:
            self._writes.put((list(incoming), before, after))

    def write_backlog(self) -> int:
        """persist() calls not yet on disk (the agent stops reading its rings while this is long)."""
        return self._writes.qsize()

    def _writer_loop(self) -> None:
        """Group commit: everything queued meanwhile goes into one batch and one fsync (the disk sets the pace)."""
        while True:
            item = self._writes.get()
            if item is None:
                return
            items = [item]
            stop = False
            cap = 4 * self.config.batch_max_records
            while sum(len(i[0]) for i in items) < cap:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            self._write_items(items)
            if stop:
                return

    def _write_item(self, item) -> None:
        self._write_items([item])

    def _write_items(self, items) -> None:
        """One batch (more if the records exceed 4 x batch_max_records) for several persist() calls: every before()
        runs before it is written, every after() once it is on disk."""
        try:
            self._write_items_once(items)
        finally:
            with self._cond:
                self._unwritten -= sum(len(i[0]) for i in items)

    def _write_items_once(self, items) -> None:
        try:
            msgs: list[Message] = []
            invalid = 0
            for incoming, _b, _a in items:
                for rec in incoming:
                    try:
                        msgs.append(self.kind.encode(rec))
                    except ValueError as e:
                        invalid += 1
                        log.debug("dropping a %s record: %s", self.kind.noun, e)
            if invalid:
                self._count(invalid_records=invalid)
            step = 4 * self.config.batch_max_records
            with self._lock:
                assert self._spool is not None
                chunks = [msgs[i:i + step] for i in range(0, len(msgs), step)]
                for i, part in enumerate(chunks):
                    seq = self._take_sequence()
                    if i == len(chunks) - 1:
                        for _r, before, _a in items:
                            if before is not None:
                                before(seq)
                    batch = SealedBatch(seq, encode_batch(self.config.agent_id, seq, part, self.kind), len(part))
                    if not self._spool.put(batch):
                        self._count(dropped_spool_full=len(part))
                        log.warning("spool full: dropped a batch of %d records", len(part))
                for _r, _b, after in items:
                    if after is not None:
                        after()
        except Exception:  # noqa: BLE001 - counted; the caller re-reads what after() did not release
            self.write_failures += 1
            log.exception("writing records to the spool failed")
            return
        if msgs:
            with self._cond:
                self._idle = False
                self._cond.notify_all()

    def has_spooled(self, sequence: int) -> bool:
        """Whether the spool holds this batch (a restarted agent checks its last checkpoint with it)."""
        with self._lock:
            return self._spool is not None and sequence in self._spool

    def flush(self, timeout: float) -> bool:
        """Send everything queued, the partial batch and the spool included (and what is submitted meanwhile).

        True if the collector has it all within timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while not self._idle:
                    left = deadline - self._clock()
                    if left <= 0 or self._thread is None or not self._thread.is_alive():
                        return False
                    self._cond.wait(min(left, 0.5))
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = None) -> ExporterStats:
        """Stop: send what can be sent within timeout (default close_timeout_s), spool the rest. Idempotent."""
        wait = self.config.close_timeout_s if timeout is None else timeout
        if self._writer is not None and not self._closed:   # what persist() queued goes to disk first
            self.persist()
            self._writes.put(None)
            self._writer.join()
            self._writer = None
        with self._cond:
            if self._closed:
                return self._stats_locked()
            self._closed = True
            self._stopping = True
            self._close_deadline = self._clock() + wait
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait + 0.5)
            if self._thread.is_alive():  # a push begun before close() is still waiting for its rpc_timeout
                with self._cond:
                    inflight = self._inflight
                if inflight is not None:
                    inflight.cancel()  # retried from the spool next time; the sequence keeps it idempotent
                self._thread.join()
        else:  # never started: keep what was submitted in the spool for the next run
            self._finish()
        if self._channel is not None:
            self._channel.close()
        return self.stats()

    def stats(self) -> ExporterStats:
        with self._cond:
            return self._stats_locked()

    def _stats_locked(self) -> ExporterStats:
        c = self._counters
        return ExporterStats(
            submitted=c.submitted,
            sent_records=c.sent_records,
            sent_batches=c.sent_batches,
            duplicate_batches=c.duplicate_batches,
            dropped_queue_full=c.dropped_queue_full,
            dropped_spool_full=c.dropped_spool_full,
            rejected_records=c.rejected_records,
            invalid_records=c.invalid_records,
            corrupt_spool_files=c.corrupt_spool_files,
            export_errors=c.export_errors,
            queued_records=len(self._incoming) + len(self._builder.records),
            memory_batches=len(self._memory),
            memory_bytes=self._memory_bytes,
            spool_batches=len(self._spool) if self._spool else 0,
            spool_bytes=self._spool.bytes if self._spool else 0,
            last_error=c.last_error,
            spool_discarded_batches=tuple(sorted(c.spool_discarded_batches.items())),
            spool_discarded_records=tuple(sorted(c.spool_discarded_records.items())),
        )

    def __enter__(self) -> BatchExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the sender thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    timeout = self._wait_time()
                    if timeout > 0:
                        self._cond.wait(timeout)
                    if self.config.durable:
                        incoming = deque()   # persist() seals them on the caller's thread
                    else:
                        incoming, self._incoming = self._incoming, deque()
                    stopping, deadline = self._stopping, self._close_deadline
                    force = stopping or self._flush_waiters > 0
                self._absorb(incoming)
                due = self._clock() - self._builder.started >= self.config.flush_interval_s
                if self._builder.records and (force or due):
                    self._seal()
                if self._has_outbox() and self._clock() >= self._next_try:
                    if not stopping or self._clock() < deadline:
                        self._send_next(deadline if stopping else None)
                self._update_idle()
                if stopping and (not self._has_outbox() or self._clock() >= deadline):
                    break
        except Exception:  # noqa: BLE001 - never die silently; what is left goes to the spool below
            log.exception("%s exporter thread failed", self.kind.noun)
        finally:
            self._finish()

    def _wait_time(self) -> float:
        """How long the sender may sleep before its next round (called under _cond)."""
        cfg = self.config
        now = self._clock()
        incoming = 0 if cfg.durable else len(self._incoming)
        pending = bool(incoming) or bool(self._builder.records)
        urgent = self._stopping or self._flush_waiters > 0
        if incoming >= cfg.batch_max_records or (urgent and pending):
            return 0.0
        if self._stopping and not self._has_outbox():
            return 0.0  # nothing left: finish now
        waits = [1.0]
        if self._builder.records:
            waits.append(self._builder.started + cfg.flush_interval_s - now)
        elif incoming:
            return 0.0  # absorb them: that starts the batch's flush clock
        if self._has_outbox():
            waits.append(self._next_try - now)
        if self._stopping:
            waits.append(self._close_deadline - now)
        return max(0.0, min(waits))

    def _has_outbox(self) -> bool:
        return bool(self._memory) or bool(self._spool is not None and len(self._spool))

    def _update_idle(self) -> None:
        with self._cond:
            self._idle = (not self._incoming and not self._builder.records and not self._unwritten
                          and not self._has_outbox())
            self._cond.notify_all()

    def _count(self, **deltas: int) -> None:
        with self._cond:
            for name, n in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + n)

    def _count_damaged(self, e: DamagedBatch) -> None:
        with self._cond:
            c = self._counters
            c.corrupt_spool_files += 1
            c.spool_discarded_batches[e.reason] = c.spool_discarded_batches.get(e.reason, 0) + 1
            c.spool_discarded_records[e.reason] = c.spool_discarded_records.get(e.reason, 0) + e.records

    def _absorb(self, records: Iterable[object]) -> None:
        cfg = self.config
        limit = cfg.batch_max_bytes - _BATCH_OVERHEAD - len(cfg.agent_id.encode())
        invalid = 0
        for rec in records:
            try:
                msg = self.kind.encode(rec)
            except ValueError as e:
                invalid += 1
                log.debug("dropping a %s record: %s", self.kind.noun, e)
                continue
            size = msg.ByteSize() + _RECORD_OVERHEAD
            b = self._builder
            if b.records and b.bytes + size > limit:
                self._seal()
                b = self._builder
            if not b.records:
                b.started = self._clock()
            b.records.append(msg)
            b.bytes += size
            if len(b.records) >= cfg.batch_max_records:
                self._seal()
        if invalid:
            self._count(invalid_records=invalid)

    def _take_sequence(self) -> int:
        with self._lock:
            seq = self._next_sequence
            self._next_sequence += 1
            return seq

    def _seal(self) -> None:
        records = self._builder.records
        self._builder = _Builder()
        if records:
            seq = self._take_sequence()
            self._enqueue(SealedBatch(seq, encode_batch(self.config.agent_id, seq, records, self.kind), len(records)))

    def _enqueue(self, batch: SealedBatch) -> None:
        with self._lock:
            self._enqueue_locked(batch)

    def _enqueue_locked(self, batch: SealedBatch) -> None:
        spool = self._spool
        fits_memory = not self._memory or self._memory_bytes + len(batch.payload) <= self.config.memory_max_bytes
        if fits_memory and (spool is None or not len(spool)):  # memory only while the spool is empty: keeps order
            self._memory.append(batch)
            self._memory_bytes += len(batch.payload)
            return
        if spool is not None and spool.put(batch):
            return
        self._count(dropped_spool_full=batch.records)
        log.debug("outbox full: dropped a batch of %d records", batch.records)

    def _next_batch(self) -> tuple[SealedBatch, bool] | None:
        with self._lock:
            return self._next_batch_locked()

    def _next_batch_locked(self) -> tuple[SealedBatch, bool] | None:
        """The oldest unsent batch and whether it is in the spool. Memory batches are always the older ones."""
        if self._memory:
            return self._memory[0], False
        while self._spool is not None and len(self._spool):
            try:
                batch = self._spool.oldest()
            except DamagedBatch as e:
                log.warning("%s", e)
                self._count_damaged(e)
                continue
            if batch is not None:
                return batch, True
        return None

    def _remove(self, batch: SealedBatch, from_spool: bool) -> None:
        with self._lock:
            self._remove_locked(batch, from_spool)

    def _remove_locked(self, batch: SealedBatch, from_spool: bool) -> None:
        if from_spool:
            assert self._spool is not None
            self._spool.remove(batch.sequence)
        else:
            self._memory.popleft()
            self._memory_bytes -= len(batch.payload)

    def _send_next(self, deadline: float | None) -> None:
        head = self._next_batch()
        if head is None:
            return
        batch, from_spool = head
        assert self._push is not None, "start() first"
        timeout = self.config.rpc_timeout_s
        if deadline is not None:
            timeout = max(0.05, min(timeout, deadline - self._clock()))
        call = self._push.future(batch.payload, timeout=timeout, metadata=self._metadata)
        with self._cond:
            self._inflight = call
        try:
            reply = call.result()
        except grpc.RpcError as e:
            self._on_error(batch, from_spool, e)
            return
        except grpc.FutureCancelledError:
            self._on_error(batch, from_spool, _Cancelled())
            return
        finally:
            with self._cond:
                self._inflight = None
        self._remove(batch, from_spool)
        self._attempt = 0
        self._next_try = 0.0
        if self._failing:
            self._failing = False
            log.info("collector %s reachable again", self.config.target)
        self._count(
            sent_records=batch.records, sent_batches=1, duplicate_batches=1 if reply.duplicate else 0
        )

    def _on_error(self, batch: SealedBatch, from_spool: bool, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else "") or ""
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        keys = [m.key for m in trailing or ()]
        outcome = classify_error(code, details, keys, batch.records)
        message = f"{code.name}: {details}"
        with self._cond:
            self._counters.export_errors += 1
            self._counters.last_error = message
        if outcome is Outcome.RETRY:
            self._attempt += 1
            delay = backoff_delay(
                self._attempt, self.config.backoff_initial_s, self.config.backoff_max_s, self._rng.random()
            )
            self._next_try = self._clock() + delay
            if not self._failing:
                self._failing = True
                log.warning("cannot push %ss to %s (%s); retrying with backoff", self.kind.noun, self.config.target,
                            message)
            return
        self._remove(batch, from_spool)
        if outcome is Outcome.DROP:
            self._count(rejected_records=batch.records)
            log.warning("collector refused a %s record (%s); dropped", self.kind.noun, message)
            return
        # SPLIT: not stored, so the halves take new sequences; they go first, in order. RESEND: one part.
        records = batch_records(batch.payload, self.kind)
        half = len(records) // 2
        parts = (records,) if outcome is Outcome.RESEND else (records[half:], records[:half])
        if outcome is Outcome.RESEND:
            log.warning("collector holds other records under sequence %d (%s); resending under a new one",
                        batch.sequence, message)
        with self._lock:
            for part in parts:
                seq = self._take_sequence()
                sealed = SealedBatch(seq, encode_batch(self.config.agent_id, seq, part, self.kind), len(part))
                self._memory.appendleft(sealed)
                self._memory_bytes += len(sealed.payload)

    def _finish(self) -> None:
        """Seal what is left and put unsent memory batches in the spool (or count them dropped)."""
        if self.config.durable:
            with self._cond:
                left, self._incoming = self._incoming, deque()
                self._unwritten += len(left)
            self._write_item((list(left), None, None))
        with self._cond:
            incoming, self._incoming = self._incoming, deque()
        self._absorb(incoming)
        self._seal()
        lost = 0
        while self._memory:
            batch = self._memory.popleft()
            self._memory_bytes -= len(batch.payload)
            if self._spool is None or not self._spool.put(batch):
                lost += batch.records
        if lost:
            self._count(dropped_spool_full=lost)
            log.warning("%s exporter closed with %d unsent records that did not fit in the spool", self.kind.noun,
                        lost)
        self._update_idle()


class FlowExporter(BatchExporter):
    """Flow records (FlowRecordData) to the collector's Push; a RecordSink (agent/flows/sink.py)."""

    kind = FLOWS

    def emit(self, record: FlowRecordData, counted: bool) -> None:
        """RecordSink: queue every record for the collector (a full queue is counted)."""
        self.submit(record)


class ModelCallExporter(BatchExporter):
    """Model calls to the collector's PushCalls; a ModelCallSink (agent/l7/sink.py). `mono_to_wall_ns()` gives the
    offset from the records' kernel clock to Unix time.

    Durable (config.durable, with a spool): emit_call() only queues; commit() hands what was queued to the spool
    writer, which group-commits it (one fsync'd batch for everything committed meanwhile) before the sender can see
    it, so a completed call survives a kill -9 once its batch is on disk. The agent commits once per drain turn (and
    emit_call() when a batch's worth is queued): no fsync per call. Calls handed to the writer and not yet on disk
    count against max_queue_records (the capture ring is released once decoded, so nothing else holds them back).
    Not durable: calls wait in memory and are spooled when memory is full and at close."""

    kind = CALLS
    bound_unwritten = True

    def __init__(self, config: ExporterConfig, node: str, mono_to_wall_ns: Callable[[], int], **kw) -> None:
        super().__init__(config, **kw)
        self._node = node
        self._offset = mono_to_wall_ns

    def emit_call(self, call: ModelCallRecord, source: IdentityData, destination: IdentityData, pid: int, comm: str,
                  *, server_address: str = "", server_port: int = 0, dialed: IdentityData | None = None) -> None:
        self.submit(PendingCall(call, source, dialed if dialed is not None else destination, destination, pid, comm,
                                self.config.agent_id, self._node, self._offset()))
        if self.config.durable:
            with self._cond:
                full = len(self._incoming) >= self.config.batch_max_records
            if full:
                self.persist()

    def commit(self) -> None:
        """Durable: queue the calls emitted since the last commit for the spool writer (never waits for the disk).
        A no-op when nothing is new, or when not durable."""
        if not self.config.durable:
            return
        with self._cond:
            if not self._incoming:
                return
        self.persist()

    def flush(self, timeout: float) -> bool:
        self.commit()   # durable: the sender sends only what the spool holds
        return super().flush(timeout)
