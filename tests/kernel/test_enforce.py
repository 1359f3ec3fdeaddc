"""Allow-lists, audit and identities, judged by the real kernel on real sockets in real cgroups."""
from __future__ import annotations

import socket
import time

import pytest

from tests.kernel.harness import free_port, metric_value, run_client, start_server


def base_config(cg, port, **over):
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "select": {"cgroups": [cg.rel(cg.root) + "/chat"]}},
            {"name": "batch", "kind": "service", "select": {"cgroups": [cg.rel(cg.root) + "/batch"]}},
            {"name": "llama", "kind": "model", "version": "3.1-8b",
             "select": {"cgroups": [cg.rel(cg.root) + "/llama"]}},
        ],
        "policies": [{"from": "chat", "to": "llama", "ports": [port]}],
    }
    cfg.update(over)
    return cfg


def by_verdict(records, verdict):
    return [r for r in records if r["verdict"] == verdict]


def test_allowed_denied_and_unmanaged(cgroups, agents):
    port = free_port()
    chat, batch, llama, rogue = (cgroups.child(n) for n in ("chat", "batch", "llama", "rogue"))
    agent = agents(base_config(cgroups, port))
    srv = start_server(llama, port, name="llama")

    ok = run_client(chat, port)
    assert ok["ok"] == 1 and ok["answers"] == {"llama": 1}

    denied = run_client(batch, port)            # a service with an identity but no policy to the model
    assert denied["ok"] == 0 and denied["errors"] == {"EPERM": 1}

    unmanaged = run_client(rogue, port)         # no identity at all
    assert unmanaged["ok"] == 0 and unmanaged["errors"] == {"EPERM": 1}

    recs = [r for r in agent.flows(wait_for=3) if r["destination"]["port"] == port]
    allowed = by_verdict(recs, "allowed")
    assert [(r["source"]["name"], r["destination"]["name"], r["destination"]["version"]) for r in allowed] == \
        [("chat", "llama", "3.1-8b")]
    assert allowed[0]["reason"] == "policy" and allowed[0]["rule"] == 0
    assert allowed[0]["source"]["pid"] > 0 and allowed[0]["source"]["comm"].startswith("python")
    denied_recs = by_verdict(recs, "denied")
    assert sorted(r["source"]["name"] for r in denied_recs) == ["batch", "unmanaged"]
    assert all(r["reason"] == "no_policy_dst" for r in denied_recs)
    srv.popen.kill()

    status, metrics = agent.get("/metrics")
    assert status == 200
    assert 'aimesh_kernel_decisions_total{hook="connect",verdict="denied"} 2.0' in metrics
    assert ('aimesh_connections_total{destination="llama",destination_kind="model",destination_version="3.1-8b",'
            'source="chat",source_kind="service",source_version="",verdict="allowed"} 1.0') in metrics


def test_wrong_port_is_denied(cgroups, agents):
    port, other = free_port(), free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    agents(base_config(cgroups, port))
    srv = start_server(llama, other, name="llama")
    assert run_client(chat, other)["errors"] == {"EPERM": 1}
    srv.popen.kill()


def test_audit_mode_allows_and_records(cgroups, agents):
    port = free_port()
    batch, llama = cgroups.child("batch"), cgroups.child("llama")
    agent = agents(base_config(cgroups, port, mode="audit"))
    srv = start_server(llama, port, name="llama")
    res = run_client(batch, port)
    assert res["ok"] == 1, res
    recs = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == port]
    assert [(r["verdict"], r["source"]["name"], r["reason"]) for r in recs] == [("audit", "batch", "no_policy_dst")]
    _, metrics = agent.get("/metrics")
    assert 'aimesh_kernel_decisions_total{hook="connect",verdict="audit"} 1.0' in metrics
    srv.popen.kill()


def test_per_identity_audit_override(cgroups, agents):
    """Global enforce, the model in audit: a flow only that model governs is audited, not denied."""
    port = free_port()
    batch, llama = cgroups.child("batch"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cfg["identities"][2]["mode"] = "audit"
    agent = agents(cfg)
    srv = start_server(llama, port, name="llama")
    assert run_client(batch, port)["ok"] == 1
    recs = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == port]
    assert [r["verdict"] for r in recs] == ["audit"]
    srv.popen.kill()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ipv4_and_ipv6_tcp(cgroups, agents, host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = free_port(family=fam)
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    agent = agents(base_config(cgroups, port))
    srv = start_server(llama, port, name="llama", host=host)
    assert run_client(chat, port, host=host)["ok"] == 1
    assert run_client(rogue, port, host=host)["errors"] == {"EPERM": 1}
    recs = [r for r in agent.flows(wait_for=2) if r["destination"]["port"] == port]
    assert {(r["family"], r["verdict"]) for r in recs} == {
        ("ipv6" if fam == socket.AF_INET6 else "ipv4", "allowed"),
        ("ipv6" if fam == socket.AF_INET6 else "ipv4", "denied")}
    assert all(r["destination"]["address"] == host and r["destination"]["name"] == "llama" for r in recs)
    srv.popen.kill()


def test_v4_mapped_ipv6_socket_is_judged_as_ipv4(cgroups, agents):
    port = free_port()
    rogue, llama = cgroups.child("rogue"), cgroups.child("llama")
    agents(base_config(cgroups, port))
    srv = start_server(llama, port, name="llama")   # IPv4 server
    res = run_client(rogue, port, host="::ffff:127.0.0.1")
    assert res["errors"] == {"EPERM": 1}
    srv.popen.kill()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_sendmsg(cgroups, agents, host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = free_port(socket.SOCK_DGRAM, fam)
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cfg["policies"][0]["protocol"] = "udp"
    agent = agents(cfg)
    srv = start_server(llama, port, name="llama-udp", host=host, udp=True)
    ok = run_client(chat, port, host=host, udp=True, count=3)
    assert ok["ok"] == 3 and ok["answers"] == {"llama-udp": 3}
    assert run_client(rogue, port, host=host, udp=True)["errors"] == {"EPERM": 1}
    recs = [r for r in agent.flows(wait_for=4) if r["destination"]["port"] == port]
    # three datagrams from one socket... are three sockets here (one per attempt): one record each, hook sendmsg
    assert {r["hook"] for r in recs} == {"sendmsg"} and {r["protocol"] for r in recs} == {"udp"}
    assert sorted(r["verdict"] for r in recs) == ["allowed"] * 3 + ["denied"]
    srv.popen.kill()


def test_tcp_policy_does_not_open_udp(cgroups, agents):
    port = free_port(socket.SOCK_DGRAM)
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cfg["policies"][0]["protocol"] = "tcp"
    agents(cfg)
    srv = start_server(llama, port, udp=True)
    assert run_client(chat, port, udp=True)["errors"] == {"EPERM": 1}
    srv.popen.kill()


def test_dns_allowed_unless_denied(cgroups, agents):
    """Port 53 to a governed resolver: allowed by default, denied with dns: deny (no real DNS traffic needed:
    the verdict is taken at sendmsg time, before anything leaves the host; the target is loopback)."""
    chat = cgroups.child("chat")
    cfg = base_config(cgroups, 18000, dns_resolvers=["127.0.0.53"])
    cfg["identities"].append({"name": "resolver", "kind": "external", "endpoints": ["127.0.0.53/32:53"]})
    agent = agents(cfg)
    res = run_client(chat, 53, host="127.0.0.53", udp=True, timeout=0.3)
    assert "EPERM" not in res["errors"]
    agent.reload({**cfg, "dns": "deny"})
    assert run_client(chat, 53, host="127.0.0.53", udp=True, timeout=0.3)["errors"] == {"EPERM": 1}


def test_process_selector(cgroups, agents, tmp_path):
    """A process identity (exe/cmdline globs) is assigned at exec and wins over the cgroup's."""
    port = free_port()
    rogue, llama = cgroups.child("rogue"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cfg["identities"][0]["select"]["processes"] = [{"cmdline": f"*workloads.py client*--port {port}*--timeout 3.5*",
                                                          "uids": [0]}]
    agent = agents(cfg)
    srv = start_server(llama, port, name="llama")
    # same cgroup (unmanaged), the command line makes it "chat"
    deadline = time.monotonic() + 5
    while True:
        res = run_client(rogue, port, timeout=3.5)
        if res["ok"] == 1 or time.monotonic() > deadline:
            break
    assert res["ok"] == 1, res
    recs = agent.records_where(lambda r: r["destination"]["port"] == port and r["verdict"] == "allowed")
    assert recs and recs[-1]["source"]["name"] == "chat"
    srv.popen.kill()


def test_a_port_rebound_by_another_workload_loses_the_old_identity(cgroups, agents):
    """post_bind: llama binds the port, exits; an unmanaged process binds it: the port is no longer llama's."""
    port = free_port()
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    agent = agents(base_config(cgroups, port))
    first = start_server(llama, port, name="llama", count=1)
    assert run_client(chat, port)["answers"] == {"llama": 1}
    first.popen.wait(10)
    second = start_server(rogue, port, name="squatter", count=1)
    assert run_client(chat, port)["answers"] == {"squatter": 1}
    recs = agent.records_where(lambda r: r["destination"]["port"] == port and r["source"]["name"] == "chat")
    deadline = time.monotonic() + 5
    while len(recs) < 2 and time.monotonic() < deadline:
        recs = agent.records_where(lambda r: r["destination"]["port"] == port and r["source"]["name"] == "chat")
    assert [r["destination"]["name"] for r in recs] == ["llama", "unmanaged"]
    second.popen.kill()


def test_connections_are_counted_in_the_kernel_and_plain_allows_make_no_ring_event(cgroups, agents):
    """Without a flow log, an allowed connect costs no decision event: aimesh_connections_total reads the kernel's
    per-identity counts at scrape time, exact for allowed and denied alike."""
    port = free_port()
    chat, batch, llama = (cgroups.child(n) for n in ("chat", "batch", "llama"))
    agent = agents(base_config(cgroups, port), flow_log=False)
    srv = start_server(llama, port, name="llama", count=0)
    try:
        assert run_client(chat, port, count=25)["ok"] == 25
        assert run_client(batch, port, count=7)["errors"] == {"EPERM": 7}
        time.sleep(0.2)
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_connections_total", source="chat", destination="llama", verdict="allowed") == 25
        assert metric_value(m, "aimesh_connections_total", source="batch", destination="llama", verdict="denied") == 7
        assert metric_value(m, "aimesh_ring_events_total", ring="decision_events") == 7   # the denials only
    finally:
        srv.popen.kill()
