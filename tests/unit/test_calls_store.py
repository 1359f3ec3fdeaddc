"""The model_calls table: filters as SQL, keys apart from flow batches, retention by receive time and by size,
and a database made before the table existed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.unit.collector_testlib import tmp_dir  # noqa: F401  (a fixture; the import also generates the protobuf code)
from agent.collector.store import (CallFilter, CallRow, FlowRow, FlowStore, Ident, RetentionPolicy,
                                   build_call_where)  # fmt: skip

T0 = 1_700_000_000_000_000_000


def crow(i: int, *, model: str = "m", status: int = 200, src: str = "a", payload: bytes | None = None) -> CallRow:
    return CallRow(time_ns=T0 + i, agent_id="n1", source=Ident(src), destination=Ident("b"),
                   actual_destination=Ident("b"), request_model=model, response_model="", status=status,
                   payload=payload if payload is not None else i.to_bytes(4, "big"))  # fmt: skip


def frow(i: int, payload: bytes) -> FlowRow:
    return FlowRow(time_ns=T0 + i, agent_id="n1", verdict=1, source=Ident("a"), destination=Ident("b"),
                   actual_destination=Ident("b"), payload=payload)  # fmt: skip


def test_where() -> None:
    assert build_call_where(CallFilter()) == ("1", [])
    where, params = build_call_where(CallFilter(model="gpt", statuses=((400, 599), (0, 0)), source=Ident("a")))
    assert where == ("src_name = ? AND (request_model = ? OR response_model = ?)"
                     " AND (status BETWEEN ? AND ? OR status BETWEEN ? AND ?)")  # fmt: skip
    assert params == ["a", "gpt", "gpt", 400, 599, 0, 0]


def test_insert_list_follow(tmp_dir: Path) -> None:
    s = FlowStore(tmp_dir / "c.db")
    try:
        assert s.insert_call_batch("n1", 1, [crow(1), crow(2, model="x", status=503)]).inserted == 2
        assert s.insert_call_batch("n1", 1, [crow(1), crow(2, model="x", status=503)]).duplicate
        assert s.insert_call_batch("n1", 1, [crow(3)]).conflict
        assert not s.insert_batch("n1", 1, [frow(1, b"f")]).duplicate  # flow keys are apart
        assert [r.payload for r in s.iter_calls(CallFilter(model="x"))] == [(2).to_bytes(4, "big")]
        assert s.count_calls(CallFilter(statuses=((500, 599),))) == 1
        assert s.last_call_id() == 2 and s.last_id() == 1
        rows, seen = s.calls_after(CallFilter(), 1)
        assert [r.id for r in rows] == [2] and seen == 2
    finally:
        s.close()


def test_retention_by_age_and_keys(tmp_dir: Path) -> None:
    s = FlowStore(tmp_dir / "c.db")
    try:
        s.insert_call_batch("n1", 1, [crow(1)], received_ns=T0)
        s.insert_call_batch("n1", 2, [crow(2)], received_ns=T0 + 10**12)
        res = s.enforce_retention(RetentionPolicy(max_age_ns=10**12, dedup_window_ns=10**12), now_ns=T0 + 10**12 + 1)
        assert res.calls_deleted_by_age == 1 and res.deleted_by_age == 0 and res.batches_forgotten == 1
        assert [r.payload for r in s.iter_calls(CallFilter())] == [(2).to_bytes(4, "big")]
        assert s.insert_call_batch("n1", 1, [crow(1)], received_ns=T0).inserted == 1  # forgotten key: stored anew
    finally:
        s.close()


def test_retention_by_size_takes_from_both_tables(tmp_dir: Path) -> None:
    s = FlowStore(tmp_dir / "c.db")
    blob = bytes(range(256)) * 8
    try:
        for seq in range(10):
            s.insert_batch("n1", seq, [frow(seq * 50 + i, blob) for i in range(50)])
            s.insert_call_batch("n1", seq, [crow(seq * 50 + i, payload=blob) for i in range(50)])
        limit = 400_000
        res = s.enforce_retention(RetentionPolicy(max_bytes=limit))
        assert res.deleted_by_size > 0 and res.calls_deleted_by_size > 0
        assert s.stats().data_bytes <= limit
        kept = list(s.iter_calls(CallFilter()))
        assert kept and kept[0].time_ns == T0 + res.calls_deleted_by_size  # the oldest calls went
    finally:
        s.close()


def test_a_database_from_before_gains_the_tables(tmp_dir: Path) -> None:
    path = tmp_dir / "old.db"
    FlowStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE model_calls; DROP TABLE call_batches;")  # as a collector before model calls left it
    conn.close()
    s = FlowStore(path)
    try:
        assert s.insert_call_batch("n1", 1, [crow(1)]).inserted == 1
    finally:
        s.close()
