"""Least exposure: the files the agent writes are private whatever the umask, the metrics server listens on
loopback by default, and its probes tell liveness from readiness (real HTTP requests on an ephemeral port)."""
from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.cli import build_parser
from agent.errors import AgentError
from agent.export.collector_client import ConfigError, SealedBatch, Spool
from agent.export.http import MetricsServer
from agent.flows.log import FlowLog


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# ---- files ----

@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_flow_log_is_created_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    target = tmp_path / "logs" / "flows.jsonl"
    with umask(mask):
        log = FlowLog(str(target))
    log.write({"a": 1})
    log.close()
    assert mode(target) == 0o600
    assert mode(target.parent) == 0o700
    assert target.read_text() == '{"a":1}\n'


def test_an_existing_wider_flow_log_is_narrowed_and_appended(tmp_path: Path, caplog) -> None:
    target = tmp_path / "records.jsonl"
    target.write_text('{"old":1}\n')
    target.chmod(0o644)
    log = FlowLog(str(target), what="--records-log")
    log.write({"new": 2})
    log.close()
    assert mode(target) == 0o600
    assert target.read_text().splitlines() == ['{"old":1}', '{"new":2}']
    assert "--records-log" in caplog.text and "0644" in caplog.text


def test_flow_log_refuses_a_symlink_and_leaves_devices_alone(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    elsewhere.chmod(0o644)
    link = tmp_path / "flows.jsonl"
    link.symlink_to(elsewhere)
    with pytest.raises(AgentError, match="flow log .*flows.jsonl: cannot open for writing \\(it is a symlink\\)"):
        FlowLog(str(link))
    assert mode(elsewhere) == 0o644
    before = mode(Path("/dev/null"))
    FlowLog("/dev/null").close()
    assert mode(Path("/dev/null")) == before


def test_flow_log_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AgentError) as e:
        FlowLog(str(tmp_path / "file" / "flows.jsonl"))
    assert "\n" not in str(e.value) and "flows.jsonl" in str(e.value)


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_spool_directory_and_files_are_private(tmp_path: Path, mask: int) -> None:
    d = tmp_path / "spool"
    with umask(mask):
        spool = Spool(d, 1 << 20)
        assert spool.put(SealedBatch(7, b"x" * 10, 1))
    assert mode(d) == 0o700
    assert [(p.name, mode(p)) for p in d.iterdir()] == [(f"{7:020d}.1.batch", 0o600)]


def test_a_wider_spool_is_narrowed_on_open(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    old = d / f"{3:020d}.batch"
    old.write_bytes(b"y" * 5)
    old.chmod(0o644)
    spool = Spool(d, 1 << 20)
    assert (mode(d), mode(old), len(spool)) == (0o700, 0o600, 1)


def test_a_shared_directory_is_refused_as_a_spool(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    with pytest.raises(ConfigError, match="spool directory .*shared.* is shared \\(mode 1777\\)"):
        Spool(d, 1 << 20)
    assert mode(d) == 0o1777


# ---- listen address ----

def test_metrics_listen_on_loopback_by_default() -> None:
    args = build_parser().parse_args(["agent", "--config", "c.yaml"])
    assert args.metrics_addr == "127.0.0.1:9464"
    assert build_parser().parse_args(["agent", "--config", "c", "--metrics-addr", "0.0.0.0:1"]).metrics_addr \
        == "0.0.0.0:1"


# ---- probes ----

class State:
    def __init__(self) -> None:
        self.ready = False
        self.health: tuple[bool, list[str]] = (True, [])
        self.age = float("inf")


@contextmanager
def server(healthy: Callable[[], bool], **kw) -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("aimesh_test_things", "things", registry=registry).inc(3)
    s = MetricsServer("127.0.0.1:0", registry, healthy, **kw)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def get(s: MetricsServer, path: str) -> tuple[int, str, Optional[dict]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{s.port}{path}", timeout=5) as r:
            code, body, ctype = r.status, r.read().decode(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        code, body, ctype = e.code, e.read().decode(), e.headers["Content-Type"]
    return code, body, json.loads(body) if ctype == "application/json" else None


def test_readiness_liveness_and_degraded() -> None:
    st = State()
    with server(lambda: st.ready, health=lambda: st.health, loop_age_s=lambda: st.age, live_bound_s=5) as s:
        # starting: not ready, not live (the loop has not ticked)
        assert get(s, "/readyz")[::2] == (503, {"status": "not ready",
                                                "reasons": ["datapath not in force (starting or stopping)"]})
        assert get(s, "/livez")[::2] == (503, {"status": "stalled", "reasons": ["main loop not running"]})

        st.ready, st.age = True, 0.3
        for path in ("/readyz", "/healthz", "/livez"):
            assert get(s, path)[::2] == (200, {"status": "ok"}), path

        st.health = (False, ["map cgroup_identity full", "cgroup root /sys/fs/cgroup/x vanished"])
        degraded = {"status": "degraded", "reasons": ["map cgroup_identity full", "cgroup root /sys/fs/cgroup/x vanished"]}
        assert get(s, "/readyz")[::2] == (503, degraded)
        assert get(s, "/healthz")[::2] == (503, degraded)
        assert get(s, "/livez")[0] == 200            # degraded is not dead: no restart

        st.health, st.age = (True, []), 12.0
        code, _, body = get(s, "/livez")
        assert code == 503 and body == {"status": "stalled", "reasons": ["main loop last ticked 12.0 s ago (bound 5 s)"]}
        assert get(s, "/readyz")[0] == 200

        code, text, _ = get(s, "/metrics")
        assert code == 200 and "aimesh_test_things_total 3.0" in text
        assert get(s, "/nope")[::2] == (404, {"status": "not found"})


def test_a_failing_callable_answers_503_with_its_error() -> None:
    def boom() -> tuple[bool, list[str]]:
        raise KeyError("cgroup_identity")

    with server(lambda: True, health=boom, loop_age_s=lambda: 1 / 0) as s:
        code, _, body = get(s, "/readyz")
        assert code == 503 and body["status"] == "degraded" and "KeyError" in body["reasons"][0]
        code, _, body = get(s, "/livez")
        assert code == 503 and "ZeroDivisionError" in body["reasons"][0]


def test_old_signature_still_works() -> None:
    """MetricsServer(addr, registry, healthy): /healthz and /readyz follow healthy(); /livez answers while it serves."""
    ready = [False]
    with server(lambda: ready[0]) as s:
        assert get(s, "/healthz")[0] == 503 and get(s, "/livez")[0] == 200
        ready[0] = True
        assert get(s, "/healthz")[::2] == (200, {"status": "ok"}) and get(s, "/readyz")[0] == 200


def test_live_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="live_bound_s"):
        MetricsServer("127.0.0.1:0", CollectorRegistry(), lambda: True, live_bound_s=0)
