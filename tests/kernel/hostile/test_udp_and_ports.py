"""Issue 15: ways around a UDP verdict. Policy: chat may reach the llama UDP server, batch (an identity) may not,
an unmanaged workload (rogue) may not. One agent for the module; each test uses its own servers and ports."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.kernel.harness import CgroupTree, _enter_cgroup, free_port, run_client, start_agent, start_server
from tests.kernel.netns import NetnsHost


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tree = CgroupTree()
    agent = None
    remote = NetnsHost()
    try:
        cg = {n: tree.child(n) for n in ("chat", "batch", "llama", "rogue")}
        ports = {"v4": free_port(socket.SOCK_DGRAM), "v6": free_port(socket.SOCK_DGRAM, socket.AF_INET6),
                 "unsolicited": free_port(socket.SOCK_DGRAM), "remote": free_port(socket.SOCK_DGRAM)}
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "select": {"cgroups": [tree.rel(cg["chat"])]}},
                {"name": "batch", "kind": "service", "select": {"cgroups": [tree.rel(cg["batch"])]}},
                {"name": "llama", "kind": "model", "select": {"cgroups": [tree.rel(cg["llama"])]}},
                {"name": "lab", "kind": "external", "endpoints": [f"{remote.addrs[0]}/32"]},
            ],
            "policies": [{"from": "chat", "to": "llama", "ports": sorted(ports.values()), "protocol": "udp"},
                         {"from": "lab", "to": "llama", "ports": [ports["remote"]], "protocol": "udp"}],
        }
        agent = start_agent(tmp_path_factory.mktemp("udpport"), tree.root, cfg)
        yield agent, cg, ports, remote
    finally:
        if agent is not None:
            agent.stop()
        tree.cleanup()
        remote.remove()


def run_in(cgroup, code: str, timeout: float = 20) -> dict:
    """Run a Python snippet in a cgroup; it prints one JSON line."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_enter_cgroup(cgroup))
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, p.stderr
    return json.loads(lines[-1])


def udp_records(agent, port, **want):
    return agent.records_where(lambda r: r["protocol"] == "udp" and r["destination"]["port"] == port and
                               all(r.get(k) == v for k, v in want.items()))


def test_bound_port_is_not_a_server_reply(mesh):
    """batch and rogue bind port 0 (a port of their own) before sendto(llama): judged, EPERM, recorded denied."""
    agent, cg, ports, _ = mesh
    port = ports["v4"]
    srv = start_server(cg["llama"], port, name="llama-udp", udp=True)
    try:
        assert run_client(cg["batch"], port, udp=True, bind="127.0.0.1")["errors"] == {"EPERM": 1}
        assert run_client(cg["rogue"], port, udp=True, bind="127.0.0.1")["errors"] == {"EPERM": 1}
        assert run_client(cg["rogue"], port, udp=True, bind="0.0.0.0")["errors"] == {"EPERM": 1}
        denied = udp_records(agent, port, verdict="denied")
        assert {(r["source"]["name"], r["hook"]) for r in denied} >= {("batch", "sendmsg"), ("unmanaged", "sendmsg")}
    finally:
        srv.popen.kill()


@pytest.mark.parametrize("host,key", [("127.0.0.1", "v4"), ("::1", "v6"), ("::ffff:127.0.0.1", "v4")])
def test_server_replies_to_an_allowed_client(mesh, host, key):
    """llama's answers to chat (who wrote first and was allowed) go through, bound or autobound client, v4, v6 and
    a v4-mapped client socket talking to the IPv4 server; the flow record is chat -> llama, allowed."""
    agent, cg, ports, _ = mesh
    port = ports[key]
    srv = start_server(cg["llama"], port, name="llama-udp", host="::1" if key == "v6" else "127.0.0.1", udp=True)
    try:
        res = run_client(cg["chat"], port, host=host, udp=True, count=2)
        assert res["ok"] == 2 and res["answers"] == {"llama-udp": 2}, res
        bound = run_client(cg["chat"], port, host=host, udp=True, bind="::" if ":" in host else "127.0.0.1")
        assert bound["ok"] == 1 and bound["answers"] == {"llama-udp": 1}, bound
        allowed = udp_records(agent, port, verdict="allowed")
        assert {(r["source"]["name"], r["destination"]["name"]) for r in allowed} >= {("chat", "llama")}
    finally:
        srv.popen.kill()


def test_server_cannot_write_first_from_its_port(mesh):
    """llama, from its own bound server port, sends to a socket of the test process (unmanaged) that never wrote to it: a new flow, judged
    (llama is governed and no policy lets it reach an unmanaged port): EPERM, and the sink receives nothing."""
    agent, cg, ports, _ = mesh
    port = ports["unsolicited"]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.5)
    try:
        res = run_in(cg["llama"], f"""
            import errno, json, socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", {port}))
            try:
                s.sendto(b"unsolicited", ("127.0.0.1", {sink.getsockname()[1]}))
                print(json.dumps({{"sent": 1}}))
            except OSError as e:
                print(json.dumps({{"error": errno.errorcode[e.errno]}}))
        """)
        assert res == {"error": "EPERM"}
        with pytest.raises(socket.timeout):
            sink.recvfrom(64)
        denied = udp_records(agent, sink.getsockname()[1], verdict="denied")
        assert [(r["source"]["name"], r["hook"]) for r in denied] == [("llama", "sendmsg")]
    finally:
        sink.close()


def test_server_replies_to_an_allowed_remote_client(mesh):
    """A remote client judged allowed at ingress (lab) gets llama's answer; a remote world address is dropped at
    ingress (recorded denied) and, having been let in nowhere, gets nothing back."""
    agent, cg, ports, remote = mesh
    port = ports["remote"]
    srv = start_server(cg["llama"], port, name="llama-udp", host="0.0.0.0", udp=True)
    try:
        ok = run_client(None, port, host=remote.host_addr, udp=True, bind=remote.addrs[0], netns=remote.ns, timeout=2)
        assert ok["ok"] == 1 and ok["answers"] == {"llama-udp": 1}, ok
        dropped = run_client(None, port, host=remote.host_addr, udp=True, bind=remote.addrs[1], netns=remote.ns,
                             timeout=1)
        assert dropped["ok"] == 0 and list(dropped["errors"]) == ["timeout"], dropped
        denied = udp_records(agent, port, verdict="denied", hook="ingress")
        assert {(r["source"]["name"], r["source"]["address"]) for r in denied} == {("world", remote.addrs[1])}
    finally:
        srv.popen.kill()
