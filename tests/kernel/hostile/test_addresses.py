"""Issue 15 items 6 and 7 (part): no way around a verdict by which of this host's addresses is dialed.

Policy: A may reach the model S, B (a service with an identity) may not, U (a cgroup no selector matches) may not;
A may also reach `peer`, a server on a link-local address in a network namespace made here, which B and U may not.

- An address added to this host after the agent started (on the host end of the veth made here, removed at teardown) is this
  host: A reaches S there, B and U get EPERM, and the records say so (today's main: A refused, B and U allowed in
  the records but their SYNs dropped, connects time out).
- A link-local address with a zone id (fe80::x%link) is judged like any other: one of this host's is this host, a
  remote one is judged by policy."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from tests.kernel.harness import CgroupTree, free_port, metric_value, run_client, start_agent, start_server
from tests.kernel.netns import NetnsHost


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One agent; a netns peer on a link-local address, joined by a veth whose host end (`link`) gains addresses
    while the agent runs (this kernel has no dummy links)."""
    tree = CgroupTree()
    agent, servers, remote = None, [], None
    try:
        remote = NetnsHost()
        link = remote.host_if
        octet = int(remote.ns[-6:-4], 16)
        remote_ll = f"fe80::a1:{octet:x}:2"
        _ip("-n", remote.ns, "-6", "addr", "add", f"{remote_ll}/64", "dev", remote.ns_if, "nodad")
        a, b, u, s = (tree.child(n) for n in ("a", "b", "u", "s"))
        ports = {"v4": free_port(), "v6": free_port(family=socket.AF_INET6), "ll": free_port(family=socket.AF_INET6),
                 "peer": free_port(family=socket.AF_INET6),
                 "unlisted": free_port(), "wild": free_port()}
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "a", "kind": "service", "select": {"cgroups": [tree.rel(a)]}},
                {"name": "b", "kind": "service", "select": {"cgroups": [tree.rel(b)]}},
                {"name": "s", "kind": "model", "select": {"cgroups": [tree.rel(s)]}},
                {"name": "peer", "kind": "external", "endpoints": [f"{remote_ll}/128"]},
            ],
            "policies": [{"from": "a", "to": "s", "ports": sorted(ports.values())},
                         {"from": "a", "to": "peer", "ports": [ports["peer"]]}],
        }
        agent = start_agent(tmp_path_factory.mktemp("addr"), tree.root, cfg)
        servers.append(start_server(s, ports["wild"], name="s", host="0.0.0.0", timeout=600))
        servers.append(start_server(None, ports["peer"], name="peer", host=f"{remote_ll}%{remote.ns_if}",
                                    timeout=600, netns=remote.ns))
        yield {"agent": agent, "ports": ports, "a": a, "b": b, "u": u, "s": s, "link": link, "octet": octet,
               "remote": remote, "remote_ll": remote_ll, "servers": servers}
    finally:
        for p in servers:
            p.popen.kill()
            p.popen.wait()
        if agent is not None:
            agent.stop()
        tree.cleanup()
        if remote is not None:
            remote.remove()


def add_address(mesh, addr: str, prefix: int) -> None:
    """Add addr to the host's end of the veth now, while the agent runs, and give the agent the time its loop needs to see it:
    until its log names the address (not an assertion: the verdicts below are)."""
    _ip("addr", "add", f"{addr}/{prefix}", "dev", mesh["link"], *(["nodad"] if ":" in addr else []))
    deadline = time.monotonic() + 5
    while addr not in mesh["agent"].log() and time.monotonic() < deadline:
        time.sleep(0.05)


def records_for(agent, since: int, port: int, n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in agent.flows()[since:] if r["destination"]["port"] == port]
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def check(mesh, dial: str, port: int, dst: str) -> None:
    """A reaches dst through `dial`; B and U get EPERM (not a timeout); the records say what the kernel did."""
    since = len(mesh["agent"].flows())
    seen = {who: run_client(mesh[who], port, host=dial, timeout=2.0) for who in ("a", "b", "u")}
    check_seen(mesh, since, seen, port, dst)


def check_seen(mesh, since: int, seen: dict, port: int, dst: str) -> None:
    assert seen["a"]["ok"] == 1 and seen["a"]["answers"] == {dst: 1}, seen
    assert seen["b"]["errors"] == {"EPERM": 1} and seen["u"]["errors"] == {"EPERM": 1}, seen
    recs = records_for(mesh["agent"], since, port, 3)
    got = sorted((r["source"]["name"], r["destination"]["name"], r["verdict"], r["reason"]) for r in recs)
    assert got == [("a", dst, "allowed", "policy"), ("b", dst, "denied", "no_policy_dst"),
                   ("unmanaged", dst, "denied", "no_policy_dst")], got


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_address_added_after_start_is_this_host(mesh, family):
    """An address the host gains while the agent runs is judged as this host from then on."""
    addr = f"198.19.{mesh['octet']}.1" if family == "v4" else f"fd00:a2:{mesh['octet']:x}::1"
    add_address(mesh, addr, 32 if family == "v4" else 128)
    port = mesh["ports"][family]
    mesh["servers"].append(start_server(mesh["s"], port, name="s", host=addr, timeout=600))
    check(mesh, addr, port, "s")


def test_address_not_listed_yet_exact_bind(mesh):
    """Before the agent has seen a new address (it is stopped: its programs keep judging), a server bound to exactly
    that address is judged as itself: A reaches it, B and U get EPERM, and the records, written once the agent runs
    again, say so. The kernel counts what came from an address it did not list."""
    agent = mesh["agent"]
    addr, port = f"198.19.{mesh['octet']}.5", mesh["ports"]["unlisted"]
    since = len(agent.flows())
    agent.popen.send_signal(signal.SIGSTOP)
    try:
        _ip("addr", "add", f"{addr}/32", "dev", mesh["link"])
        mesh["servers"].append(start_server(mesh["s"], port, name="s", host=addr, timeout=600))
        seen = {who: run_client(mesh[who], port, host=addr, timeout=2.0) for who in ("a", "b", "u")}
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    check_seen(mesh, since, seen, port, "s")
    assert metric_value(agent.get("/metrics")[1], "aimesh_ingress_unlisted_local_total", outcome="exact_bind") >= 1


def test_address_not_listed_yet_wildcard_bind_fails_closed(mesh):
    """Before the agent has seen a new address, a connect to it reaching a wildcard (0.0.0.0) bind is judged as to
    `world` (allowed here: nothing denies world), and its SYN at S as from `world`: dropped, counted. Nobody reaches
    S through it, A included (fails closed until the agent lists the address)."""
    agent = mesh["agent"]
    addr, port = f"198.19.{mesh['octet']}.6", mesh["ports"]["wild"]
    before = metric_value(agent.get("/metrics")[1], "aimesh_ingress_unlisted_local_total", outcome="judged_remote")
    agent.popen.send_signal(signal.SIGSTOP)
    try:
        _ip("addr", "add", f"{addr}/32", "dev", mesh["link"])
        seen = {who: run_client(mesh[who], port, host=addr, timeout=2.0) for who in ("a", "b", "u")}
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    assert all(r["ok"] == 0 and r["errors"] in ({"EPERM": 1}, {"timeout": 1}) for r in seen.values()), seen
    timeouts = sum(r["errors"] == {"timeout": 1} for r in seen.values())
    assert metric_value(agent.get("/metrics")[1], "aimesh_ingress_unlisted_local_total",
                        outcome="judged_remote") >= before + timeouts


def test_address_removed_is_forgotten(mesh):
    """An address the host loses is no longer this host's: the agent says so (and drops it from the kernel map)."""
    addr = f"198.19.{mesh['octet']}.9"
    add_address(mesh, addr, 32)
    _ip("addr", "del", f"{addr}/32", "dev", mesh["link"])
    agent = mesh["agent"]
    deadline = time.monotonic() + 5
    while f"-{addr}" not in agent.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"+{addr}" in agent.log() and f"-{addr}" in agent.log(), agent.log()[-2000:]


def test_local_link_local_with_zone_id_is_this_host(mesh):
    """fe80::x%link on one of this host's links is this host: S is judged as S."""
    ll = f"fe80::a2:{mesh['octet']:x}:1"
    add_address(mesh, ll, 64)
    port = mesh["ports"]["ll"]
    mesh["servers"].append(start_server(mesh["s"], port, name="s", host=f"{ll}%{mesh['link']}", timeout=600))
    check(mesh, f"{ll}%{mesh['link']}", port, "s")


def test_remote_link_local_with_zone_id_is_judged_by_policy(mesh):
    """fe80::x%veth of a host on the link is the identity its endpoints name, whatever the zone id."""
    check(mesh, f"{mesh['remote_ll']}%{mesh['remote'].host_if}", mesh["ports"]["peer"], "peer")
