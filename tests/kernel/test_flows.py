"""Flow records from sock_ops and the cgroup_skb counters: one per connection side, bytes, duration, RTT.

Every record is client-relative: bytes_sent is what the client sent to the server, on the client's and on the
server's record alike (flow.proto FlowRecord.bytes_sent).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.kernel.harness import _enter_cgroup, free_port, run_client, start_server
from tests.kernel.netns import NetnsHost
from tests.kernel.test_enforce import base_config

FLOWLOAD = Path(__file__).resolve().parent / "flowload.py"
STREAMS = Path(__file__).resolve().parent / "streams.py"


def _spawn(cgroup, *args):
    return subprocess.Popen([sys.executable, str(FLOWLOAD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_enter_cgroup(cgroup))


def _flow_bytes(agent, source: str, direction: str) -> list[float]:
    """The aimesh_flow_bytes_total samples of one source identity and direction."""
    _, text = agent.get("/metrics")
    return [float(m.group(2)) for m in re.finditer(r"^aimesh_flow_bytes_total\{(.*)\} ([0-9.e+]+)$", text, re.M)
            if f'source="{source}"' in m.group(1) and f'direction="{direction}"' in m.group(1)]


def _records(agent, path: Path, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        sel = [r for r in recs if want(r)]
        if sel or time.monotonic() > deadline:
            return sel
        time.sleep(0.1)


def test_tcp_connection_record_both_sides(cgroups, agents, tmp_path):
    port = free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    rec_log = tmp_path / "records.jsonl"
    agent = agents(base_config(cgroups, port), ["--records-log", str(rec_log)])
    srv = _spawn(llama, "serve", "--port", str(port), "--reply", "54321")
    assert srv.stdout.readline()
    cli = _spawn(chat, "send", "--port", str(port), "--bytes", "100000")
    out, err = cli.communicate(timeout=30)
    assert json.loads(out)["received"] == 54321, err
    srv.communicate(timeout=30)
    recs = _records(agent, rec_log, lambda r: r["destination_port"] == port and not r["interim"])
    deadline = time.monotonic() + 5
    while len(recs) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        recs = _records(agent, rec_log, lambda r: r["destination_port"] == port and not r["interim"])
    assert len(recs) == 2, recs
    by_side = {("client" if r["hook"] == 1 else "server"): r for r in recs}
    c, s = by_side["client"], by_side["server"]
    for r in (c, s):
        assert (r["source"]["name"], r["destination"]["name"], r["destination"]["version"]) == ("chat", "llama", "3.1-8b")
        assert r["verdict"] == 1 and r["protocol"] == 6 and r["kind"] == 1
        assert r["duration_ns"] > 0 and r["srtt_us"] > 0
        assert r["source_port"] == c["source_port"] and r["destination_port"] == port
    # client-relative on both records: the client sent 100000 and got 54321 back
    assert (c["bytes_sent"], c["bytes_received"]) == (100000, 54321)
    assert (s["bytes_sent"], s["bytes_received"]) == (100000, 54321)
    # segments are swapped the same way (tests/unit/test_flow_records.py checks it exactly); the two sockets' counts
    # cannot be compared here: the SYN-ACK is sent by the listener's request socket, ACKs depend on timing
    assert all(r["packets_sent"] > 0 and r["packets_received"] > 0 for r in (c, s)), (c, s)
    assert _flow_bytes(agent, "chat", "sent") == [100000] and _flow_bytes(agent, "chat", "received") == [54321]
    assert c["pid"] > 0 and c["comm"].startswith("python")
    assert c["cookie"] != s["cookie"]
    srv.kill()


def test_remote_client_record_is_client_relative(cgroups, agents, tmp_path):
    """A client in another network namespace: only the server side is seen, and its record still says what the
    client sent (bytes_sent) and got back (bytes_received), in the record and in aimesh_flow_bytes_total."""
    host = NetnsHost()
    try:
        port = free_port()
        rec_log = tmp_path / "records.jsonl"
        cfg = base_config(cgroups, port)
        cfg["identities"].append({"name": "lab", "kind": "external", "endpoints": [f"{host.addrs[0]}/32"]})
        cfg["policies"].append({"from": "lab", "to": "llama", "ports": [port]})
        agent = agents(cfg, ["--records-log", str(rec_log)])
        srv = subprocess.Popen([sys.executable, str(STREAMS), "server", "--host", "0.0.0.0", "--port", str(port),
                                "--reply", "54321"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_enter_cgroup(cgroups.child("llama")))
        try:
            assert srv.stdout.readline()
            cli = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, str(STREAMS), "client", "--host",
                                  host.host_addr, "--port", str(port), "--bytes", "100000"],
                                 capture_output=True, text=True, timeout=60)
            client = json.loads(cli.stdout.splitlines()[-1])["connections"][0]
            assert client["received"] == 54321, cli.stderr
            srv.communicate(timeout=30)
        finally:
            srv.kill()
        recs = _records(agent, rec_log, lambda r: r["destination_port"] == port and not r["interim"])
        assert len(recs) == 1, recs   # the client is not on this host: the server's side only
        s = recs[0]
        assert s["hook"] == 3 and (s["source"]["name"], s["destination"]["name"]) == ("lab", "llama")
        assert (s["source_address"], s["destination_address"]) == (host.addrs[0], host.host_addr)
        assert (s["bytes_sent"], s["bytes_received"]) == (100000, 54321)
        assert s["packets_sent"] > 0 and s["packets_received"] > 0
        assert _flow_bytes(agent, "lab", "sent") == [100000] and _flow_bytes(agent, "lab", "received") == [54321]
    finally:
        host.remove()


def test_long_connection_reports_interim_records(cgroups, agents, tmp_path):
    port = free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    rec_log = tmp_path / "records.jsonl"
    cfg = base_config(cgroups, port, telemetry={"interim_interval": 0.5, "udp_window": 5})
    agent = agents(cfg, ["--records-log", str(rec_log)])
    srv = _spawn(llama, "serve", "--port", str(port), "--reply", "10")
    assert srv.stdout.readline()
    cli = _spawn(chat, "send", "--port", str(port), "--bytes", "200000", "--hold", "3")
    # while the client streams, interim records with the totals so far must appear before it closes
    interim = _records(agent, rec_log, lambda r: r["destination_port"] == port and r["interim"] and r["hook"] == 1,
                       timeout=5)
    assert cli.poll() is None, "the interim record came only after the connection closed"
    assert interim, "no interim record while the connection was open"
    assert all(0 < r["bytes_sent"] < 200000 for r in interim), interim
    cli.communicate(timeout=30)
    final = _records(agent, rec_log, lambda r: r["destination_port"] == port and not r["interim"] and r["hook"] == 1)
    assert final and final[0]["bytes_sent"] == 200000
    srv.kill()


def test_udp_aggregated_per_identity_pair(cgroups, agents, tmp_path):
    port = free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    rec_log = tmp_path / "records.jsonl"
    cfg = base_config(cgroups, port, telemetry={"interim_interval": 0, "udp_window": 0.5})
    agent = agents(cfg, ["--records-log", str(rec_log)])
    srv = start_server(llama, port, name="pong", udp=True)
    res = run_client(chat, port, udp=True, count=5)   # 5 sockets, 4-byte "ping", 4-byte "pong" answers
    assert res["ok"] == 5
    recs = _records(agent, rec_log, lambda r: r["kind"] == 2 and r["destination_port"] == port, timeout=5)
    time.sleep(1.2)  # a following window may still add what arrived late
    recs = _records(agent, rec_log, lambda r: r["kind"] == 2 and r["destination_port"] == port)
    assert {(r["source"]["name"], r["destination"]["name"]) for r in recs} == {("chat", "llama")}
    assert sum(r["bytes_sent"] for r in recs) == 5 * 4
    assert sum(r["bytes_received"] for r in recs) == 5 * 4
    assert sum(r["packets_sent"] for r in recs) == 5
    srv.popen.kill()
