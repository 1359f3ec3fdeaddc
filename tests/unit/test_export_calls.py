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
