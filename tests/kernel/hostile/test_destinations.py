"""Issue 15: no way around a verdict by how the destination is spelled. Real sockets, real cgroups, one agent.

Policy: A may reach the model S, B (a service with an identity) may not, U (a cgroup no selector matches) may not.
S serves TCP and UDP on 127.0.0.1 and ::1. Each class dials S by another name the kernel routes to the same socket;
the verdict and the record must be the ones for S. `dns: allow` opens port 53 to the resolvers only: S serving on
port 53 is judged by policy."""
from __future__ import annotations

import socket
import time

import pytest

from tests.kernel.harness import CgroupTree, free_port, run_client, start_agent, start_server

RESOLVER = "127.0.0.53"      # a resolver the config lists, served from outside the governed tree
DNS_SERVER = "127.0.0.153"   # S also serves port 53 here: not a resolver


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One agent, the three clients' cgroups and S's servers: {(server host, proto): port}."""
    tree = CgroupTree()
    agent, servers = None, []
    try:
        a, b, u, s = (tree.child(n) for n in ("a", "b", "u", "s"))
        ports = {(host, udp): free_port(socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                                        socket.AF_INET6 if ":" in host else socket.AF_INET)
                 for host in ("127.0.0.1", "::1") for udp in (False, True)}
        ports[(DNS_SERVER, False)] = ports[(DNS_SERVER, True)] = 53
        cfg = {
            "mode": "enforce",
            "dns": "allow",
            "dns_resolvers": [RESOLVER],
            "identities": [
                {"name": "a", "kind": "service", "select": {"cgroups": [tree.rel(a)]}},
                {"name": "b", "kind": "service", "select": {"cgroups": [tree.rel(b)]}},
                {"name": "s", "kind": "model", "select": {"cgroups": [tree.rel(s)]}},
                # governed, no policy: only the DNS rule lets anyone reach it
                {"name": "resolver", "kind": "external", "endpoints": [f"{RESOLVER}/32:53"]},
            ],
            "policies": [{"from": "a", "to": "s", "ports": sorted(set(ports.values()))}],
        }
        agent = start_agent(tmp_path_factory.mktemp("dst"), tree.root, cfg)
        for (host, udp), port in ports.items():
            servers.append(start_server(s, port, name="s", host=host, udp=udp, timeout=600))
        for udp in (False, True):
            servers.append(start_server(None, 53, name="resolver", host=RESOLVER, udp=udp, timeout=600))
        yield {"agent": agent, "ports": ports, "a": a, "b": b, "u": u}
    finally:
        for p in servers:
            p.popen.kill()
            p.popen.wait()
        if agent is not None:
            agent.stop()
        tree.cleanup()


def records_for(agent, since: int, port: int, dial: str, n: int, timeout: float = 5.0) -> list[dict]:
    """The flow records after the first `since` to port that keep the dialed address; waits until there are n (the
    agent drains every 25 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in agent.flows()[since:] if r["destination"]["port"] == port and r["destination"]["address"] == dial]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def check_class(mesh, dial: str, server_host: str, udp: bool, recorded: str, family: str) -> None:
    """A reaches S through `dial`; B and U get EPERM; the records name S, keep the dialed address (`recorded`, as the
    flow log spells it), and say so."""
    port = mesh["ports"][(server_host, udp)]
    since = len(mesh["agent"].flows())
    seen = {who: run_client(mesh[who], port, host=dial, udp=udp, timeout=2.0) for who in ("a", "b", "u")}
    assert seen["a"]["ok"] == 1 and seen["a"]["answers"] == {"s": 1}, seen
    assert seen["b"]["errors"] == {"EPERM": 1} and seen["u"]["errors"] == {"EPERM": 1}, seen

    recs = records_for(mesh["agent"], since, port, recorded, 3)
    got = sorted((r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"]) for r in recs)
    assert got == [("a", "s", "allowed", "policy"), ("b", "s", "denied", "no_policy_dst"),
                   ("unmanaged", "s", "denied", "no_policy_dst")], got
    assert {(r["protocol"], r["family"]) for r in recs} == {("udp" if udp else "tcp", family)}


# A v4-mapped sendto() from an IPv6 socket runs the kernel's IPv4 sendmsg hook: its record is IPv4.
@pytest.mark.parametrize("dial,server_host,udp,recorded,family", [
    ("0.0.0.0", "127.0.0.1", False, "0.0.0.0", "ipv4"),
    ("0.0.0.0", "127.0.0.1", True, "0.0.0.0", "ipv4"),
    ("::", "::1", False, "::", "ipv6"),
    ("::", "::1", True, "::", "ipv6"),
    ("::ffff:0.0.0.0", "127.0.0.1", False, "0.0.0.0", "ipv6"),
    ("::ffff:0.0.0.0", "127.0.0.1", True, "0.0.0.0", "ipv4"),
], ids=["v4-tcp", "v4-udp", "v6-tcp", "v6-udp", "v4-mapped-tcp", "v4-mapped-udp"])
def test_unspecified_address_is_this_host(mesh, dial, server_host, udp, recorded, family):
    """connect()/sendto() to 0.0.0.0, :: or ::ffff:0.0.0.0 reaches S's loopback socket: judged as S."""
    check_class(mesh, dial, server_host, udp, recorded, family)


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_dns_allow_opens_port_53_to_resolvers_only(mesh, udp):
    """Port 53 to a listed resolver is allowed (reason dns) for B and U; port 53 to S (not a resolver) is judged by
    policy like any other port."""
    since = len(mesh["agent"].flows())
    for who in ("b", "u"):
        res = run_client(mesh[who], 53, host=RESOLVER, udp=udp, timeout=2.0)
        assert res["ok"] == 1 and res["answers"] == {"resolver": 1}, res
    recs = records_for(mesh["agent"], since, 53, RESOLVER, 2)
    assert sorted((r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"]) for r in recs) == \
        [("b", "resolver", "allowed", "dns"), ("unmanaged", "resolver", "allowed", "dns")], recs
    check_class(mesh, DNS_SERVER, DNS_SERVER, udp, DNS_SERVER, "ipv4")
