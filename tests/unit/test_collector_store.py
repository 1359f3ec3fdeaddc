"""FlowStore: idempotent batches, filters, paging, followers' cursor, retention by age and size."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from tests.unit.collector_testlib import tmp_dir  # noqa: F401  (a fixture; the import also generates the protobuf code)
from agent.collector.store import (
    FlowFilter,
    FlowRow,
    FlowStore,
    Ident,
    RetentionPolicy,
    StoreError,
    build_where,
    from_i64,
    to_i64,
)

T0 = 1_700_000_000 * 10**9


def row(i: int, *, time_ns: int | None = None, src: str = "a", dst: str = "b", act: str = "", verdict: int = 1,
        agent: str = "n1", version: str = "", payload: bytes | None = None) -> FlowRow:  # fmt: skip
    return FlowRow(
        time_ns=T0 + i if time_ns is None else time_ns,
        agent_id=agent,
        verdict=verdict,
        source=Ident(name=src),
        destination=Ident(name=dst, version=version),
        actual_destination=Ident(name=act or dst, version=version),
        payload=payload if payload is not None else f"rec{i}".encode(),
    )


@pytest.fixture
def store(tmp_dir: Path):
    s = FlowStore(tmp_dir / "flows.db")
    yield s
    s.close()


def payloads(flows) -> list[bytes]:
    return [f.payload for f in flows]


def test_wal_mode_and_schema(store: FlowStore) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        conn.close()


def test_insert_is_idempotent_per_agent_and_sequence(store: FlowStore) -> None:
    first = store.insert_batch("n1", 7, [row(1), row(2)])
    assert (first.duplicate, first.inserted) == (False, 2)
    again = store.insert_batch("n1", 7, [row(1), row(2)])
    assert (again.duplicate, again.inserted) == (True, 0)
    other_agent = store.insert_batch("n2", 7, [row(3)])
    assert not other_agent.duplicate
    assert store.count() == 3
    assert store.has_batch("n1", 7) and not store.has_batch("n1", 8)


def test_uint64_sequences(store: FlowStore) -> None:
    big = (1 << 64) - 1
    assert to_i64(big) == -1 and from_i64(-1) == big
    assert to_i64((1 << 63) - 1) == (1 << 63) - 1
    with pytest.raises(ValueError):
        to_i64(1 << 64)
    assert not store.insert_batch("n1", big, [row(1)]).duplicate
    assert store.insert_batch("n1", big, [row(1)]).duplicate
    assert not store.insert_batch("n1", 1 << 63, [row(2)]).duplicate


def test_empty_batch_is_remembered(store: FlowStore) -> None:
    assert store.insert_batch("n1", 1, []).inserted == 0
    assert store.insert_batch("n1", 1, []).duplicate


def test_failed_insert_stores_nothing(store: FlowStore) -> None:
    bad = FlowRow(T0, "n1", 1, Ident(), Ident(), Ident(), None)  # type: ignore[arg-type]  # NOT NULL violated
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_batch("n1", 1, [row(1), bad])
    assert store.count() == 0
    assert not store.has_batch("n1", 1)  # the retry is not mistaken for a duplicate
    assert not store.insert_batch("n1", 1, [row(1)]).duplicate


def test_filters(store: FlowStore) -> None:
    store.insert_batch("n1", 1, [
        row(1, src="ui", dst="llm", version="v1", verdict=1),
        row(2, src="ui", dst="llm", act="llm", version="v2", verdict=4),
        row(3, src="tool", dst="db", verdict=2),
        row(4, src="ui", dst="old", act="new", verdict=4),
    ])  # fmt: skip
    store.insert_batch("n2", 1, [row(5, src="ui", dst="db", verdict=3, agent="n2")])

    def q(**kw: object) -> list[bytes]:
        return payloads(store.iter_flows(FlowFilter(**kw)))  # type: ignore[arg-type]

    assert q() == [b"rec1", b"rec2", b"rec3", b"rec4", b"rec5"]
    assert q(source=Ident(name="ui")) == [b"rec1", b"rec2", b"rec4", b"rec5"]
    assert q(destination=Ident(name="llm", version="v2")) == [b"rec2"]
    assert q(destination=Ident(name="new")) == [b"rec4"]  # the actual destination matches too
    assert q(destination=Ident(name="old")) == [b"rec4"]  # and so does the dialed one
    assert q(verdicts=frozenset({2, 3})) == [b"rec3", b"rec5"]
    assert q(since_ns=T0 + 2, until_ns=T0 + 4) == [b"rec2", b"rec3"]
    assert q(agent_id="n2") == [b"rec5"]
    assert q(source=Ident(name="ui"), verdicts=frozenset({4})) == [b"rec2", b"rec4"]
    assert q(source=Ident(name="nobody")) == []


def test_build_where_is_parameterized() -> None:
    where, params = build_where(FlowFilter(source=Ident(name="x'; DROP TABLE flows; --")))
    assert "DROP" not in where and params == ["x'; DROP TABLE flows; --"]
    assert build_where(FlowFilter()) == ("1", [])


def test_limit_gives_the_newest_oldest_first_across_pages(store: FlowStore) -> None:
    # times out of insertion order, with ties
    times = [T0 + t for t in (5, 1, 3, 3, 9, 0, 7, 3, 2, 8)]
    store.insert_batch("n1", 1, [row(i, time_ns=t) for i, t in enumerate(times)])
    everything = list(store.iter_flows(FlowFilter(), page=3))
    assert [f.time_ns - T0 for f in everything] == sorted(t - T0 for t in times)
    newest = list(store.iter_flows(FlowFilter(), limit=4, page=3))
    assert [f.time_ns - T0 for f in newest] == [5, 7, 8, 9]
    ties = list(store.iter_flows(FlowFilter(), limit=6, page=2))
    assert [f.time_ns - T0 for f in ties] == [3, 3, 5, 7, 8, 9]
    assert [(f.time_ns, f.id) for f in ties] == sorted((f.time_ns, f.id) for f in ties)
    assert len(list(store.iter_flows(FlowFilter(), limit=100))) == 10


def test_flows_after_follows_arrival_order(store: FlowStore) -> None:
    store.insert_batch("n1", 1, [row(1, src="ui"), row(2, src="x"), row(3, src="ui")])
    flt = FlowFilter(source=Ident(name="ui"))
    flows, seen = store.flows_after(flt, 0)
    assert payloads(flows) == [b"rec1", b"rec3"] and seen == store.last_id()
    assert store.flows_after(flt, seen) == ([], seen)
    store.insert_batch("n1", 2, [row(0, src="x"), row(9, src="ui")])  # an older time still comes next
    flows, seen2 = store.flows_after(flt, seen)
    assert payloads(flows) == [b"rec9"] and seen2 == seen + 2
    page, cursor = store.flows_after(FlowFilter(), 0, limit=2)
    assert len(page) == 2 and cursor == page[-1].id


def test_data_survives_reopen(tmp_dir: Path) -> None:
    s = FlowStore(tmp_dir / "f.db")
    s.insert_batch("n1", 1, [row(1)])
    s.close()
    s = FlowStore(tmp_dir / "f.db")
    try:
        assert s.insert_batch("n1", 1, [row(1)]).duplicate
        assert s.count() == 1
    finally:
        s.close()


def test_unknown_schema_version_is_refused(tmp_dir: Path) -> None:
    FlowStore(tmp_dir / "f.db").close()
    conn = sqlite3.connect(tmp_dir / "f.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        FlowStore(tmp_dir / "f.db")


def test_not_a_database(tmp_dir: Path) -> None:
    (tmp_dir / "f.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        FlowStore(tmp_dir / "f.db")


def test_closed_store_refuses(store: FlowStore) -> None:
    store.close()
    with pytest.raises(StoreError):
        store.insert_batch("n1", 1, [row(1)])
    with pytest.raises(StoreError):
        store.last_id()


def test_retention_by_age(store: FlowStore) -> None:
    hour = 3600 * 10**9
    now = T0 + 10 * hour
    for i in range(10):  # batch i received at T0 + i hours; its record says it happened 8 days before that
        store.insert_batch("n1", i, [row(i, time_ns=T0 + i * hour - 8 * 24 * hour)], received_ns=T0 + i * hour)
    result = store.enforce_retention(RetentionPolicy(max_age_ns=3 * hour), now_ns=now)
    assert result.deleted_by_age == 7 and result.deleted_by_size == 0
    assert payloads(store.iter_flows(FlowFilter())) == [b"rec7", b"rec8", b"rec9"]
    assert store.enforce_retention(RetentionPolicy(max_age_ns=3 * hour), now_ns=now).deleted_by_age == 0


def test_retention_goes_by_receive_time_not_the_agents_clock(store: FlowStore) -> None:
    day = 86400 * 10**9
    now = T0 + 30 * day
    store.insert_batch("behind", 1, [row(1, time_ns=now - 8 * day)], received_ns=now)  # an agent 8 days behind
    assert store.enforce_retention(RetentionPolicy(max_age_ns=7 * day), now_ns=now + 60 * 10**9).deleted_by_age == 0
    assert store.count() == 1
    assert store.enforce_retention(RetentionPolicy(max_age_ns=7 * day), now_ns=now + 7 * day + 1).deleted_by_age == 1


def test_retention_forgets_old_batch_keys(store: FlowStore) -> None:
    store.insert_batch("n1", 1, [row(1)], received_ns=T0)
    store.insert_batch("n1", 2, [row(2)], received_ns=T0 + 10 * 10**9)
    result = store.enforce_retention(RetentionPolicy(dedup_window_ns=5 * 10**9), now_ns=T0 + 12 * 10**9)
    assert result.batches_forgotten == 1
    assert not store.has_batch("n1", 1) and store.has_batch("n1", 2)
    assert store.count() == 2  # forgetting keys deletes no flows


def test_retention_by_size_deletes_oldest_and_shrinks_the_file(store: FlowStore) -> None:
    blob = bytes(range(256)) * 8  # 2 KiB per record
    for seq in range(20):
        store.insert_batch("n1", seq, [row(seq * 50 + i, payload=blob) for i in range(50)])
    before = store.stats()
    assert before.data_bytes > 2_000_000
    limit = 500_000
    result = store.enforce_retention(RetentionPolicy(max_bytes=limit, low_watermark=0.9))
    after = store.stats()
    assert result.deleted_by_size > 0
    assert after.data_bytes <= limit
    assert after.file_bytes < before.file_bytes / 2  # pages went back to the file system
    kept = list(store.iter_flows(FlowFilter()))
    assert kept and len(kept) + result.deleted_by_size == 1000
    assert kept[0].time_ns == T0 + result.deleted_by_size  # exactly the oldest ones went
    # Under the limit: nothing more is deleted.
    assert store.enforce_retention(RetentionPolicy(max_bytes=limit)).deleted_by_size == 0
    # Inserting continues to work after the vacuum.
    assert store.insert_batch("n1", 999, [row(5000)]).inserted == 1


def test_follower_ids_never_go_back_after_everything_is_deleted(store: FlowStore) -> None:
    store.insert_batch("n1", 1, [row(1), row(2)])
    last = store.last_id()
    store.enforce_retention(RetentionPolicy(max_age_ns=1), now_ns=time.time_ns() + 10**12)  # received now
    assert store.count() == 0
    store.insert_batch("n1", 2, [row(3)])
    flows, _ = store.flows_after(FlowFilter(), last)
    assert payloads(flows) == [b"rec3"]


def test_same_key_same_records_is_a_duplicate_different_records_a_conflict(store: FlowStore) -> None:
    assert store.insert_batch("n1", 5, [row(1), row(2)]).inserted == 2
    retry = store.insert_batch("n1", 5, [row(1), row(2)])
    assert retry.duplicate and not retry.conflict and retry.inserted == 0
    other = store.insert_batch("n1", 5, [row(1), row(3)])
    assert other.conflict and not other.duplicate and other.inserted == 0
    assert store.insert_batch("n1", 5, [row(2), row(1)]).conflict  # order is content too
    assert payloads(store.iter_flows(FlowFilter())) == [b"rec1", b"rec2"]  # nothing of the conflicting batches


def test_database_files_are_private(tmp_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        s = FlowStore(tmp_dir / "p.db")
        s.insert_batch("n1", 1, [row(1)])
        for suffix in ("", "-wal", "-shm"):
            f = tmp_dir / f"p.db{suffix}"
            assert f.exists() and stat.S_IMODE(f.stat().st_mode) == 0o600, suffix
        s.close()
        (tmp_dir / "p.db").chmod(0o644)  # an existing database made by an older collector
        FlowStore(tmp_dir / "p.db").close()
        assert stat.S_IMODE((tmp_dir / "p.db").stat().st_mode) == 0o600
    finally:
        os.umask(old)


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE batches (agent_id TEXT NOT NULL, sequence INTEGER NOT NULL, received_ns INTEGER NOT NULL,
    records INTEGER NOT NULL, PRIMARY KEY (agent_id, sequence)) WITHOUT ROWID;
CREATE TABLE flows (id INTEGER PRIMARY KEY AUTOINCREMENT, time_ns INTEGER NOT NULL, agent_id TEXT NOT NULL,
    verdict INTEGER NOT NULL, src_name TEXT NOT NULL, src_kind TEXT NOT NULL, src_version TEXT NOT NULL,
    dst_name TEXT NOT NULL, dst_kind TEXT NOT NULL, dst_version TEXT NOT NULL, act_name TEXT NOT NULL,
    act_kind TEXT NOT NULL, act_version TEXT NOT NULL, record BLOB NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO batches VALUES ('n1', 1, 5, 1);
INSERT INTO flows (time_ns, agent_id, verdict, src_name, src_kind, src_version, dst_name, dst_kind, dst_version,
    act_name, act_kind, act_version, record) VALUES (1000, 'n1', 1, 'a', '', '', 'b', '', '', 'b', '', '', x'01');
"""


def test_schema_1_database_is_migrated_once(tmp_dir: Path) -> None:
    path = tmp_dir / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_1)
    conn.close()
    before = time.time_ns()
    for i in range(2):  # opening again migrates nothing more
        s = FlowStore(path)
        try:
            assert s.count() == 1 + i
            assert s.insert_batch("n1", 1, [row(9)]).duplicate  # a schema-1 key without digest: trusted
            assert s.insert_batch("n1", 2, [row(2)]).inserted == 1 - i
            assert s.insert_batch("n1", 2, [row(2)]).duplicate
        finally:
            s.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
        (received,) = conn.execute("SELECT received_ns FROM flows WHERE time_ns = 1000").fetchone()
        assert received >= before  # an old row counts as received at the migration: not deleted by an old clock
        assert conn.execute("SELECT count(*) FROM pragma_index_list('flows') WHERE name = 'flows_received'"
                            ).fetchone()[0] == 1  # fmt: skip
    finally:
        conn.close()
