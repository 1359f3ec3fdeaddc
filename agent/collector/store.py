"""SQLite storage for flow records and model calls: idempotent batch inserts, filtered queries, retention by age and
by size.

Model calls (aimesh.v1.ModelCall) live in their own tables (model_calls, call_batches) with the same rules as flows:
(agent_id, sequence) keys with a content digest (in their own key space: a call batch never collides with a flow
batch), the serialized record next to the filter columns, retention by receive time. The tables are created by
CREATE IF NOT EXISTS, so a schema 2 database gains them when opened (no version change: nothing existing changed).

Retention by age uses the collector's receive time (flows.received_ns), never the agent's clock: an agent whose
clock is days behind keeps its records for the whole retention period. Each batch key keeps a digest of the batch's
records, so a retry (same content) is a duplicate and a different batch under a used key is a conflict.

The database and its -wal/-shm files are created 0600 (SQLite gives the side files the database's mode); an
existing database found readable by others is narrowed to 0600 when opened.

A record is stored as its serialized aimesh.v1.FlowRecord (so fields added to the proto later survive a collector
that does not know them) next to the few columns queries filter on. The store knows nothing of protobuf: the
service turns records into FlowRow and back.

Concurrency: one write connection behind a lock; readers take connections from a small pool. WAL mode lets readers
run while a batch is written. synchronous=NORMAL: a committed batch survives a crash of the collector process (not
necessarily a power loss of the host, which the agents' retries cover for recent batches).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import stat
import struct
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 2  # 1 -> 2: batches.digest, flows.received_ns (migrated in place by _migrate)
_I64 = 1 << 63
PAGE_ROWS = 1000  # rows read per query page
_DELETE_CHUNK = 5000  # rows deleted per write transaction during retention

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- (agent_id, sequence) of every stored batch, kept for the dedup window: makes retries idempotent.
CREATE TABLE IF NOT EXISTS batches (
    agent_id    TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,  -- uint64 stored as its two's-complement int64
    received_ns INTEGER NOT NULL,
    records     INTEGER NOT NULL,
    digest      BLOB,              -- batch_digest() of the records; NULL for batches stored before schema 2
    PRIMARY KEY (agent_id, sequence)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_received ON batches (received_ns);
-- One row per flow record. id only grows (AUTOINCREMENT), so followers can resume after the last id they saw.
CREATE TABLE IF NOT EXISTS flows (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns     INTEGER NOT NULL,  -- record time: end time, else start time, else receive time
    received_ns INTEGER NOT NULL DEFAULT 0,  -- when the collector stored it (retention by age uses this)
    agent_id    TEXT    NOT NULL,
    verdict     INTEGER NOT NULL,
    src_name    TEXT    NOT NULL,
    src_kind    TEXT    NOT NULL,
    src_version TEXT    NOT NULL,
    dst_name    TEXT    NOT NULL,
    dst_kind    TEXT    NOT NULL,
    dst_version TEXT    NOT NULL,
    act_name    TEXT    NOT NULL,
    act_kind    TEXT    NOT NULL,
    act_version TEXT    NOT NULL,
    record      BLOB    NOT NULL   -- serialized aimesh.v1.FlowRecord
);
CREATE INDEX IF NOT EXISTS flows_time ON flows (time_ns);
CREATE INDEX IF NOT EXISTS flows_src ON flows (src_name, time_ns);
CREATE INDEX IF NOT EXISTS flows_dst ON flows (dst_name, time_ns);
CREATE INDEX IF NOT EXISTS flows_act ON flows (act_name, time_ns);
-- (agent_id, sequence) of every stored model-call batch: the calls' own key space, same rules as batches.
CREATE TABLE IF NOT EXISTS call_batches (
    agent_id    TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    records     INTEGER NOT NULL,
    digest      BLOB    NOT NULL,
    PRIMARY KEY (agent_id, sequence)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS call_batches_received ON call_batches (received_ns);
-- One row per model call. id only grows, as flows.id.
CREATE TABLE IF NOT EXISTS model_calls (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns        INTEGER NOT NULL,  -- call time: start + duration, else start, else receive time
    received_ns    INTEGER NOT NULL,
    agent_id       TEXT    NOT NULL,
    src_name       TEXT    NOT NULL,
    src_kind       TEXT    NOT NULL,
    src_version    TEXT    NOT NULL,
    dst_name       TEXT    NOT NULL,
    dst_kind       TEXT    NOT NULL,
    dst_version    TEXT    NOT NULL,
    act_name       TEXT    NOT NULL,
    act_kind       TEXT    NOT NULL,
    act_version    TEXT    NOT NULL,
    request_model  TEXT    NOT NULL,  -- '' when unknown
    response_model TEXT    NOT NULL,
    status         INTEGER NOT NULL,  -- HTTP status; 0 = no response
    record         BLOB    NOT NULL   -- serialized aimesh.v1.ModelCall
);
CREATE INDEX IF NOT EXISTS model_calls_time ON model_calls (time_ns);
CREATE INDEX IF NOT EXISTS model_calls_received ON model_calls (received_ns);
CREATE INDEX IF NOT EXISTS model_calls_src ON model_calls (src_name, time_ns);
CREATE INDEX IF NOT EXISTS model_calls_dst ON model_calls (dst_name, time_ns);
CREATE INDEX IF NOT EXISTS model_calls_act ON model_calls (act_name, time_ns);
CREATE INDEX IF NOT EXISTS model_calls_req_model ON model_calls (request_model, time_ns);
CREATE INDEX IF NOT EXISTS model_calls_resp_model ON model_calls (response_model, time_ns);
CREATE INDEX IF NOT EXISTS model_calls_status ON model_calls (status, time_ns);
"""
# After _migrate: the index on a column that schema 1 databases only have once migrated.
_SCHEMA_V2_INDEXES = "CREATE INDEX IF NOT EXISTS flows_received ON flows (received_ns);"


class StoreError(Exception):
    """The database cannot be opened or has an unknown schema."""


@dataclass(frozen=True, slots=True)
class Ident:
    """An identity's columns. Used as a filter, empty fields match anything."""

    name: str = ""
    kind: str = ""
    version: str = ""

    def is_any(self) -> bool:
        return not (self.name or self.kind or self.version)


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One record to store: the filter columns and the serialized record."""

    time_ns: int
    agent_id: str
    verdict: int
    source: Ident
    destination: Ident
    actual_destination: Ident
    payload: bytes


@dataclass(frozen=True, slots=True)
class FlowFilter:
    source: Ident = field(default_factory=Ident)
    destination: Ident = field(default_factory=Ident)  # matches the dialed or the actual destination
    verdicts: frozenset[int] = frozenset()  # any of these; empty = all
    since_ns: int = 0  # time_ns >= since_ns
    until_ns: int = 0  # time_ns < until_ns; 0 = unbounded
    agent_id: str = ""


@dataclass(frozen=True, slots=True)
class CallRow:
    """One model call to store: the filter columns and the serialized aimesh.v1.ModelCall."""

    time_ns: int
    agent_id: str
    source: Ident
    destination: Ident
    actual_destination: Ident
    request_model: str
    response_model: str
    status: int  # 0 = no response
    payload: bytes


@dataclass(frozen=True, slots=True)
class CallFilter:
    source: Ident = field(default_factory=Ident)
    destination: Ident = field(default_factory=Ident)  # matches the dialed or the actual destination
    model: str = ""  # the request or the response model
    statuses: tuple[tuple[int, int], ...] = ()  # inclusive (min, max) ranges, any of them; empty = all
    since_ns: int = 0
    until_ns: int = 0
    agent_id: str = ""


@dataclass(frozen=True, slots=True)
class StoredFlow:
    id: int
    time_ns: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class InsertResult:
    duplicate: bool  # the key was stored before with the same records (or before digests existed): nothing stored
    inserted: int
    last_id: int  # id of the last row inserted (0 if none)
    conflict: bool = False  # the key was stored before with different records: nothing stored


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age_ns: int = 0  # 0 = keep forever
    max_bytes: int = 0  # data size limit (pages in use); 0 = unbounded
    dedup_window_ns: int = 24 * 3600 * 10**9  # how long (agent_id, sequence) keys are remembered
    low_watermark: float = 0.9  # size retention deletes down to this fraction of max_bytes


@dataclass(frozen=True, slots=True)
class RetentionResult:
    deleted_by_age: int = 0
    deleted_by_size: int = 0
    batches_forgotten: int = 0
    calls_deleted_by_age: int = 0
    calls_deleted_by_size: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    data_bytes: int  # pages in use
    file_bytes: int  # database file plus WAL
    last_id: int


def to_i64(value: int) -> int:
    """uint64 -> the int64 with the same bits (SQLite integers are signed)."""
    if not 0 <= value < (1 << 64):
        raise ValueError(f"{value} is not a uint64")
    return value - (1 << 64) if value >= _I64 else value


def from_i64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def batch_digest(rows: Sequence[FlowRow] | Sequence[CallRow]) -> bytes:
    """SHA-256 over the stored bytes of a batch's records, each length-prefixed. Pure."""
    h = hashlib.sha256()
    for r in rows:
        payload = r.payload or b""  # None fails the NOT NULL constraint at the insert, inside the transaction
        h.update(struct.pack("<Q", len(payload)))
        h.update(payload)
    return h.digest()


def _ident_clause(prefix: str, ident: Ident) -> tuple[str, list[object]]:
    parts: list[str] = []
    params: list[object] = []
    for column, value in (("name", ident.name), ("kind", ident.kind), ("version", ident.version)):
        if value:
            parts.append(f"{prefix}_{column} = ?")
            params.append(value)
    return " AND ".join(parts), params


def _common_where(flt: FlowFilter | CallFilter, parts: list[str], params: list[object]) -> None:
    if not flt.source.is_any():
        clause, p = _ident_clause("src", flt.source)
        parts.append(clause)
        params += p
    if not flt.destination.is_any():
        dst, p1 = _ident_clause("dst", flt.destination)
        act, p2 = _ident_clause("act", flt.destination)
        parts.append(f"(({dst}) OR ({act}))")
        params += p1 + p2
    if flt.since_ns:
        parts.append("time_ns >= ?")
        params.append(flt.since_ns)
    if flt.until_ns:
        parts.append("time_ns < ?")
        params.append(flt.until_ns)
    if flt.agent_id:
        parts.append("agent_id = ?")
        params.append(flt.agent_id)


def build_where(flt: FlowFilter) -> tuple[str, list[object]]:
    """FlowFilter -> (SQL boolean expression, parameters). Pure; "1" when the filter matches everything."""
    parts: list[str] = []
    params: list[object] = []
    _common_where(flt, parts, params)
    if flt.verdicts:
        verdicts = sorted(flt.verdicts)
        parts.append(f"verdict IN ({', '.join('?' * len(verdicts))})")
        params += verdicts
    return (" AND ".join(parts) if parts else "1"), params


def build_call_where(flt: CallFilter) -> tuple[str, list[object]]:
    """CallFilter -> (SQL boolean expression, parameters) over model_calls. Pure; "1" matches everything."""
    parts: list[str] = []
    params: list[object] = []
    _common_where(flt, parts, params)
    if flt.model:
        parts.append("(request_model = ? OR response_model = ?)")
        params += [flt.model, flt.model]
    if flt.statuses:
        parts.append("(" + " OR ".join("status BETWEEN ? AND ?" for _ in flt.statuses) + ")")
        for lo, hi in flt.statuses:
            params += [lo, hi]
    return (" AND ".join(parts) if parts else "1"), params


def _row_values(row: FlowRow, received_ns: int) -> tuple[object, ...]:
    s, d, a = row.source, row.destination, row.actual_destination
    return (
        row.time_ns, received_ns, row.agent_id, row.verdict,
        s.name, s.kind, s.version, d.name, d.kind, d.version, a.name, a.kind, a.version,
        row.payload,
    )  # fmt: skip


def _call_values(row: CallRow, received_ns: int) -> tuple[object, ...]:
    s, d, a = row.source, row.destination, row.actual_destination
    return (
        row.time_ns, received_ns, row.agent_id,
        s.name, s.kind, s.version, d.name, d.kind, d.version, a.name, a.kind, a.version,
        row.request_model, row.response_model, row.status, row.payload,
    )  # fmt: skip


_INSERT_CALL = (
    "INSERT INTO model_calls (time_ns, received_ns, agent_id, src_name, src_kind, src_version, dst_name, dst_kind,"
    " dst_version, act_name, act_kind, act_version, request_model, response_model, status, record)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_FLOW = (
    "INSERT INTO flows (time_ns, received_ns, agent_id, verdict, src_name, src_kind, src_version, dst_name,"
    " dst_kind, dst_version, act_name, act_kind, act_version, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing; narrow an existing file readable by others to 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
        return
    os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class FlowStore:
    """The collector's database. Thread-safe."""

    def __init__(self, path: Path, *, readers: int = 8) -> None:
        self._path = Path(path)
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                side = Path(str(self._path) + suffix)
                if suffix == "" or side.exists():
                    private_file(side)
        except OSError as e:
            raise StoreError(f"cannot open flow database {self._path}: {e.strerror or e}") from None
        try:
            self._write = _connect(self._path)
            self._init_schema(self._write)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open flow database {self._path}: {e}") from e
        self._lock = threading.Lock()  # the write connection
        self._conns_lock = threading.Lock()  # the list of all connections
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = [self._write]
        self._max_readers = readers
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        # auto_vacuum must be chosen before the first table exists; INCREMENTAL lets retention give space back.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot put {conn} in WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif row[0] == "1":
            FlowStore._migrate(conn, time.time_ns())
        elif row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"database schema version {row[0]}, this collector knows {SCHEMA_VERSION}")
        conn.executescript(_SCHEMA_V2_INDEXES)

    @staticmethod
    def _migrate(conn: sqlite3.Connection, now_ns: int) -> None:
        """Schema 1 -> 2 in one transaction; safe to run again on a half-migrated or migrated database.

        Rows stored before have no receive time: they get the migration time, so retention keeps them for one more
        full period rather than deleting by a clock that may have been wrong."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            flows = {r[1] for r in conn.execute("PRAGMA table_info(flows)")}
            if "received_ns" not in flows:
                conn.execute("ALTER TABLE flows ADD COLUMN received_ns INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE flows SET received_ns = ? WHERE received_ns = 0", (now_ns,))
            batches = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
            if "digest" not in batches:
                conn.execute("ALTER TABLE batches ADD COLUMN digest BLOB")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreError("the flow store is closed")
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = _connect(self._path)
            with self._conns_lock:
                self._all.append(conn)
        try:
            yield conn
        finally:
            if self._readers.qsize() < self._max_readers:
                self._readers.put(conn)
            else:
                with self._conns_lock:
                    if conn in self._all:
                        self._all.remove(conn)
                conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError("the flow store is closed")
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def insert_batch(
        self, agent_id: str, sequence: int, rows: Sequence[FlowRow], received_ns: int | None = None
    ) -> InsertResult:
        """Store a batch once: a second call with the same (agent_id, sequence) stores nothing, and says whether it
        carried the same records (duplicate: a retry) or different ones (conflict)."""
        return self._insert_once("batches", "flows", _INSERT_FLOW, _row_values, agent_id, sequence, rows, received_ns)

    def insert_call_batch(
        self, agent_id: str, sequence: int, rows: Sequence[CallRow], received_ns: int | None = None
    ) -> InsertResult:
        """Store a batch of model calls once, with insert_batch's rules, under the calls' own (agent_id, sequence)."""
        return self._insert_once("call_batches", "model_calls", _INSERT_CALL, _call_values, agent_id, sequence, rows,
                                 received_ns)

    def _insert_once(self, batches: str, table: str, insert_sql: str, values, agent_id: str, sequence: int,
                     rows: Sequence, received_ns: int | None) -> InsertResult:
        now = time.time_ns() if received_ns is None else received_ns
        seq = to_i64(sequence)
        digest = batch_digest(rows)
        with self._transaction() as conn:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO {batches} (agent_id, sequence, received_ns, records, digest)"
                " VALUES (?, ?, ?, ?, ?)",
                (agent_id, seq, now, len(rows), digest),
            )
            if cur.rowcount == 0:
                (stored,) = conn.execute(
                    f"SELECT digest FROM {batches} WHERE agent_id = ? AND sequence = ?", (agent_id, seq)
                ).fetchone()
                same = stored is None or bytes(stored) == digest  # no digest: stored by schema 1, trust the key
                return InsertResult(duplicate=same, inserted=0, last_id=0, conflict=not same)
            last_id = 0
            if rows:
                conn.executemany(insert_sql, (values(r, now) for r in rows))
                last_id = int(conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0])
            return InsertResult(duplicate=False, inserted=len(rows), last_id=last_id)

    def has_batch(self, agent_id: str, sequence: int) -> bool:
        with self._reader() as conn:
            row = conn.execute(
                "SELECT 1 FROM batches WHERE agent_id = ? AND sequence = ?", (agent_id, to_i64(sequence))
            ).fetchone()
            return row is not None

    def last_id(self) -> int:
        with self._reader() as conn:
            row = conn.execute("SELECT max(id) FROM flows").fetchone()
            return int(row[0] or 0)

    def count(self, flt: FlowFilter | None = None) -> int:
        where, params = build_where(flt or FlowFilter())
        with self._reader() as conn:
            return int(conn.execute(f"SELECT count(*) FROM flows WHERE {where}", params).fetchone()[0])

    def last_call_id(self) -> int:
        with self._reader() as conn:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM model_calls").fetchone()[0])

    def count_calls(self, flt: CallFilter | None = None) -> int:
        where, params = build_call_where(flt or CallFilter())
        with self._reader() as conn:
            return int(conn.execute(f"SELECT count(*) FROM model_calls WHERE {where}", params).fetchone()[0])

    def iter_flows(self, flt: FlowFilter, *, limit: int = 0, page: int = PAGE_ROWS) -> Iterator[StoredFlow]:
        """Matching flows oldest first (by time, then id); with a limit, the newest `limit` of them.

        Reads page by page, each in its own short read transaction, so a long listing neither holds memory nor
        keeps the WAL from being checkpointed. Rows deleted by retention meanwhile are skipped.
        """
        where, params = build_where(flt)
        return self._iter_rows("flows", where, params, limit, page)

    def iter_calls(self, flt: CallFilter, *, limit: int = 0, page: int = PAGE_ROWS) -> Iterator[StoredFlow]:
        """Matching model calls, as iter_flows does for flows (StoredFlow.payload: a serialized ModelCall)."""
        where, params = build_call_where(flt)
        return self._iter_rows("model_calls", where, params, limit, page)

    def _iter_rows(self, table: str, where: str, params: list[object], limit: int, page: int) -> Iterator[StoredFlow]:
        cursor: tuple[int, int] | None = None  # (time_ns, id) of the last row sent
        if limit > 0:
            with self._reader() as conn:
                row = conn.execute(
                    f"SELECT time_ns, id FROM {table} WHERE {where} ORDER BY time_ns DESC, id DESC LIMIT 1 OFFSET ?",
                    [*params, limit - 1],
                ).fetchone()
            if row is not None:  # fewer than `limit` match: send them all
                cursor = (int(row[0]), int(row[1]) - 1)
        while True:
            if cursor is None:
                sql = f"SELECT id, time_ns, record FROM {table} WHERE {where} ORDER BY time_ns, id LIMIT ?"
                args = [*params, page]
            else:
                sql = (
                    f"SELECT id, time_ns, record FROM {table} WHERE ({where})"
                    " AND (time_ns > ? OR (time_ns = ? AND id > ?)) ORDER BY time_ns, id LIMIT ?"
                )
                args = [*params, cursor[0], cursor[0], cursor[1], page]
            with self._reader() as conn:
                rows = conn.execute(sql, args).fetchall()
            for r in rows:
                yield StoredFlow(id=int(r[0]), time_ns=int(r[1]), payload=bytes(r[2]))
            if len(rows) < page:
                return
            cursor = (int(rows[-1][1]), int(rows[-1][0]))

    def flows_after(self, flt: FlowFilter, after_id: int, *, limit: int = PAGE_ROWS) -> tuple[list[StoredFlow], int]:
        """Matching flows with id > after_id in id (arrival) order, and the highest id examined.

        The returned id lets a follower skip rows that did not match without reading them again.
        """
        where, params = build_where(flt)
        return self._rows_after("flows", where, params, after_id, limit)

    def calls_after(self, flt: CallFilter, after_id: int, *, limit: int = PAGE_ROWS) -> tuple[list[StoredFlow], int]:
        """Matching model calls with id > after_id in arrival order, and the highest id examined (see flows_after)."""
        where, params = build_call_where(flt)
        return self._rows_after("model_calls", where, params, after_id, limit)

    def _rows_after(self, table: str, where: str, params: list[object], after_id: int,
                    limit: int) -> tuple[list[StoredFlow], int]:  # fmt: skip
        with self._reader() as conn:
            conn.execute("BEGIN")
            try:
                top = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])
                rows = conn.execute(
                    f"SELECT id, time_ns, record FROM {table} WHERE ({where}) AND id > ? AND id <= ? ORDER BY id"
                    " LIMIT ?",
                    [*params, after_id, top, limit],
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        flows = [StoredFlow(id=int(r[0]), time_ns=int(r[1]), payload=bytes(r[2])) for r in rows]
        seen = flows[-1].id if len(flows) == limit else max(top, after_id)
        return flows, seen

    def stats(self) -> StoreStats:
        with self._reader() as conn:
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            last = int(conn.execute("SELECT coalesce(max(id), 0) FROM flows").fetchone()[0])
        files = 0
        for suffix in ("", "-wal"):
            try:
                files += Path(str(self._path) + suffix).stat().st_size
            except OSError:
                pass
        return StoreStats(data_bytes=(pages - free) * page_size, file_bytes=files, last_id=last)

    def _delete_oldest(self, where: str, params: Sequence[object], max_rows: int | None = None,
                       table: str = "flows") -> int:  # fmt: skip
        """Delete the first-received rows matching `where` (at most max_rows), chunk by chunk so pushes go on in
        between. id order is arrival order."""
        deleted = 0
        while max_rows is None or deleted < max_rows:
            n = _DELETE_CHUNK if max_rows is None else min(_DELETE_CHUNK, max_rows - deleted)
            with self._transaction() as conn:
                cur = conn.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} ORDER BY id LIMIT ?)",
                    [*params, n],
                )
                got = max(cur.rowcount, 0)
            deleted += got
            if got < n:
                break
        return deleted

    def enforce_retention(self, policy: RetentionPolicy, now_ns: int | None = None) -> RetentionResult:
        """Delete flows and model calls received more than max_age ago, then the first-received of them until the
        data fits in max_bytes (each table giving up its share of the rows). Ages are by the collector's clock
        (received_ns), never by the record's own times."""
        now = time.time_ns() if now_ns is None else now_ns
        by_age = calls_by_age = 0
        if policy.max_age_ns > 0:
            by_age = self._delete_oldest("received_ns < ?", [now - policy.max_age_ns])
            calls_by_age = self._delete_oldest("received_ns < ?", [now - policy.max_age_ns], table="model_calls")
        forgotten = 0
        if policy.dedup_window_ns > 0:
            with self._transaction() as conn:
                for table in ("batches", "call_batches"):
                    cur = conn.execute(f"DELETE FROM {table} WHERE received_ns < ?", (now - policy.dedup_window_ns,))
                    forgotten += max(cur.rowcount, 0)
        by_size = calls_by_size = 0
        if policy.max_bytes > 0:
            target = int(policy.max_bytes * policy.low_watermark)
            for _ in range(8):  # page accounting is coarse: measure, delete an estimate, measure again
                used = self.stats().data_bytes
                if used <= target or (by_size + calls_by_size == 0 and used <= policy.max_bytes):
                    break  # under the low watermark, or never over the limit in the first place
                flows = self.count()
                calls = self.count_calls()
                rows = flows + calls
                if rows == 0:
                    break
                per_row = max(used / rows, 1.0)
                n = min(max(1, math.ceil((used - target) / per_row)), rows)
                n_calls = min(calls, math.ceil(n * calls / rows))
                got = self._delete_oldest("1", [], min(n - n_calls, flows)) if flows else 0
                got_calls = self._delete_oldest("1", [], n_calls, table="model_calls") if n_calls else 0
                by_size += got
                calls_by_size += got_calls
                if got == 0 and got_calls == 0:
                    break
        if by_age or by_size or calls_by_age or calls_by_size:
            self._reclaim()
        return RetentionResult(deleted_by_age=by_age, deleted_by_size=by_size, batches_forgotten=forgotten,
                               calls_deleted_by_age=calls_by_age, calls_deleted_by_size=calls_by_size)

    def _reclaim(self) -> None:
        """Give free pages back to the file system and truncate the WAL (best effort)."""
        with self._lock:
            if self._closed:
                return
            try:
                # Stepped to completion by executescript; execute() would step it once and free a single page.
                self._write.executescript("PRAGMA incremental_vacuum;")
                self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                pass  # a reader holds the WAL; the next retention pass tries again

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._conns_lock:
            conns = list(self._all)
            self._all.clear()
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
