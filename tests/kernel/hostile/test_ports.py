"""Issue 15 item 3: a bound port's identity can be neither taken over nor inherited. Policy: chat may reach the
llama server (TCP and UDP), batch (an identity) may not, an unmanaged workload (rogue) may not.

Takeover: a same-uid process co-binds llama's address:port with SO_REUSEPORT and closes it again. The first identity
that bound the port keeps it while any of its sockets holds it: the co-binder of another identity gets EPERM at
bind, and llama's port still reads as llama (chat allowed, batch and rogue refused).
Inheritance: once llama exits, its port's entry is gone at once (socket release), so a later unrelated listener on
the same port is not judged as llama. One agent for the module; each test uses its own ports."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.kernel.harness import (CgroupTree, _enter_cgroup, free_port, metric_value, run_client, start_agent,
                                  start_server)

CASES = [("tcp", "127.0.0.1"), ("udp", "127.0.0.1"), ("tcp", "::1"), ("udp", "::1")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tree = CgroupTree()
    agent = None
    try:
        cg = {n: tree.child(n) for n in ("chat", "batch", "llama", "rogue")}
        ports = {(proto, host): free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM,
                                          socket.AF_INET6 if ":" in host else socket.AF_INET)
                 for proto, host in CASES}
        ports["stale"] = free_port()
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "select": {"cgroups": [tree.rel(cg["chat"])]}},
                {"name": "batch", "kind": "service", "select": {"cgroups": [tree.rel(cg["batch"])]}},
                {"name": "llama", "kind": "model", "select": {"cgroups": [tree.rel(cg["llama"])]}},
            ],
            "policies": [
                {"from": "chat", "to": "llama", "ports": sorted({p for (pr, _), p in _items(ports) if pr == "tcp"}
                                                                | {ports["stale"]}), "protocol": "tcp"},
                {"from": "chat", "to": "llama", "ports": sorted({p for (pr, _), p in _items(ports) if pr == "udp"}),
                 "protocol": "udp"},
            ],
        }
        agent = start_agent(tmp_path_factory.mktemp("ports"), tree.root, cfg)
        yield agent, cg, ports
    finally:
        if agent is not None:
            agent.stop()
        tree.cleanup()


def _items(ports: dict):
    return [(k, v) for k, v in ports.items() if isinstance(k, tuple)]


def co_bind(cgroup, host: str, port: int, proto: str) -> str:
    """Bind host:port with SO_REUSEPORT (and SO_REUSEADDR) from a workload in cgroup, then close: "ok" or the errno."""
    kind = "SOCK_DGRAM" if proto == "udp" else "SOCK_STREAM"
    fam = "AF_INET6" if ":" in host else "AF_INET"
    code = f"""
        import errno, json, socket
        s = socket.socket(socket.{fam}, socket.{kind})
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind(({host!r}, {port}))
            print(json.dumps({{"bind": "ok"}}))
        except OSError as e:
            print(json.dumps({{"bind": errno.errorcode[e.errno]}}))
        s.close()
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=20,
                       preexec_fn=_enter_cgroup(cgroup))
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, p.stderr
    return json.loads(lines[-1])["bind"]


def records(agent, port, proto, until=lambda recs: bool(recs), **want) -> list[dict]:
    """Flow records to port; waits (bounded) until `until` holds for them, so a record still in the ring is seen."""
    deadline = time.monotonic() + 10
    while True:
        recs = [r for r in agent.flows() if r["protocol"] == proto and r["destination"]["port"] == port and
                all(r.get(k) == v for k, v in want.items())]
        if until(recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def pairs(recs: list[dict]) -> set[tuple[str, str]]:
    return {(r["source"]["name"], r["destination"]["name"]) for r in recs}


@pytest.mark.parametrize("proto,host", CASES)
def test_a_co_binder_of_another_identity_cannot_take_the_port(mesh, proto, host):
    """rogue (unmanaged) and batch co-bind llama's port with SO_REUSEPORT and close: both get EPERM at bind; then
    chat is still allowed to llama, batch and rogue still refused, and the records name llama as the destination."""
    agent, cg, ports = mesh
    port = ports[(proto, host)]
    udp = proto == "udp"
    srv = start_server(cg["llama"], port, name="llama", host=host, udp=udp, reuseport=True)
    try:
        # a co-binder of the same identity (a second worker) is let in and its close does not drop the port
        seen: dict = {"bind llama": co_bind(cg["llama"], host, port, proto)}
        for hijacker in ("rogue", "batch"):
            seen[f"bind {hijacker}"] = co_bind(cg[hijacker], host, port, proto)
            for who in ("chat", "batch", "rogue"):
                res = run_client(cg[who], port, host=host, udp=udp)
                seen[f"{who} after {hijacker}"] = res["answers"] if res["ok"] else res["errors"]
        assert seen == {"bind llama": "ok",
                        **{k: v for h in ("rogue", "batch") for k, v in (
                            (f"bind {h}", "EPERM"), (f"chat after {h}", {"llama": 1}),
                            (f"batch after {h}", {"EPERM": 1}), (f"rogue after {h}", {"EPERM": 1}))}}, json.dumps(seen)
        want_denied = {("batch", "llama"), ("unmanaged", "llama")}
        allowed = records(agent, port, proto, verdict="allowed")
        denied = records(agent, port, proto, until=lambda recs: pairs(recs) >= want_denied, verdict="denied")
        assert pairs(allowed) == {("chat", "llama")}
        assert pairs(denied) == want_denied
        _, text = agent.get("/metrics")
        assert metric_value(text, "aimesh_port_binds_refused_total", reason="held_by_another_identity") >= 2
    finally:
        srv.popen.kill()
        srv.popen.wait()


def test_a_later_listener_on_an_exited_servers_port_is_not_judged_as_it(mesh):
    """llama listens on a port and exits; an unrelated server outside the governed tree (this test process, whose
    binds no program sees) then listens on the same port. chat's connect is judged as one to an unmanaged server
    (recorded destination unmanaged, reason not_governed), not as one that still reaches llama (policy)."""
    agent, cg, ports = mesh
    port = ports["stale"]
    srv = start_server(cg["llama"], port, name="llama")
    ok = run_client(cg["chat"], port)
    assert ok["ok"] == 1 and ok["answers"] == {"llama": 1}, ok
    first = {r["cookie"] for r in records(agent, port, "tcp")}
    srv.popen.kill()
    srv.popen.wait()
    stray = socket.socket()
    try:
        stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stray.bind(("127.0.0.1", port))
        stray.listen(8)
        run_client(cg["chat"], port, timeout=1)   # the stray server never answers: only the verdict matters
        later = [r for r in records(agent, port, "tcp", until=lambda recs: len(recs) > len(first))
                 if r["cookie"] not in first]
        assert [(r["source"]["name"], r["destination"]["name"], r["reason"]) for r in later] == \
            [("chat", "unmanaged", "not_governed")]
    finally:
        stray.close()


def test_a_server_bound_before_the_agent_keeps_its_port(tmp_path):
    """llama listens (SO_REUSEPORT) before the agent starts, so no post_bind saw it: the agent seeds its port from
    /proc. rogue's co-bind is still refused and chat still reaches llama."""
    tree = CgroupTree()
    agent = srv = None
    try:
        cg = {n: tree.child(n) for n in ("chat", "llama", "rogue")}
        port = free_port()
        srv = start_server(cg["llama"], port, name="llama", reuseport=True, timeout=60)
        cfg = {"mode": "enforce",
               "identities": [{"name": n, "kind": "model" if n == "llama" else "service",
                               "select": {"cgroups": [tree.rel(cg[n])]}} for n in ("chat", "llama")],
               "policies": [{"from": "chat", "to": "llama", "ports": [port], "protocol": "tcp"}]}
        agent = start_agent(tmp_path, tree.root, cfg)
        seen = {"bind rogue": co_bind(cg["rogue"], "127.0.0.1", port, "tcp")}
        for who in ("chat", "rogue"):
            res = run_client(cg[who], port)
            seen[who] = res["answers"] if res["ok"] else res["errors"]
        assert seen == {"bind rogue": "EPERM", "chat": {"llama": 1}, "rogue": {"EPERM": 1}}, json.dumps(seen)
    finally:
        if srv is not None:
            srv.popen.kill()
            srv.popen.wait()
        if agent is not None:
            agent.stop()
        tree.cleanup()
