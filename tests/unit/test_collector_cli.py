"""The `collector` and `flows` commands, and the unit parsing/printing they use."""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import grpc
import pytest

from tests.unit.collector_testlib import (  # tmp_dir: a fixture
    REPO,
    batch,
    record,
    refusing_port,
    start_collector_process,
    stub_for,
    tmp_dir,  # noqa: F401
)
from agent._gen.aimesh.v1 import flow_pb2
from agent.collector.cli import add_commands, flow_cells, parse_identity, run_flows
from agent.collector.server import CollectorConfig, CollectorServer
from agent.collector.units import (
    format_bytes,
    format_duration_ns,
    format_time_ns,
    parse_duration_ns,
    parse_size,
    parse_time_ns,
)

T = 1_764_255_182_123_000_000  # 2025-11-27 14:53:02.123 UTC


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aimesh")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def identity(name: str, version: str = "", kind: str = "") -> flow_pb2.Identity:
    return flow_pb2.Identity(name=name, version=version, kind=kind)


RECORDS = [
    record(1, start_time_unix_nano=T - 1_500_000_000, end_time_unix_nano=T, source=identity("chat-ui", "v1", "agent"),
           destination=identity("llm", "v1", "model"), actual_destination=identity("llm", "v2", "model"),
           verdict=flow_pb2.VERDICT_REDIRECTED, redirected=True, lifecycle=True, deprecated=True,
           bytes_sent=1024, bytes_received=2048, duration_ns=1_500_000_000, srtt_us=250, comm="python3",
           source_address="10.0.0.1", dialed_address="10.0.0.9", dialed_port=8000),
    record(2, start_time_unix_nano=T + 1_000_000, end_time_unix_nano=T + 1_000_000, kind=flow_pb2.RECORD_KIND_DECISION,
           source=identity("chat-ui", "v1"), destination=identity("vector-db"),
           actual_destination=identity("vector-db"),
           verdict=flow_pb2.VERDICT_DENIED, reason=flow_pb2.REASON_NO_POLICY_SRC),
    record(3, start_time_unix_nano=T + 2_000_000, end_time_unix_nano=T + 3_000_000, source=identity("batch", "v3"),
           destination=flow_pb2.Identity(), destination_address="2001:db8::5", dialed_address="2001:db8::5",
           dialed_port=53, protocol=flow_pb2.PROTOCOL_UDP, verdict=flow_pb2.VERDICT_AUDIT,
           reason=flow_pb2.REASON_NO_POLICY_SRC, bytes_sent=80, bytes_received=0, duration_ns=1_000_000),
]  # fmt: skip


@pytest.fixture
def server(tmp_dir: Path) -> Iterator[CollectorServer]:
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token="tk", grace_s=0.2))
    srv.start()
    ch, stub = stub_for(str(srv.address))
    with ch:
        stub.Push(batch("node-a", 1, RECORDS), metadata=(("authorization", "Bearer tk"),), timeout=5)
    yield srv
    srv.stop(0)


def flows(argv: list[str], tz: timezone | None = timezone.utc) -> tuple[int, str]:
    args = parser().parse_args(["flows", *argv])
    out = io.StringIO()
    return run_flows(args, out=out, tz=tz), out.getvalue()


# --- units --------------------------------------------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration_ns("90s") == 90 * 10**9
    assert parse_duration_ns("1h30m") == 5400 * 10**9
    assert parse_duration_ns("7d") == 7 * 86400 * 10**9
    assert parse_duration_ns("250ms") == 250 * 10**6
    assert parse_duration_ns("1.5s") == 1_500_000_000
    assert parse_duration_ns("30") == 30 * 10**9
    assert parse_duration_ns("0") == 0
    for bad in ("", "5x", "m5", "1h 30m", "-5s", "5s3"):
        with pytest.raises(ValueError):
            parse_duration_ns(bad)


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64k") == 64 * 1024
    assert parse_size("64KiB") == 64 * 1024
    assert parse_size("500MiB") == 500 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1G") == 1 << 30
    assert parse_size("1GB") == 10**9
    assert parse_size("1.5 KB") == 1500
    for bad in ("", "lots", "-1", "1XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_times() -> None:
    now = 1_000 * 10**9
    assert parse_time_ns("5m", now) == now - 300 * 10**9
    assert parse_time_ns("2025-11-27T14:53:02Z", now) == 1_764_255_182 * 10**9
    assert parse_time_ns("2025-11-27T14:53:02.5+00:00", now) == 1_764_255_182_500_000_000
    with pytest.raises(ValueError, match="neither a duration"):
        parse_time_ns("yesterday", now)


def test_formatting() -> None:
    assert format_time_ns(T, timezone.utc) == "Nov 27 14:53:02.123"
    assert format_duration_ns(850) == "850ns"
    assert format_duration_ns(250_000) == "250us"
    assert format_duration_ns(4_560_000) == "4.56ms"
    assert format_duration_ns(1_500_000_000) == "1.500s"
    assert format_duration_ns(185 * 10**9) == "3m05s"
    assert format_duration_ns(7260 * 10**9) == "2h01m"
    assert format_bytes(1023) == "1023B"
    assert format_bytes(1024) == "1.0KiB"
    assert format_bytes(5 << 30) == "5.0GiB"


def test_identity_specs() -> None:
    assert parse_identity("llm") == ("llm", "", "")
    assert parse_identity("llm@v2") == ("llm", "", "v2")
    assert parse_identity("model/llm@v2") == ("llm", "model", "v2")
    assert parse_identity("model/") == ("", "model", "")


def test_flow_cells() -> None:
    cells = flow_cells(RECORDS[0], timezone.utc)
    assert cells == ["Nov 27 14:53:02.123", "chat-ui(v1)", "->", "llm(v1) => llm(v2)", "REDIRECTED",
                     "1.0KiB/2.0KiB", "1.500s", "250us", "deprecated lifecycle"]  # fmt: skip
    denied = flow_cells(RECORDS[1], timezone.utc)
    assert denied[3:6] == ["vector-db", "DENIED", "-"] and denied[-1] == "no-policy-src"
    audit = flow_cells(RECORDS[2], timezone.utc)
    assert audit[1] == "batch(v3)" and audit[3] == "[2001:db8::5]:53" and audit[-1] == "udp no-policy-src"
    unknown = flow_cells(flow_pb2.FlowRecord(verdict=9), timezone.utc)  # type: ignore[arg-type]
    assert unknown[0] == "-" and unknown[4] == "VERDICT(9)"


# --- flows --------------------------------------------------------------------------------------------------------


def test_flows_table(server: CollectorServer) -> None:
    rc, out = flows(["--collector", str(server.address), "--token", "tk"])
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "SOURCE", "DESTINATION", "VERDICT", "BYTES(TX/RX)", "DURATION", "RTT", "INFO"]
    assert len(lines) == 4
    assert lines[1].startswith("Nov 27 14:53:02.123  chat-ui(v1)  ->  llm(v1) => llm(v2)")
    assert "REDIRECTED" in lines[1] and "1.0KiB/2.0KiB" in lines[1] and "250us" in lines[1]
    assert "DENIED" in lines[2] and "no-policy-src" in lines[2]
    # columns line up
    col = lines[0].index("VERDICT")
    assert all(line[col:].split()[0] in ("VERDICT", "REDIRECTED", "DENIED", "AUDIT") for line in lines)


def test_flows_filters(server: CollectorServer) -> None:
    base = ["--collector", str(server.address), "--token", "tk", "-o", "json"]

    def cookies(*extra: str) -> list[int]:
        rc, out = flows([*base, *extra])
        assert rc == 0
        return [int(json.loads(line)["cookie"]) for line in out.splitlines()]

    assert cookies() == [1, 2, 3]
    assert cookies("--limit", "1") == [3]
    assert cookies("--from", "chat-ui") == [1, 2]
    assert cookies("--to", "llm@v2") == [1]
    assert cookies("--to", "model/llm") == [1]
    assert cookies("--verdict", "denied,audit") == [2, 3]
    assert cookies("--verdict", "denied", "--verdict", "redirected") == [1, 2]
    assert cookies("--since", "2025-11-27T14:53:02.124Z") == [2, 3]
    assert cookies("--until", "2025-11-27T14:53:02.124Z") == [1]
    assert cookies("--since", "1h") == []  # these records are from 2025


def test_flows_json(server: CollectorServer) -> None:
    rc, out = flows(["--collector", str(server.address), "--token", "tk", "-o", "json", "--verdict", "redirected"])
    assert rc == 0
    (line,) = out.splitlines()
    obj = json.loads(line)
    assert obj["agent_id"] == "node-a" and obj["verdict"] == "redirected"
    assert obj["source"] == {"name": "chat-ui", "kind": "agent", "version": "v1"}
    assert obj["actual_destination"]["version"] == "v2"
    assert obj["bytes_sent"] == "1024" and obj["srtt_us"] == 250  # the proto3 JSON mapping (64-bit as strings)
    assert obj["lifecycle"] is True


def test_aggregated_denials_show_their_count(server: CollectorServer) -> None:
    """An aggregate of 4123 denied connects: stored with its count, INFO `x4123`, JSON a number; 0 or 1 shows nothing."""
    agg = record(4, start_time_unix_nano=T + 5_000_000, end_time_unix_nano=T + 905_000_000,
                 kind=flow_pb2.RECORD_KIND_DECISION, source=identity("hostile"), destination=identity("vector-db"),
                 verdict=flow_pb2.VERDICT_DENIED, reason=flow_pb2.REASON_NO_POLICY_SRC, dialed_port=6333,
                 pid=4242, comm="flood", count=4123)  # fmt: skip
    ch, stub = stub_for(str(server.address))
    with ch:
        stub.Push(batch("node-a", 2, [agg]), metadata=(("authorization", "Bearer tk"),), timeout=5)
    rc, out = flows(["--collector", str(server.address), "--token", "tk", "--from", "hostile"])
    assert rc == 0
    (row,) = out.splitlines()[1:]
    assert row.split()[-2:] == ["no-policy-src", "x4123"]
    rc, out = flows(["--collector", str(server.address), "--token", "tk", "-o", "json", "--from", "hostile"])
    obj = json.loads(out)
    assert obj["count"] == 4123 and (obj["pid"], obj["comm"]) == (4242, "flood")
    rc, out = flows(["--collector", str(server.address), "--token", "tk", "-o", "json", "--verdict", "denied",
                     "--from", "chat-ui"])  # fmt: skip
    assert "count" not in json.loads(out)
    assert "x1" not in flow_cells(record(5, count=1), timezone.utc)[-1]


def test_flows_through_the_aimesh_parser(server: CollectorServer, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import build_parser

    args = build_parser().parse_args(["flows", "--collector", str(server.address), "--token", "tk", "-o", "json"])
    assert args.func(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_flows_errors(server: CollectorServer, tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addr = str(server.address)

    def run(*argv: str) -> tuple[int, str]:
        args = parser().parse_args(["flows", *argv])
        rc = args.func(args)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        return rc, err

    rc, err = run("--collector", addr)
    assert rc == 1 and "refused the credentials" in err and "missing bearer token" in err
    rc, err = run("--collector", addr, "--token", "bad")
    assert rc == 1 and "invalid bearer token" in err
    with refusing_port() as port:
        rc, err = run("--collector", f"127.0.0.1:{port}")
    assert rc == 1 and f"cannot reach the collector at 127.0.0.1:{port}" in err
    rc, err = run("--collector", addr, "--token-file", str(tmp_dir / "none"))
    assert rc == 2 and "cannot read token file" in err
    rc, err = run("--collector", addr, "--since", "someday")
    assert rc == 2 and "--since" in err
    rc, err = run("--collector", "[::1:5")
    assert rc == 2 and "--collector" in err
    rc, err = run("--collector", addr, "--tls-cert", "c.pem")
    assert rc == 2 and "--tls-cert and --tls-key" in err


def test_flows_follow_until_interrupted(server: CollectorServer, tmp_dir: Path) -> None:
    addr = str(server.address)
    (tmp_dir / "token").write_text("tk\n")
    # --limit 1: the record pushed below is shown once whether it lands before or after the stream starts.
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.collector", "flows", "--collector", addr, "--token-file", str(tmp_dir / "token"),
         "--follow", "--from", "late", "--limit", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True)
    reader.start()
    try:
        assert lines.get(timeout=15).split()[0] == "TIME"  # the header comes first
        ch, stub = stub_for(addr)
        with ch:
            late = record(7, source=identity("late", "v9"), destination=identity("llm", "v1"))
            stub.Push(batch("node-a", 2, [late]), metadata=(("authorization", "Bearer tk"),), timeout=5)
        line = lines.get(timeout=15)
        assert "late(v9)" in line and "llm(v1)" in line and "ALLOWED" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
        reader.join(5)
        assert lines.empty()  # printed once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


# --- collector ----------------------------------------------------------------------------------------------------


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value  # type: ignore[return-value]


def test_collector_command_serves_until_sigterm(tmp_dir: Path) -> None:
    db = tmp_dir / "f.db"
    proc = start_collector_process(db, tmp_dir / "c.log", "127.0.0.1:0", "--retention-age", "1d",
                                   "--retention-bytes", "10MiB", "--max-batch-records", "100", auth=())  # fmt: skip
    try:
        token_file = tmp_dir / "f.db.token"  # the default: a token file beside the database, created 0600
        assert token_file.stat().st_mode & 0o777 == 0o600
        ch, stub = stub_for(proc.address)
        with ch:
            err = rpc_error(lambda: stub.Push(batch("a", 1, [record(1)]), timeout=5))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        ch, stub = stub_for(proc.address, token=token_file.read_text().strip())
        with ch:
            assert stub.Push(batch("a", 1, [record(1)]), timeout=5).accepted == 1
        assert proc.terminate() == 0
        log = proc.log.read_text()
        assert "listening on 127.0.0.1:" in log and "plaintext" in log and "Traceback" not in log
        assert f"created token file {token_file}" in log
        assert "collector stopped" in log
    finally:
        proc.kill()


def test_collector_command_errors(tmp_dir: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.collector", "collector", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    with socket.create_server(("127.0.0.1", 0)) as listener:  # a port another program listens on
        port = listener.getsockname()[1]
        busy = run("--listen", f"127.0.0.1:{port}", "--db", str(tmp_dir / "f.db"))
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1:" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and "Traceback" not in busy.stderr
    bad_db = run("--listen", "127.0.0.1:0", "--db", str(tmp_dir / "notadir" / "x" / "f.db"), "--retention-age", "5x")
    assert bad_db.returncode == 2 and "--retention-age" in bad_db.stderr
    (tmp_dir / "garbage.db").write_bytes(b"not sqlite" * 100)
    garbage = run("--listen", "127.0.0.1:0", "--db", str(tmp_dir / "garbage.db"))
    assert garbage.returncode == 1 and "cannot open flow database" in garbage.stderr
    assert len(garbage.stderr.strip().splitlines()) == 1
    mtls_no_cert = run("--db", str(tmp_dir / "f.db"), "--tls-ca", "ca.pem")
    assert mtls_no_cert.returncode == 2 and "--tls-ca" in mtls_no_cert.stderr


def test_collector_token_file_is_created_and_read_by_flows(tmp_dir: Path) -> None:
    token_file = tmp_dir / "secrets" / "collector.token"
    proc = start_collector_process(tmp_dir / "f.db", tmp_dir / "c.log", auth=("--token-file", str(token_file)))
    try:
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert not (tmp_dir / "f.db.token").exists()  # the named file, not the default
        ch, stub = stub_for(proc.address, token=token_file.read_text().strip())
        with ch:
            stub.Push(batch("a", 1, [record(1)]), timeout=5)
        rc, out = flows(["--collector", proc.address, "--token-file", str(token_file), "-o", "json"])
        assert rc == 0 and [json.loads(x)["cookie"] for x in out.splitlines()] == ["1"]
        assert "bearer token from" in proc.log.read_text()
    finally:
        proc.kill()


def test_collector_no_auth_is_loud(tmp_dir: Path) -> None:
    proc = start_collector_process(tmp_dir / "f.db", tmp_dir / "c.log", auth=("--no-auth",))
    try:
        rc, _ = flows(["--collector", proc.address])
        assert rc == 0
        log = proc.log.read_text()
        assert "WARNING" in log and "--no-auth" in log and "no authentication" in log
        assert not (tmp_dir / "f.db.token").exists()
    finally:
        proc.kill()
    both = subprocess.run([sys.executable, "-m", "agent.collector", "collector", "--db", str(tmp_dir / "g.db"),
                           "--no-auth", "--token", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_flow_cells_escape_control_characters() -> None:
    rec = flow_pb2.FlowRecord(comm="\x1b[2J", source=flow_pb2.Identity(name="ui\x07"), verdict=1)
    cells = flow_cells(rec, timezone.utc)
    assert all(c.isprintable() for c in cells)
    assert "ui\\x07" in cells[1]


def test_a_records_kubernetes_workload_is_stored_and_printed(server: CollectorServer) -> None:
    """namespace, pod, container and service account of a local end travel in aimesh.v1.Identity: stored with the
    record, and `aimesh flows -o json` prints them."""
    src = flow_pb2.Identity(name="chat", kind="service", namespace="shop", pod="chat-7d9c8b6f5d-x2k4q",
                            container="app", service_account="chat")
    rec = record(6, start_time_unix_nano=T, end_time_unix_nano=T + 1, source=src, destination=identity("llama"),
                 verdict=flow_pb2.VERDICT_ALLOWED)
    ch, stub = stub_for(str(server.address))
    with ch:
        stub.Push(batch("node-a", 3, [rec]), metadata=(("authorization", "Bearer tk"),), timeout=5)
    rc, out = flows(["--collector", str(server.address), "--token", "tk", "-o", "json", "--from", "chat"])
    assert rc == 0
    obj = json.loads(out)
    assert obj["source"] == {"name": "chat", "kind": "service", "namespace": "shop", "pod": "chat-7d9c8b6f5d-x2k4q",
                             "container": "app", "service_account": "chat"}
    assert obj["destination"] == {"name": "llama"}
