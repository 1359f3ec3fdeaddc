"""The same-node fast path (sockhash + sk_msg): byte streams are exactly what they are without it, the loopback
stack is skipped, flow records still count the bytes, and what cannot use it falls back and is counted."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import _enter_cgroup, free_port
from tests.kernel.netns import NetnsHost
from tests.kernel.streams import digest
from tests.kernel.test_enforce import base_config

STREAMS = Path(__file__).resolve().parent / "streams.py"


def _spawn(cgroup, *args, netns=None):
    cmd = [sys.executable, str(STREAMS), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_enter_cgroup(cgroup))


def _last_json(p: subprocess.Popen, timeout=120) -> dict:
    out, err = p.communicate(timeout=timeout)
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert lines, f"no output; stderr: {err}"
    return json.loads(lines[-1])


def _metric(agent, name: str, labels: str = "") -> float:
    _, text = agent.get("/metrics")
    m = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _exchange(cg, host, port, nbytes, reply, connections=1, parallel=False, exit_after=0):
    srv = _spawn(cg.child("llama"), "server", "--host", host, "--port", str(port), "--connections", str(connections),
                 "--reply", str(reply), *(["--exit-after", str(exit_after)] if exit_after else []))
    assert srv.stdout.readline()
    cli = _spawn(cg.child("chat"), "client", "--host", host, "--port", str(port), "--bytes", str(nbytes),
                 "--connections", str(connections), *(["--parallel"] if parallel else []))
    c = _last_json(cli)
    if exit_after:
        srv.wait(30)
        return c, None
    return c, _last_json(srv)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fastpath", "normal"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_large_transfer_both_ways_is_byte_exact(cgroups, agents, tmp_path, fast_path, host):
    port = free_port()
    records = tmp_path / "records.jsonl"
    cfg = base_config(cgroups, port, fast_path=fast_path)
    agent = agents(cfg, ["--records-log", str(records)])
    nbytes, reply = 8 << 20, 3 << 20
    srv_host = "::" if host.startswith("::ffff:") else host
    srv = _spawn(cgroups.child("llama"), "server", "--host", srv_host, "--port", str(port), "--reply", str(reply))
    assert srv.stdout.readline()
    cli = _spawn(cgroups.child("chat"), "client", "--host", host, "--port", str(port), "--bytes", str(nbytes))
    client, server = _last_json(cli)["connections"][0], _last_json(srv)["connections"][0]
    # the streams, end to end
    assert server["received"] == nbytes and server["sha256"] == client["sent_sha256"]
    assert client["received"] == reply and client["sha256"] == digest(7, reply)
    assert not {"send_error", "recv_error", "connect_error"} & set(client)
    messages = _metric(agent, "aimesh_fastpath_messages_total")
    if fast_path:
        assert messages > 0 and _metric(agent, "aimesh_fastpath_sockets_total") == 2
        assert _metric(agent, "aimesh_fastpath_bytes_total") == nbytes + reply
    else:
        assert messages == 0 and _metric(agent, "aimesh_fastpath_sockets_total") == 0
    # the flow records count what went either way
    import time
    deadline = time.monotonic() + 5
    recs = []
    while time.monotonic() < deadline and len(recs) < 2:
        recs = [json.loads(x) for x in records.read_text().splitlines()
                if json.loads(x)["destination_port"] == port and not json.loads(x)["interim"]] \
            if records.exists() else []
        time.sleep(0.1)
    sides = {r["hook"]: r for r in recs}
    assert (sides[1]["bytes_sent"], sides[1]["bytes_received"]) == (nbytes, reply)
    assert (sides[3]["bytes_sent"], sides[3]["bytes_received"]) == (nbytes, reply)   # client-relative on both sides
    assert sides[1]["source"]["name"] == "chat" and sides[1]["destination"]["name"] == "llama"
    # segments on the wire (client-relative, like the bytes): the handshake and the close on the fast path; the data
    # otherwise
    # (per socket, so other traffic on the machine does not blur it)
    if fast_path:
        assert sides[1]["packets_sent"] < 10 and sides[3]["packets_sent"] < 10, sides
    else:
        assert sides[1]["packets_sent"] > 100, sides


@pytest.mark.parametrize("fast_path", [True, False], ids=["fastpath", "normal"])
def test_many_concurrent_connections(cgroups, agents, fast_path):
    port = free_port()
    agents(base_config(cgroups, port, fast_path=fast_path))
    n = 40
    client, server = _exchange(cgroups, "127.0.0.1", port, 256 << 10, 64 << 10, connections=n, parallel=True)
    assert len(client["connections"]) == n and len(server["connections"]) == n
    got = sorted(c["sha256"] for c in server["connections"])
    assert got == sorted(c["sent_sha256"] for c in client["connections"])
    assert all(c["received"] == 64 << 10 and c["sha256"] == digest(7, 64 << 10) for c in client["connections"])


def test_peer_exit_mid_stream_behaves_as_without_fast_path(cgroups, agents, tmp_path):
    """The server dies after 1 MB of a 16 MB upload: the client sees the same kind of end with and without."""
    outcomes = {}
    for fast_path in (False, True):
        port = free_port()
        agent = agents(base_config(cgroups, port, fast_path=fast_path))
        client, _ = _exchange(cgroups, "127.0.0.1", port, 16 << 20, 0, exit_after=1 << 20)
        c = client["connections"][0]
        outcomes[fast_path] = (bool(c.get("send_error")) or bool(c.get("recv_error")), c["received"])
        agent.stop()
    assert outcomes[True] == outcomes[False] == (True, 0), outcomes


def test_remote_peer_falls_back_and_is_counted(cgroups, agents):
    host = NetnsHost()
    try:
        port = free_port()
        cfg = base_config(cgroups, port, fast_path=True)
        cfg["identities"].append({"name": "lab", "kind": "external", "endpoints": [f"{host.addrs[0]}/32"]})
        cfg["policies"].append({"from": "lab", "to": "llama", "ports": [port]})
        agent = agents(cfg)
        srv = _spawn(cgroups.child("llama"), "server", "--host", "0.0.0.0", "--port", str(port), "--reply", "100000")
        assert srv.stdout.readline()
        cli = _spawn(None, "client", "--host", host.host_addr, "--port", str(port), "--bytes", "300000",
                     netns=host.ns)
        client, server = _last_json(cli)["connections"][0], _last_json(srv)["connections"][0]
        assert server["sha256"] == client["sent_sha256"] and client["sha256"] == digest(7, 100000)
        assert _metric(agent, "aimesh_fastpath_fallbacks_total", '{reason="remote_peer"}') >= 1
        assert _metric(agent, "aimesh_fastpath_messages_total") == 0
    finally:
        host.remove()


def test_unwatched_peer_falls_back_and_is_counted(cgroups, agents):
    """A server outside the governed subtree: the client's socket stays on the normal path."""
    from tests.kernel.harness import CgroupTree
    outside = CgroupTree()
    try:
        port = free_port()
        agent = agents(base_config(cgroups, port, fast_path=True))
        srv = _spawn(outside.child("other"), "server", "--port", str(port), "--reply", "5000")
        assert srv.stdout.readline()
        cli = _spawn(cgroups.child("chat"), "client", "--port", str(port), "--bytes", "200000")
        client, server = _last_json(cli)["connections"][0], _last_json(srv)["connections"][0]
        assert server["sha256"] == client["sent_sha256"] and client["received"] == 5000
        assert _metric(agent, "aimesh_fastpath_fallbacks_total", '{reason="peer_not_governed"}') == 1
        assert _metric(agent, "aimesh_fastpath_messages_total") == 0
    finally:
        outside.cleanup()


_CLOSING_SERVER = r'''
import socket, sys
ls = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
c, _ = ls.accept()
c.recv(65536)
c.close()
'''
_SEND_AFTER_CLOSE = r'''
import errno, json, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"x" * 100)
assert s.recv(100) == b""      # the server closed
out = []
for _ in range(3):
    try:
        s.sendall(b"y" * 1000)
        out.append("ok")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
    time.sleep(0.05)
print(json.dumps(out))
'''


@pytest.mark.parametrize("fast_path", [True, False], ids=["fastpath", "normal"])
def test_a_send_after_the_peer_closed_fails_as_without_the_fast_path(cgroups, agents, fast_path):
    """kcap saw sendall fail with a permission error once the server had closed: the sk_msg verdict dropped the send
    (EACCES) because the peer had left the sockhash. An allowed connection's sends end the way TCP ends them."""
    port = free_port()
    agents(base_config(cgroups, port, fast_path=fast_path))
    srv = subprocess.Popen([sys.executable, "-c", _CLOSING_SERVER, str(port)], stdout=subprocess.PIPE, text=True,
                           preexec_fn=_enter_cgroup(cgroups.child("llama")))
    try:
        assert srv.stdout.readline().strip() == "ready"
        cli = subprocess.run([sys.executable, "-c", _SEND_AFTER_CLOSE, str(port)], capture_output=True, text=True,
                             timeout=30, preexec_fn=_enter_cgroup(cgroups.child("chat")))
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == ["ok", "EPIPE", "EPIPE"]   # the RST the first send drew, then EPIPE
    finally:
        srv.kill()
        srv.wait()


def test_a_policy_opts_one_pair_in(cgroups, agents):
    """`fast_path: false` for the node, `fast_path: true` on the chat -> llama policy only: chat's connection takes
    the fast path (both sockets join), batch's to the same server stays on the plain stack (no socket joins, so none
    gets the sockmap's receive path)."""
    port = free_port()
    cfg = base_config(cgroups, port, fast_path=False)
    cfg["policies"] = [{"from": "chat", "to": "llama", "ports": [port], "fast_path": True},
                       {"from": "batch", "to": "llama", "ports": [port]}]
    agent = agents(cfg)
    srv = _spawn(cgroups.child("llama"), "server", "--port", str(port), "--connections", "2", "--reply", "5000")
    assert srv.stdout.readline()
    for who in ("chat", "batch"):
        cli = _spawn(cgroups.child(who), "client", "--port", str(port), "--bytes", "200000")
        client = _last_json(cli)["connections"][0]
        assert client["received"] == 5000 and not {"send_error", "recv_error", "connect_error"} & set(client)
        if who == "chat":
            assert _metric(agent, "aimesh_fastpath_sockets_total") == 2
            chat_messages = _metric(agent, "aimesh_fastpath_messages_total")
            assert chat_messages > 0
    server = _last_json(srv)["connections"]
    assert [c["received"] for c in server] == [200000, 200000]
    assert _metric(agent, "aimesh_fastpath_sockets_total") == 2          # batch's sockets never joined
    assert _metric(agent, "aimesh_fastpath_messages_total") == chat_messages
