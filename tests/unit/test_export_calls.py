"""ModelCallExporter against a real collector: calls stored once each through an outage, their own spool and sequence
space beside the flow exporter's, drops counted and exported as metrics."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.calls_testlib import AUTH, TOKEN, start  # noqa: F401  (fixture)
from tests.unit.collector_testlib import stub_for, tmp_dir, wait_until  # noqa: F401  (fixture)
from tests.unit.test_export_collector_client import fast_config, rec
from tests.unit.test_otlp import LLAMA, WEB, make_call
from agent._gen.aimesh.v1 import collector_pb2
from agent.export.collector_client import CALLS_SPOOL, FlowExporter, ModelCallExporter
from agent.export.flow_metrics import ExportMetrics
from agent.flows.model import IdentityData

OFFSET = 1_764_000_000_000_000_000
DIALED = IdentityData("llama-vip", "model", "")


def stored_calls(address: str) -> list:
    ch, stub = stub_for(address)
    with ch:
        return list(stub.ListCalls(collector_pb2.CallQuery(), metadata=AUTH, timeout=5))


def calls_exporter(target: str, spool: Path | None, **kw: object) -> ModelCallExporter:
    return ModelCallExporter(fast_config(target, token=TOKEN, spool_dir=spool, **kw), "node-1", lambda: OFFSET)


def test_calls_reach_the_collector_with_where_they_happened(start, tmp_dir: Path) -> None:  # noqa: F811
    srv = start()
    exp = calls_exporter(str(srv.address), tmp_dir / "spool" / CALLS_SPOOL)
    exp.start()
    for i in range(3):
        exp.emit_call(make_call(conn_key=100 + i, sequence=i), WEB, LLAMA, 4242, "python3", dialed=DIALED)
    assert exp.flush(10)
    st = exp.close()
    assert (st.submitted, st.sent_records, st.dropped) == (3, 3, 0)
    calls = sorted(stored_calls(str(srv.address)), key=lambda c: c.cookie)
    assert [c.cookie for c in calls] == [100, 101, 102]
    c = calls[0]
    assert (c.source.name, c.destination.name, c.actual_destination.name) == ("chat-frontend", "llama-vip", "llama")
    assert (c.pid, c.comm, c.agent_id, c.node) == (4242, "python3", "node-a", "node-1")
    assert (c.request_model, c.input_tokens, c.output_tokens) == ("gpt-4o-mini", 12, 300)
    assert c.start_time_unix_nano == OFFSET + 5_000_000_000


def test_an_outage_loses_nothing_and_stores_nothing_twice(start, tmp_dir: Path) -> None:  # noqa: F811
    srv = start()
    address = str(srv.address)
    spool = tmp_dir / "spool" / CALLS_SPOOL
    srv.stop(0)
    exp = calls_exporter(address, spool, memory_max_bytes=1, batch_max_records=5)
    exp.start()
    for i in range(40):
        exp.emit_call(make_call(conn_key=1000 + i), WEB, LLAMA, 1, "curl")
    assert wait_until(lambda: exp.stats().spool_batches > 0)
    assert not exp.flush(0.3)
    srv = start(listen=address)
    assert exp.flush(15)
    st = exp.close()
    assert st.sent_records == 40 and st.dropped == 0 and st.export_errors > 0
    cookies = sorted(c.cookie for c in stored_calls(address))
    assert cookies == list(range(1000, 1040))
    assert not list(spool.glob("*.batch"))


def test_own_spool_and_sequence_space_beside_the_flow_exporter(start, tmp_dir: Path) -> None:  # noqa: F811
    srv = start()
    address = str(srv.address)
    flow_spool = tmp_dir / "spool"
    srv.stop(0)
    flows = FlowExporter(fast_config(address, token=TOKEN, spool_dir=flow_spool))
    calls = calls_exporter(address, flow_spool / CALLS_SPOOL)
    for i in range(3):
        flows.submit(rec(i))
        calls.emit_call(make_call(conn_key=50 + i), WEB, LLAMA, 1, "curl")
    flows.close(0)
    calls.close(0)     # never started: both spool what they hold, in their own directories
    assert len(list(flow_spool.glob("*.batch"))) == 1
    assert len(list((flow_spool / CALLS_SPOOL).glob("*.batch"))) == 1
    # a restarted agent: each reads back only its own spool; same agent id, sequences from the same clock
    srv = start(listen=address)
    flows = FlowExporter(fast_config(address, token=TOKEN, spool_dir=flow_spool))
    calls = calls_exporter(address, flow_spool / CALLS_SPOOL)
    assert (flows.stats().spool_batches, calls.stats().spool_batches) == (1, 1)
    flows.start()
    calls.start()
    assert flows.flush(10) and calls.flush(10)
    fs, cs = flows.close(), calls.close()
    assert (fs.sent_records, fs.duplicate_batches, cs.sent_records, cs.duplicate_batches) == (3, 0, 3, 0)
    assert sorted(c.cookie for c in stored_calls(address)) == [50, 51, 52]


def test_drops_are_counted_and_exported_as_metrics(tmp_dir: Path) -> None:  # noqa: F811
    exp = calls_exporter("127.0.0.1:9", None, max_queue_records=2)
    for i in range(5):
        exp.emit_call(make_call(conn_key=i), WEB, LLAMA, 1, "curl")
    st = exp.stats()
    assert (st.submitted, st.dropped_queue_full) == (2, 3)
    reg = CollectorRegistry()
    reg.register(ExportMetrics(exp.stats, "aimesh_model_call_export", "Model calls"))
    text = generate_latest(reg).decode()
    assert 'aimesh_model_call_export_records_total{outcome="dropped_queue_full"} 3.0' in text
    assert 'aimesh_model_call_export_records_total{outcome="submitted"} 2.0' in text
    exp.close(0)


def test_a_call_that_does_not_encode_is_counted_invalid(start, tmp_dir: Path) -> None:  # noqa: F811
    srv = start()
    exp = calls_exporter(str(srv.address), None)
    exp.start()
    exp.emit_call(make_call(conn_key="not-a-cookie"), WEB, LLAMA, 1, "curl")
    exp.emit_call(make_call(conn_key=7), WEB, LLAMA, 1, "curl")
    assert exp.flush(10)
    st = exp.close()
    assert (st.sent_records, st.invalid_records) == (1, 1)
    assert [c.cookie for c in stored_calls(str(srv.address))] == [7]


# A child process that is the agent's model-call exporter: collector down, it emits calls in three drain turns
# (commit() after each), says so, and waits to be killed.
_EXPORTER_CHILD = """
import sys, time
from pathlib import Path
from tests.unit.test_export_calls import calls_exporter
from tests.unit.test_otlp import LLAMA, WEB, make_call
exp = calls_exporter(sys.argv[1], Path(sys.argv[2]), durable=True)
exp.start()
for turn in range(3):
    for i in range(10):
        exp.emit_call(make_call(conn_key=2000 + 10 * turn + i), WEB, LLAMA, 1, "curl")
    exp.commit()
print("committed", flush=True)
time.sleep(600)
"""


def spooled_cookies(spool: Path) -> list[int]:
    from agent.export.collector_client import CALLS, read_spool_file
    out: list[int] = []
    for path in sorted(spool.glob("*.batch")):
        try:
            out += [c.cookie for c in read_spool_file(path, CALLS)]
        except Exception:  # noqa: BLE001 - only whole (renamed after fsync) files count
            pass
    return out


def test_completed_calls_survive_a_kill9_of_the_exporter_and_arrive_once(start, tmp_dir: Path) -> None:  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    srv = start()
    address = str(srv.address)
    srv.stop(0)                                     # the collector is down while the calls complete
    spool = tmp_dir / "spool" / CALLS_SPOOL
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _EXPORTER_CHILD, address, str(spool)], cwd=root,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "committed"
        # on disk without a close(): group-committed (one batch per commit at most, not one file per call)
        assert wait_until(lambda: len(spooled_cookies(spool)) == 30), spooled_cookies(spool)
        assert 1 <= len(list(spool.glob("*.batch"))) <= 3
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    srv = start(listen=address)                     # the collector is back; a new agent on the same spool
    exp = calls_exporter(address, spool, durable=True)
    exp.start()
    assert exp.flush(15)
    st = exp.close()
    assert (st.sent_records, st.dropped) == (30, 0)
    assert sorted(c.cookie for c in stored_calls(address)) == list(range(2000, 2030))
    assert not list(spool.glob("*.batch"))


def test_durable_calls_are_sent_only_from_the_spool(start, tmp_dir: Path) -> None:  # noqa: F811
    srv = start()
    spool = tmp_dir / "spool" / CALLS_SPOOL
    exp = calls_exporter(str(srv.address), spool, durable=True, batch_max_records=4)
    exp.start()
    for i in range(10):                             # a batch's worth queued commits on its own
        exp.emit_call(make_call(conn_key=300 + i), WEB, LLAMA, 1, "curl")
    assert wait_until(lambda: exp.stats().sent_records >= 8)
    assert exp.stats().queued_records == 2          # the rest waits for the agent's commit()
    exp.commit()
    assert exp.flush(10)
    st = exp.close()
    assert (st.sent_records, st.dropped) == (10, 0)
    assert sorted(c.cookie for c in stored_calls(str(srv.address))) == list(range(300, 310))


def test_calls_not_yet_on_disk_count_against_the_queue(tmp_dir: Path) -> None:  # noqa: F811
    exp = calls_exporter("127.0.0.1:9", tmp_dir / CALLS_SPOOL, durable=True, max_queue_records=3)
    gate = __import__("threading").Event()
    exp._write_items_once = lambda items: gate.wait(10)   # type: ignore[method-assign]  # a disk that hangs
    exp.start()
    for i in range(5):
        exp.emit_call(make_call(conn_key=i), WEB, LLAMA, 1, "curl")
        exp.commit()
    st = exp.stats()
    assert (st.submitted, st.dropped_queue_full) == (3, 2)
    gate.set()
    exp.close(0)
