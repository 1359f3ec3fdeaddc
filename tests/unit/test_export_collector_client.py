"""FlowExporter against a real collector: outages and restarts lose nothing that fits and store nothing twice."""

from __future__ import annotations

import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tests.unit.collector_testlib import (  # tmp_dir: a fixture
    list_cookies,
    refusing_port,
    start_collector_process,
    tmp_dir,  # noqa: F401
    wait_until,
)
from agent._gen.aimesh.v1 import collector_pb2
from agent.collector.server import CollectorConfig, CollectorServer
from agent.collector.service import (
    FLOW_SERVICE,
    CollectorMetrics,
    FlowCollectorService,
    ServiceLimits,
    service_handler,
)
from agent.collector.store import FlowStore
from agent.export.collector_client import (
    ExporterConfig,
    FlowExporter,
    Outcome,
    Spool,
    SealedBatch,
    backoff_delay,
    classify_error,
    DamagedBatch,
    batch_records,
    encode_batch,
    read_spool_file,
)
from agent.export.flow_metrics import ExportMetrics
from agent.export.records import FlowRecordData, IdentityData, to_proto


def fast_config(target: str, **overrides: object) -> ExporterConfig:
    fields: dict[str, object] = {
        "target": target,
        "agent_id": "node-a",
        "flush_interval_s": 0.05,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
        "rpc_timeout_s": 3.0,
        "batch_max_records": 50,
    }
    fields.update(overrides)
    return ExporterConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def collectors(tmp_dir: Path) -> Iterator[list[CollectorServer]]:
    started: list[CollectorServer] = []
    yield started
    for srv in started:
        srv.stop(0)


def start_server(
    started: list[CollectorServer], db: Path, listen: str = "127.0.0.1:0", **kw: object
) -> CollectorServer:
    srv = CollectorServer(CollectorConfig(listen=listen, db=db, grace_s=0.2, **kw))  # type: ignore[arg-type]
    srv.start()
    started.append(srv)
    return srv


def rec(i: int) -> FlowRecordData:
    when = 1_700_000_000 * 10**9 + i
    return FlowRecordData(cookie=i, source=IdentityData("ui", "agent", "v1"), end_time_unix_nano=when)


def stream(exporter: FlowExporter, n: int, seconds: float) -> threading.Thread:
    """Submit n records evenly over about `seconds`, from another thread."""

    def run() -> None:
        for i in range(n):
            assert exporter.submit(rec(i))
            if i % 50 == 49:
                time.sleep(seconds * 50 / n)

    t = threading.Thread(target=run)
    t.start()
    return t


def spooled_records(spool_dir: Path) -> int:
    return sum(len(read_spool_file(p)) for p in spool_dir.glob("*.batch"))


def assert_exactly_once(cookies: list[int], n: int) -> None:
    counts = Counter(cookies)
    assert [c for c, k in counts.items() if k > 1] == [], "stored twice"
    assert sorted(counts) == list(range(n)), f"missing {sorted(set(range(n)) - set(counts))[:10]}"


def test_collector_restart_during_a_steady_stream(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    db = tmp_dir / "flows.db"
    srv = start_server(collectors, db)
    addr = str(srv.address)
    exporter = FlowExporter(fast_config(addr, spool_dir=tmp_dir / "spool", memory_max_bytes=8192))
    exporter.start()
    n = 4000
    try:
        feeder = stream(exporter, n, seconds=1.5)
        assert wait_until(lambda: exporter.stats().sent_records > 500, 10)
        srv.stop(0)  # mid-stream
        assert wait_until(lambda: exporter.stats().export_errors > 0, 10)
        time.sleep(0.5)  # an outage with the stream still running: memory fills, the spool takes the rest
        assert exporter.stats().spool_batches > 0
        start_server(collectors, db, listen=addr)  # the same database, the same port
        feeder.join()
        assert exporter.flush(20)
    finally:
        stats = exporter.close()
    assert stats.submitted == n and stats.sent_records == n and stats.dropped == 0
    assert stats.spool_batches == 0 and not list((tmp_dir / "spool").glob("*.batch"))
    assert_exactly_once(list_cookies(addr), n)


def test_collector_killed_and_restarted(tmp_dir: Path) -> None:
    """SIGKILL the collector process mid-stream; restart it on the same database and port."""
    db = tmp_dir / "flows.db"
    first = start_collector_process(db, tmp_dir / "collector1.log")
    procs = [first]
    exporter = FlowExporter(fast_config(first.address, spool_dir=tmp_dir / "spool"))
    exporter.start()
    n = 3000
    try:
        feeder = stream(exporter, n, seconds=1.5)
        assert wait_until(lambda: exporter.stats().sent_records > 300, 15)
        first.kill()
        assert wait_until(lambda: exporter.stats().export_errors > 0, 10)
        second = start_collector_process(db, tmp_dir / "collector2.log", first.address)
        procs.append(second)
        feeder.join()
        assert exporter.flush(30)
        stats = exporter.close()
        assert stats.sent_records == n and stats.dropped == 0
        assert_exactly_once(list_cookies(second.address), n)
        assert second.terminate() == 0  # SIGTERM: a clean exit
    finally:
        exporter.close()
        for p in procs:
            p.kill()


class LosesFirstReply:
    """A collector whose first Push is stored but answered UNAVAILABLE, as when a reply is lost on the way."""

    def __init__(self, inner: FlowCollectorService) -> None:
        self._inner = inner
        self.calls = 0

    def Push(self, request: object, context: grpc.ServicerContext) -> collector_pb2.PushReply:  # noqa: N802
        self.calls += 1
        reply = self._inner.Push(request, context)  # type: ignore[arg-type]
        if self.calls == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (simulated)")
        return reply

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_lost_reply_is_retried_with_the_same_sequence(tmp_dir: Path) -> None:
    store = FlowStore(tmp_dir / "f.db")
    metrics = CollectorMetrics(CollectorRegistry())
    servicer = LosesFirstReply(FlowCollectorService(store, metrics))
    handler = service_handler(FLOW_SERVICE, servicer, lambda: None)
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        exporter = FlowExporter(fast_config(f"127.0.0.1:{port}"))
        exporter.start()
        exporter.submit_many(rec(i) for i in range(10))
        assert exporter.flush(10)
        stats = exporter.close()
        assert servicer.calls == 2
        assert stats.duplicate_batches == 1 and stats.export_errors == 1 and stats.sent_records == 10
        assert store.count() == 10
    finally:
        server.stop(0).wait()
        store.close()


def test_spool_limit_drops_are_counted(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    spool_dir = tmp_dir / "spool"
    with refusing_port() as port:
        cfg = fast_config(f"127.0.0.1:{port}", spool_dir=spool_dir, memory_max_bytes=2048, spool_max_bytes=16384,
                          batch_max_records=20)  # fmt: skip
        exporter = FlowExporter(cfg)
        exporter.start()
        n = 2000
        assert exporter.submit_many(rec(i) for i in range(n)) == n

        def settled() -> bool:
            s = exporter.stats()
            return s.queued_records == 0 and s.dropped_spool_full > 0 and s.export_errors > 0

        assert wait_until(settled, 10)
        stats = exporter.stats()
        on_disk = spooled_records(spool_dir)
        assert stats.spool_bytes <= 16384
        in_memory = stats.submitted - stats.dropped_spool_full - on_disk
        assert in_memory > 0 and stats.memory_bytes <= 2048 + 2048  # one batch may overshoot
        assert stats.sent_records == 0 and stats.export_errors > 0
        assert "UNAVAILABLE" in stats.last_error
    srv = start_server(collectors, tmp_dir / "flows.db", listen=f"127.0.0.1:{port}")
    assert exporter.flush(20)
    final = exporter.close()
    stored = list_cookies(str(srv.address))
    assert final.sent_records == n - final.dropped_spool_full == len(stored) == len(set(stored))


def test_queue_full_drops_are_counted(tmp_dir: Path) -> None:
    exporter = FlowExporter(fast_config("127.0.0.1:1", max_queue_records=10))  # not started: nothing drains
    accepted = exporter.submit_many(rec(i) for i in range(25))
    assert accepted == 10
    assert exporter.stats().dropped_queue_full == 15 and exporter.stats().dropped == 15
    exporter.close(timeout=0)


def test_spool_survives_an_agent_restart(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    spool_dir = tmp_dir / "spool"
    with refusing_port() as port:
        first = FlowExporter(fast_config(f"127.0.0.1:{port}", spool_dir=spool_dir))
        first.start()
        first.submit_many(rec(i) for i in range(300))
        stats = first.close(timeout=0.3)  # the collector is down: everything goes to the spool
    assert stats.sent_records == 0 and stats.dropped == 0
    files = sorted(spool_dir.glob("*.batch"))
    assert spooled_records(spool_dir) == 300
    first_sequences = [int(p.name.split(".")[0]) for p in files]

    srv = start_server(collectors, tmp_dir / "flows.db", listen=f"127.0.0.1:{port}")
    second = FlowExporter(fast_config(str(srv.address), spool_dir=spool_dir))
    second.start()
    second.submit_many(rec(i) for i in range(300, 400))
    assert second.flush(20)
    second.close()
    assert not list(spool_dir.glob("*.batch"))
    assert_exactly_once(list_cookies(str(srv.address)), 400)
    with srv.store._reader() as conn:  # noqa: SLF001 - the sequences the collector saw
        seqs = [r[0] for r in conn.execute("SELECT sequence FROM batches ORDER BY received_ns, sequence")]
    assert seqs[: len(first_sequences)] == first_sequences  # the spooled batches first, in order
    assert min(seqs[len(first_sequences):]) > max(first_sequences)  # and no sequence reused after the restart


def test_oversized_batches_are_split_and_bad_records_dropped(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    limits = ServiceLimits(max_batch_records=7, max_batch_bytes=4096)
    srv = start_server(collectors, tmp_dir / "flows.db", limits=limits)
    exporter = FlowExporter(fast_config(str(srv.address), batch_max_records=40))
    exporter.start()
    exporter.submit_many(rec(i) for i in range(100))
    exporter.submit(FlowRecordData(cookie=10_000, comm="x" * 5000))  # larger than the collector takes
    exporter.submit(FlowRecordData(cookie=10_001, bytes_sent=-1))  # cannot be encoded
    assert exporter.flush(20)
    stats = exporter.close()
    assert stats.sent_records == 100 and stats.rejected_records == 1 and stats.invalid_records == 1
    assert stats.dropped == 2
    assert_exactly_once(list_cookies(str(srv.address)), 100)


def test_unauthenticated_keeps_the_data(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    srv = start_server(collectors, tmp_dir / "flows.db", token="right")
    exporter = FlowExporter(fast_config(str(srv.address), token="wrong"))
    exporter.start()
    exporter.submit_many(rec(i) for i in range(10))
    assert not exporter.flush(0.5)
    stats = exporter.close(timeout=0.2)
    assert stats.sent_records == 0 and "UNAUTHENTICATED" in stats.last_error
    assert stats.dropped_spool_full == 10  # no spool configured: counted, not silently lost


def test_close_is_prompt_and_idempotent(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    srv = start_server(collectors, tmp_dir / "flows.db")
    exporter = FlowExporter(fast_config(str(srv.address), flush_interval_s=30))
    exporter.start()
    exporter.submit_many(rec(i) for i in range(3))  # a partial batch: close sends it without waiting 30 s
    t0 = time.monotonic()
    stats = exporter.close()
    assert time.monotonic() - t0 < 2 and stats.sent_records == 3
    assert exporter.close() == stats
    assert not exporter.submit(rec(99)) and exporter.stats().dropped_queue_full == 1
    with pytest.raises(RuntimeError):
        exporter.start()


def test_corrupt_spool_file_is_skipped(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    spool_dir = tmp_dir / "spool"
    spool = Spool(spool_dir, 1 << 20)
    good = [to_proto(rec(i)) for i in range(3)]
    assert spool.put(SealedBatch(5, encode_batch("node-a", 5, good), 3))
    (spool_dir / f"{4:020d}.batch").write_bytes(b"\xff\xff\xff not a batch")
    (spool_dir / "00000000000000000009.batch.tmp").write_bytes(b"half written")
    srv = start_server(collectors, tmp_dir / "flows.db")
    exporter = FlowExporter(fast_config(str(srv.address), spool_dir=spool_dir))
    assert not (spool_dir / "00000000000000000009.batch.tmp").exists()
    exporter.start()
    assert exporter.flush(10)
    stats = exporter.close()
    assert stats.corrupt_spool_files == 1 and stats.sent_records == 3
    assert sorted(list_cookies(str(srv.address))) == [0, 1, 2]


def _frame_file(spool_dir: Path, seq: int, cookies: range) -> tuple[Path, bytes]:
    """A spool file as the spool writes it (header + batch) and the batch's bytes."""
    payload = encode_batch("node-a", seq, [to_proto(rec(i)) for i in cookies])
    path = spool_dir / f"{seq:020d}.{len(cookies)}.batch"
    path.write_bytes(Spool.frame(SealedBatch(seq, payload, len(cookies))))
    return path, payload


def test_damaged_spool_batches_are_counted_kept_aside_and_the_rest_sent(collectors: list[CollectorServer],
                                                                          tmp_dir: Path) -> None:
    """A flipped byte, a file cut at a record boundary (its batch still parses, one record short: the old format
    lost that record silently) and one cut mid-record: each batch and its records counted by reason, the file kept
    in damaged/ (0600), never a crash; the good batches around them, new format and old, are all sent."""
    spool_dir = tmp_dir / "spool"
    Spool(spool_dir, 1 << 20)                                   # the directory, 0700
    _frame_file(spool_dir, 1, range(0, 3))
    flipped, _ = _frame_file(spool_dir, 2, range(100, 268))    # 268 - 100 = 168 records
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    boundary, payload = _frame_file(spool_dir, 3, range(300, 310))
    shorter = encode_batch("node-a", 3, [to_proto(rec(i)) for i in range(300, 309)])
    assert payload.startswith(shorter) and len(batch_records(shorter)) == 9      # a prefix that parses
    boundary.write_bytes(boundary.read_bytes()[: Spool.HEADER.size + len(shorter)])
    mid, _ = _frame_file(spool_dir, 4, range(400, 405))
    mid.write_bytes(mid.read_bytes()[:-3])
    _frame_file(spool_dir, 5, range(5, 8))
    old = encode_batch("node-a", 6, [to_proto(rec(i)) for i in range(8, 10)])
    (spool_dir / f"{6:020d}.batch").write_bytes(old)           # the format before checksums: still read
    with pytest.raises(DamagedBatch) as e:
        read_spool_file(flipped)
    assert e.value.reason == "checksum"

    srv = start_server(collectors, tmp_dir / "flows.db")
    exporter = FlowExporter(fast_config(str(srv.address), spool_dir=spool_dir))
    exporter.start()
    assert exporter.flush(10)
    stats = exporter.close()
    assert sorted(list_cookies(str(srv.address))) == [0, 1, 2, 5, 6, 7, 8, 9]
    assert stats.sent_records == 8 and stats.corrupt_spool_files == 3
    assert dict(stats.spool_discarded_batches) == {"checksum": 1, "truncated": 2}
    assert dict(stats.spool_discarded_records) == {"checksum": 168, "truncated": 15}
    assert stats.dropped == 183
    damaged = spool_dir / Spool.DAMAGED
    assert stat.S_IMODE(damaged.stat().st_mode) == 0o700
    kept = sorted(p.name for p in damaged.iterdir())
    assert kept == [f"{2:020d}.168.batch.checksum", f"{3:020d}.10.batch.truncated", f"{4:020d}.5.batch.truncated"]
    assert all(stat.S_IMODE((damaged / k).stat().st_mode) == 0o600 for k in kept)
    assert not list(spool_dir.glob("*.batch"))
    families = {f.name: f for f in ExportMetrics(exporter.stats, "aimesh_export", "Flow records").collect()}
    by_reason = {s.labels["reason"]: s.value for s in families["aimesh_export_spool_discarded_records"].samples
                 if s.name.endswith("_total")}
    assert by_reason == {"unreadable": 0, "truncated": 15, "checksum": 168, "undecodable": 0}


def test_the_damaged_folder_is_bounded(tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Spool, "DAMAGED_MAX_FILES", 2)
    spool_dir = tmp_dir / "spool"
    Spool(spool_dir, 1 << 20)
    for seq in range(1, 5):
        path, _ = _frame_file(spool_dir, seq, range(seq, seq + 1))
        path.write_bytes(path.read_bytes()[:-1])
    spool = Spool(spool_dir, 1 << 20)
    reasons = []
    while len(spool):
        with pytest.raises(DamagedBatch) as e:
            spool.oldest()
        reasons.append((e.value.reason, e.value.records))
    assert reasons == [("truncated", 1)] * 4
    assert sorted(p.name for p in (spool_dir / Spool.DAMAGED).iterdir()) == [
        f"{3:020d}.1.batch.truncated", f"{4:020d}.1.batch.truncated"]                # the newest two


def test_spool_is_bounded_and_ordered(tmp_dir: Path) -> None:
    h = Spool.HEADER.size
    spool = Spool(tmp_dir, max_bytes=2 * (40 + h) + 10)
    assert spool.put(SealedBatch(3, b"x" * 40, 1))
    assert spool.put(SealedBatch(1, b"y" * 40, 1))
    assert not spool.put(SealedBatch(2, b"z" * 40, 1))  # would exceed max_bytes
    assert (len(spool), spool.bytes, spool.max_sequence) == (2, 2 * (40 + h), 3)
    reopened = Spool(tmp_dir, max_bytes=2 * (40 + h) + 10)
    assert (len(reopened), reopened.bytes) == (2, 2 * (40 + h))
    with pytest.raises(DamagedBatch, match="damaged") as e:  # b"y"*40 checks but is not a FlowBatch
        reopened.oldest()
    assert (e.value.reason, e.value.records, len(reopened)) == ("undecodable", 1, 1)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert backoff_delay(1, 0.1, 5, 0.0) == pytest.approx(0.05)
    assert backoff_delay(1, 0.1, 5, 0.999) == pytest.approx(0.1, rel=0.01)
    assert backoff_delay(4, 0.1, 5, 0.0) == pytest.approx(0.4)
    assert backoff_delay(50, 0.1, 5, 1.0) == pytest.approx(5.0)
    assert backoff_delay(10_000, 0.1, 5, 0.5) <= 5.0


def test_error_classification() -> None:
    code = grpc.StatusCode
    assert classify_error(code.UNAVAILABLE, "", [], 10) is Outcome.RETRY
    assert classify_error(code.DEADLINE_EXCEEDED, "", [], 10) is Outcome.RETRY
    assert classify_error(code.UNAUTHENTICATED, "", [], 10) is Outcome.RETRY
    assert classify_error(code.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", [], 10) is Outcome.RETRY
    assert classify_error(code.RESOURCE_EXHAUSTED, "too big", ["aimesh-max-records"], 10) is Outcome.SPLIT
    assert classify_error(code.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", [], 2) is Outcome.SPLIT
    assert classify_error(code.RESOURCE_EXHAUSTED, "too big", ["aimesh-max-bytes"], 1) is Outcome.DROP
    assert classify_error(code.INVALID_ARGUMENT, "bad", [], 3) is Outcome.SPLIT
    assert classify_error(code.INVALID_ARGUMENT, "bad", [], 1) is Outcome.DROP


def test_sequences_start_after_the_clock_and_the_spool(tmp_dir: Path) -> None:
    Spool(tmp_dir, 1 << 20).put(SealedBatch(10**18, encode_batch("a", 10**18, []), 0))
    exporter = FlowExporter(fast_config("127.0.0.1:1", spool_dir=tmp_dir), wall_ns=lambda: 5_000_000)
    assert exporter._take_sequence() == 10**18 + 1  # noqa: SLF001
    plain = FlowExporter(fast_config("127.0.0.1:1"), wall_ns=lambda: 5_000_000)
    assert plain._take_sequence() == 5000  # noqa: SLF001 - microseconds


def test_a_lone_record_goes_out_after_the_flush_interval(collectors: list[CollectorServer], tmp_dir: Path) -> None:
    srv = start_server(collectors, tmp_dir / "flows.db")
    exporter = FlowExporter(fast_config(str(srv.address), flush_interval_s=0.1))
    exporter.start()
    try:
        time.sleep(0.2)  # the sender is asleep
        t0 = time.monotonic()
        exporter.submit(rec(1))
        assert wait_until(lambda: exporter.stats().sent_records == 1, 5)
        assert time.monotonic() - t0 < 0.9  # not the sender's 1 s idle tick
    finally:
        exporter.close()


class Hangs:
    """A collector that accepts pushes and never answers them."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Push(self, request: object, context: grpc.ServicerContext) -> collector_pb2.PushReply:  # noqa: N802
        self.release.wait(30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "gave up")
        raise AssertionError

    def ListFlows(self, request: object, context: grpc.ServicerContext) -> Iterator[bytes]:  # noqa: N802
        return iter(())

    Follow = ListFlows


def test_close_cancels_a_hung_push_and_spools_it(tmp_dir: Path) -> None:
    hangs = Hangs()
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[service_handler(FLOW_SERVICE, hangs, lambda: None)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        exporter = FlowExporter(fast_config(f"127.0.0.1:{port}", rpc_timeout_s=30, spool_dir=tmp_dir / "spool"))
        exporter.start()
        exporter.submit(rec(1))
        time.sleep(0.3)  # the push is in flight
        t0 = time.monotonic()
        stats = exporter.close(timeout=0.3)
        assert time.monotonic() - t0 < 3
        assert stats.spool_batches == 1 and stats.dropped == 0 and "CANCELLED" in stats.last_error
    finally:
        hangs.release.set()
        server.stop(0).wait()
