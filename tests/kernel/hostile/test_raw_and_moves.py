"""Issue 15 item 7: raw sockets and cgroup moves, from a root workload in a governed cgroup.

Policy: a may reach the model s (TCP and UDP), b (a service with an identity) may not, u (a cgroup no selector
matches) may not. s serves on 127.0.0.1 and ::1.

Raw sockets (SOCK_RAW over AF_INET/AF_INET6, with or without IP_HDRINCL) never pass the connect or sendmsg hooks;
the egress program judges each of their packets on its headers, as the identity of the socket's cgroup, drops what
is denied, counts it and records it (hook egress, reason raw_socket). AF_PACKET sockets reach no cgroup hook at all
on this kernel: that gap is held by a strict xfail, so it is seen the day it closes.

Moves: a root process in b writes its pid into a's cgroup.procs. New sockets are a's (the cgroup is the identity:
root that can write another cgroup's cgroup.procs takes that cgroup's identity). Sockets opened before the move stay
b's: bpf/sock_create.c remembers the cgroup each socket was made in, and connect/sendmsg judge the socket as it.
README: "What a cgroup identity proves"."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.kernel.harness import CgroupTree, _enter_cgroup, free_port, metric_value, start_agent, start_server
from tests.kernel.netns import NetnsHost

RAWPEER = Path(__file__).with_name("rawpeer.py")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tree = CgroupTree()
    agent, servers = None, []
    remote = NetnsHost()
    try:
        cg = {n: tree.child(n) for n in ("a", "b", "u", "s")}
        ports = {"udp4": free_port(socket.SOCK_DGRAM), "udp6": free_port(socket.SOCK_DGRAM, socket.AF_INET6),
                 "tcp4": free_port(), "move_udp": free_port(socket.SOCK_DGRAM), "move_tcp": free_port(),
                 "remote": free_port(socket.SOCK_DGRAM)}
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "a", "kind": "service", "select": {"cgroups": [tree.rel(cg["a"])]}},
                {"name": "b", "kind": "service", "select": {"cgroups": [tree.rel(cg["b"])]}},
                {"name": "s", "kind": "model", "select": {"cgroups": [tree.rel(cg["s"])]}},
                {"name": "lab", "kind": "external", "endpoints": [f"{remote.addrs[0]}/32"]},
            ],
            "policies": [{"from": "a", "to": "s", "ports": [ports["tcp4"], ports["move_tcp"]]},
                         {"from": "a", "to": "s", "ports": [ports["udp4"], ports["udp6"], ports["move_udp"]],
                          "protocol": "udp"},
                         {"from": "a", "to": "lab", "ports": [ports["remote"]], "protocol": "udp"}],
        }
        agent = start_agent(tmp_path_factory.mktemp("rawsock"), tree.root, cfg)
        servers.append(start_server(cg["s"], ports["udp4"], name="s", udp=True, timeout=600))
        servers.append(start_server(cg["s"], ports["move_udp"], name="s", udp=True, timeout=600))
        servers.append(start_server(cg["s"], ports["udp6"], name="s", host="::1", udp=True, timeout=600))
        servers.append(start_server(cg["s"], ports["tcp4"], name="s", timeout=600))
        servers.append(start_server(cg["s"], ports["move_tcp"], name="s", timeout=600))
        yield agent, cg, ports, remote
    finally:
        for p in servers:
            p.popen.kill()
            p.popen.wait()
        if agent is not None:
            agent.stop()
        tree.cleanup()
        remote.remove()


def raw(cgroup: Path, mode: str, port: int, *more: str) -> dict:
    p = subprocess.run([sys.executable, str(RAWPEER), mode, str(port), *more], capture_output=True, text=True, timeout=20,
                       preexec_fn=_enter_cgroup(cgroup))
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, p.stderr
    return json.loads(lines[-1])


def raw_records(agent, port: int, want: set, timeout: float = 5.0) -> list[dict]:
    """The egress records to port, once they hold every (source, destination, verdict, reason, protocol) in want
    (the agent drains every 25 ms), or what there is at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in agent.flows() if r["hook"] == "egress" and r["destination"]["port"] == port]
        got = {(r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"], r["protocol"]) for r in recs}
        if got >= want or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


@pytest.mark.parametrize("mode,port_key,proto", [("udp4", "udp4", "udp"), ("hdrincl4", "udp4", "udp"),
                                                 ("udp6", "udp6", "udp"), ("syn4", "tcp4", "tcp")])
def test_raw_socket_packets_are_judged_at_egress(mesh, mode, port_key, proto):
    """b and u send to s from a raw socket: dropped at egress (EPERM to the sender, nothing from s), counted in
    aimesh_raw_socket_packets_total{outcome="dropped"}, recorded denied (hook egress, reason raw_socket, source b /
    unmanaged). a's raw packet to s is allowed and s answers it."""
    agent, cg, ports, remote = mesh
    port = ports[port_key]
    before = metric_value(agent.get("/metrics")[1], "aimesh_raw_socket_packets_total", outcome="dropped")
    allowed = raw(cg["a"], mode, port)
    assert allowed == {"error": None, "answer": "syn-ack" if proto == "tcp" else "s"}, allowed
    for who in ("b", "u"):
        res = raw(cg[who], mode, port)
        assert res == {"error": "EPERM", "answer": None}, (who, res)
    after = metric_value(agent.get("/metrics")[1], "aimesh_raw_socket_packets_total", outcome="dropped")
    assert after - before == 2
    assert metric_value(agent.get("/metrics")[1], "aimesh_raw_socket_packets_total", outcome="passed") >= 1
    want = {("b", "s", "denied", "raw_socket", proto), ("unmanaged", "s", "denied", "raw_socket", proto)}
    recs = raw_records(agent, port, want)
    got = {(r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"], r["protocol"]) for r in recs}
    assert got >= want, recs
    assert all(r["verdict"] == "denied" for r in recs), recs   # an allowed raw packet is counted, not recorded


def remote_sink(remote: NetnsHost, port: int, seconds: float = 3.0) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", remote.ns, sys.executable, str(RAWPEER), "listen", str(port),
                          remote.addrs[0], str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline()) == {"listening": port}, p.stderr.read()
    return p


def sink_got(p: subprocess.Popen) -> list[str]:
    out, err = p.communicate(timeout=30)
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert lines, err
    return json.loads(lines[-1])["got"]


@pytest.mark.parametrize("mode", ["udp4", "hdrincl4"])
def test_raw_socket_to_a_remote_destination(mesh, mode):
    """The same on the wire: a's raw datagram reaches lab (an external endpoint in another network namespace), b's
    is dropped before it leaves the host, recorded b -> lab denied."""
    agent, cg, ports, remote = mesh
    port = ports["remote"]
    sink = remote_sink(remote, port)
    assert raw(cg["a"], mode, port, remote.addrs[0])["error"] is None
    assert raw(cg["b"], mode, port, remote.addrs[0])["error"] == "EPERM"
    assert sink_got(sink) == [remote.host_addr]   # a's only
    want = {("b", "lab", "denied", "raw_socket", "udp")}
    assert {(r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"], r["protocol"])
            for r in raw_records(agent, port, want)} >= want


@pytest.mark.xfail(strict=True, reason="AF_PACKET reaches no cgroup hook on this kernel (no sock_create, no "
                                       "cgroup_skb egress) and there is no BPF LSM: a governed workload with "
                                       "CAP_NET_RAW can put any frame on a link. Drop CAP_NET_RAW (README)")
def test_af_packet_frames_to_a_remote_destination(mesh):
    agent, cg, ports, remote = mesh
    port = ports["remote"]
    mac = json.loads(subprocess.run(["ip", "-n", remote.ns, "-j", "link", "show", remote.ns_if], check=True,
                                    capture_output=True, text=True).stdout)[0]["address"]
    sink = remote_sink(remote, port)
    res = raw(cg["b"], "packet", port, remote.addrs[0], remote.host_addr, remote.host_if, mac)
    assert res["error"] is None, res
    assert sink_got(sink) == [], "b's AF_PACKET frame reached lab"


MOVE = """
import errno, json, os, select, socket
def ask_udp(s):
    try:
        s.sendto(b"ping", ("127.0.0.1", {udp}))
    except OSError as e:
        return errno.errorcode[e.errno]
    return s.recv(64).decode() if select.select([s], [], [], 1.0)[0] else "timeout"
def ask_tcp(s):
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", {tcp}))
        return s.recv(64).decode()
    except OSError as e:
        return errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
old_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
old_udp.bind(("127.0.0.1", 0))
old_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
out = {{"before": ask_udp(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))}}
open("{target}/cgroup.procs", "w").write(str(os.getpid()))
out["new_udp"] = ask_udp(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
out["new_tcp"] = ask_tcp(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
out["old_udp"] = ask_udp(old_udp)
out["old_tcp"] = ask_tcp(old_tcp)
print(json.dumps(out))
"""


def test_a_process_moving_into_another_cgroup(mesh):
    """b moves itself into a's cgroup (it is root). New sockets are judged as a: allowed (a cgroup identity cannot
    hold against root that can write another cgroup's cgroup.procs; README). Sockets b opened before the move were
    charged to b at creation and keep b's identity: a UDP datagram and a TCP connect on them are denied."""
    agent, cg, ports, remote = mesh
    code = MOVE.format(udp=ports["move_udp"], tcp=ports["move_tcp"], target=cg["a"])
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30,
                       preexec_fn=_enter_cgroup(cg["b"]))
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, p.stderr
    got = json.loads(lines[-1])
    assert got["before"] == "EPERM", got
    assert got["new_udp"] == "s" and got["new_tcp"] == "s", got
    assert got["old_udp"] == "EPERM" and got["old_tcp"] == "EPERM", got
    for port, proto, hook in ((ports["move_udp"], "udp", "sendmsg"), (ports["move_tcp"], "tcp", "connect")):
        recs = agent.records_where(lambda r: r["destination"]["port"] == port and r["verdict"] == "denied")
        assert {(r["source"]["name"], r["source"]["cgroup_id"], r["hook"], r["protocol"]) for r in recs} == \
            {("b", cg["b"].stat().st_ino, hook, proto)}, recs
