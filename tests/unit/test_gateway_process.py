"""The gateway as its own process (`python -m agent.gateway`), kept by GatewaySupervisor: SIGHUP on a policy change
takes effect for new requests while an open stream goes on; restarts with back-off; the cgroup it is spawned into;
and the agent's end of the record socket."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from agent.gateway.policy import GatewayPolicy
from agent.gateway.records import GatewayRecordReceiver, RecordSender
from agent.gateway.supervisor import GatewaySupervisor
from tests.unit.test_gateway_server import MSG, GatedUpstream

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _policy(port: int, models: list[str]) -> str:
    return GatewayPolicy.from_config_dict({
        "identities": [{"name": "openai", "endpoints": [f"127.0.0.1:{port}"], "llm": {"protocol": "openai"}}],
        "policies": [{"from": "chat", "to": "openai", "models": models}]}).to_json()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)        # a new inode: the supervisor sees the change even within one mtime tick


def _until(cond, what: str, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_changes_policy_for_new_requests_without_dropping_an_open_stream(tmp_path):
    with GatedUpstream() as up:
        pol = tmp_path / "gateway-policy.json"
        _write(pol, _policy(up.port, ["gpt-4o"]))
        (tmp_path / "origins.json").write_text(json.dumps([{"peer_ip": "127.0.0.1", "peer_port": 0,
                                                            "address": "127.0.0.1", "port": up.port,
                                                            "source": "chat", "destination": "openai"}]))
        recv = GatewayRecordReceiver(tmp_path / "rec.sock")
        gport = _free_port()
        argv = [sys.executable, "-m", "agent.gateway", "--policy", str(pol), "--listen", f"127.0.0.1:{gport}",
                "--origins-file", str(tmp_path / "origins.json"), "--records", str(tmp_path / "rec.sock")]
        sup = GatewaySupervisor(argv, pol, env={**os.environ, "PYTHONPATH": str(ROOT)})
        sup.poll()
        try:
            url = f"http://127.0.0.1:{gport}/v1/chat/completions"
            _until(lambda: _connects(gport), "the gateway to listen")
            body = {"model": "gpt-4o", "messages": MSG, "stream": True}
            got: list[bytes] = []
            first = threading.Event()

            def stream() -> None:
                with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as r:
                    for chunk in r.iter_raw():
                        got.append(chunk)
                        first.set()
            t = threading.Thread(target=stream)
            t.start()
            assert first.wait(15)
            _write(pol, _policy(up.port, ["gpt-4o-mini"]))
            sup.poll()
            assert sup.counters.reloads == 1
            with httpx.Client(timeout=30) as c:
                _until(lambda: c.post(url, json={"model": "gpt-4o", "messages": MSG}).status_code == 403,
                       "the reloaded policy to refuse gpt-4o")
                up.release.set()
                t.join(15)
                data = b"".join(got)
                assert b'"first"' in data and b'" rest"' in data and data.rstrip().endswith(b"data: [DONE]")
                assert c.post(url, json={"model": "gpt-4o-mini", "messages": MSG}).status_code == 200
            recs = _until(lambda: _acc(recv, "gpt-4o-mini"), "the records")
            stream_rec = next(r for r in recs if r.get("stream"))
            assert stream_rec["decision"] == "served" and stream_rec["incomplete"] is False
            assert any(r["decision"] == "refused" and r["reason"] == "model_not_allowed" for r in recs)
            assert sup.counters.restarts == 0 and sup.alive()
        finally:
            sup.close()
            recv.close()
        assert not sup.alive()


_acc_store: dict[int, list[dict]] = {}


def _acc(recv: GatewayRecordReceiver, last_model: str) -> list[dict] | None:
    """The records so far, once the one for `last_model` is among them."""
    out = _acc_store.setdefault(id(recv), [])
    out += recv.drain()
    return out if any(r.get("request_model") == last_model for r in out) else None


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def cgroup_dir():
    base = Path("/sys/fs/cgroup/unified")
    d = base / f"aimesh-gwp-test-{os.getpid()}"
    try:
        d.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {base}: {e}")
    yield d
    for _ in range(200):
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    d.rmdir()


def test_supervisor_spawns_into_cgroup_restarts_with_backoff_and_stops(tmp_path, cgroup_dir):
    pol = tmp_path / "p.json"
    pol.write_text("{}")
    now = [100.0]
    sup = GatewaySupervisor([sys.executable, "-c", "import time; time.sleep(120)"], pol, cgroup_dir,
                            clock=lambda: now[0], min_backoff_s=1.0, max_backoff_s=8.0)
    try:
        sup.poll()
        pid = sup.counters.pid
        assert pid is not None
        _until(lambda: str(pid) in (cgroup_dir / "cgroup.procs").read_text().split(), "the child in the cgroup")
        os.kill(pid, signal.SIGKILL)
        _until(lambda: not sup.alive(), "the child to die")
        sup.poll()
        assert sup.counters.restarts == 1 and sup.counters.pid is None       # waiting out the back-off
        now[0] += 0.5
        sup.poll()
        assert sup.counters.pid is None
        now[0] += 2.0
        sup.poll()
        pid2 = sup.counters.pid
        assert pid2 not in (None, pid) and sup.counters.starts == 2
        _until(lambda: str(pid2) in (cgroup_dir / "cgroup.procs").read_text().split(), "the new child in the cgroup")
    finally:
        sup.close()
    assert not sup.alive()
    _until(lambda: (cgroup_dir / "cgroup.procs").read_text().strip() == "", "the cgroup to empty")


def test_record_receiver_is_bounded_and_counts_losses(tmp_path):
    recv = GatewayRecordReceiver(tmp_path / "r.sock", max_per_drain=3)
    send = RecordSender(tmp_path / "r.sock")
    try:
        for i in range(5):
            send.send({"n": i})
        send.seq += 2                                    # two records lost on the way
        send.send({"n": 5})
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.sendto(b"not json", str(tmp_path / "r.sock"))
        raw.close()
        assert [r["n"] for r in recv.drain()] == [0, 1, 2]
        assert [r["n"] for r in recv.drain()] == [3, 4, 5]
        assert recv.drain() == [] and recv.dropped == 3 and recv.received == 6
        # more than the kernel queues (net.unix.max_dgram_qlen): the rest waits in the sender's backlog
        for i in range(50):
            send.send({"n": i})
        assert send.backlog > 0 and send.dropped == 0
        got = recv.drain() + recv.drain()
        send.send({"n": 50})                             # no loop attached: the next send flushes
        assert len(got) >= 3
    finally:
        send.close()
        recv.close()
    lost = RecordSender(tmp_path / "nobody.sock")
    lost.send({"n": 0})
    assert lost.dropped == 1
