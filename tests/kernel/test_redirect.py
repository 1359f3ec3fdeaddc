"""Connect-time redirects, weighted splits and model lifecycle, with the dialed address restored."""
from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone

import pytest

from tests.kernel.harness import free_port, run_client, start_server
from tests.kernel.test_enforce import base_config


def _iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_redirect_restores_dialed_address(cgroups, agents, host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    dialed, backend = free_port(family=fam), free_port(family=fam)
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    bracket = f"[{host}]" if ":" in host else host
    cfg = base_config(cgroups, dialed)
    cfg["redirects"] = [{"from": ["chat"], "to": "llama", "backends": [{"address": f"{bracket}:{backend}"}]}]
    # the model is known by its dialed endpoint (nothing listens there)
    cfg["identities"][2]["endpoints"] = [f"[{host}/128]:{dialed}" if ":" in host else f"{host}/32:{dialed}"]
    agent = agents(cfg)
    srv = start_server(llama, backend, name="backend", host=host)
    res = run_client(chat, dialed, host=host)
    assert res["ok"] == 1 and res["answers"] == {"backend": 1}
    assert res["peers"][0] == [host, dialed], "getpeername must report the dialed address"
    rec = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == dialed][0]
    assert rec["verdict"] == "redirected" and rec["redirected"] is True
    assert (rec["destination"]["address"], rec["destination"]["port"]) == (host, dialed)
    assert (rec["actual"]["address"], rec["actual"]["port"]) == (host, backend)
    srv.popen.kill()


def test_udp_redirect_restores_reply_source(cgroups, agents):
    dialed, backend = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    cfg = base_config(cgroups, dialed)
    cfg["policies"][0]["protocol"] = "udp"
    cfg["identities"][2]["endpoints"] = [f"127.0.0.1/32:{dialed}"]
    cfg["redirects"] = [{"from": "chat", "to": "llama", "backends": [{"address": f"127.0.0.1:{backend}"}]}]
    agents(cfg)
    srv = start_server(llama, backend, name="udp-backend", udp=True)
    res = run_client(chat, dialed, udp=True, count=2)
    assert res["ok"] == 2 and res["answers"] == {"udp-backend": 2}
    assert res["peers"][0] == ["127.0.0.1", dialed], "recvfrom must report the dialed address"
    srv.popen.kill()


def test_weighted_split(cgroups, agents):
    dialed, b1, b2 = free_port(), free_port(), free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    cfg = base_config(cgroups, dialed)
    cfg["identities"][2]["endpoints"] = [f"127.0.0.1/32:{dialed}"]
    cfg["redirects"] = [{"from": ["chat"], "to": "llama", "backends": [
        {"address": f"127.0.0.1:{b1}", "weight": 80}, {"address": f"127.0.0.1:{b2}", "weight": 20}]}]
    cfg["identities"].append({"name": "llama-next", "kind": "model", "version": "4.0",
                              "select": {"cgroups": [cgroups.rel(cgroups.root) + "/llama-next"]}})
    agent = agents(cfg)
    s1 = start_server(llama, b1, name="b1")
    s2 = start_server(cgroups.child("llama-next"), b2, name="b2")
    n = 400
    res = run_client(chat, dialed, count=n, timeout=2)
    assert res["ok"] == n, res
    share = res["answers"].get("b1", 0) / n
    # binomial(400, 0.8): sd = 2%; 6 sd either side
    assert 0.68 <= share <= 0.92, res["answers"]
    # each record names the identity that really served the backend it landed on
    recs = [r for r in agent.flows(wait_for=n) if r["destination"]["port"] == dialed]
    landed = {(r["actual"]["port"], r["actual"]["name"], r["actual"]["version"]) for r in recs}
    assert landed == {(b1, "llama", "3.1-8b"), (b2, "llama-next", "4.0")}
    s1.popen.kill()
    s2.popen.kill()


def test_sources_not_listed_are_not_redirected(cgroups, agents):
    port, backend = free_port(), free_port()
    chat, batch, llama = cgroups.child("chat"), cgroups.child("batch"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cfg["policies"].append({"from": "batch", "to": "llama", "ports": [port]})
    cfg["redirects"] = [{"from": ["chat"], "to": "llama", "backends": [{"address": f"127.0.0.1:{backend}"}]}]
    agents(cfg)
    direct = start_server(llama, port, name="direct")
    moved = start_server(llama, backend, name="moved")
    assert run_client(batch, port)["answers"] == {"direct": 1}
    assert run_client(chat, port)["answers"] == {"moved": 1}
    direct.popen.kill()
    moved.popen.kill()


def _lifecycle_config(cg, port, succ_port, sunset, successor_endpoints=True):
    cfg = base_config(cg, port)
    cfg["identities"][2]["deprecated"] = {"sunset": _iso(sunset), "successor": "llama-next"}
    nxt = {"name": "llama-next", "kind": "model", "version": "4.0",
           "select": {"cgroups": [cg.rel(cg.root) + "/llama-next"]}}
    if successor_endpoints:
        nxt["endpoints"] = [f"127.0.0.1/32:{succ_port}"]
    cfg["identities"].append(nxt)
    cfg["policies"].append({"from": "chat", "to": "llama-next", "ports": [succ_port]})
    return cfg


def test_deprecated_before_sunset_is_allowed_and_flagged(cgroups, agents):
    port, succ = free_port(), free_port()
    chat, llama, nxt = cgroups.child("chat"), cgroups.child("llama"), cgroups.child("llama-next")
    agent = agents(_lifecycle_config(cgroups, port, succ, datetime.now(timezone.utc) + timedelta(days=30)))
    old = start_server(llama, port, name="llama-3.1")
    assert run_client(chat, port)["answers"] == {"llama-3.1": 1}
    rec = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == port][0]
    assert rec["verdict"] == "allowed" and rec["deprecated"] is True and rec["lifecycle_redirect"] is False
    _, metrics = agent.get("/metrics")
    assert 'aimesh_deprecated_model_connections_total{destination="llama"' in metrics
    old.popen.kill()


def test_after_sunset_redirects_to_successor(cgroups, agents):
    port, succ = free_port(), free_port()
    chat, llama, nxt = cgroups.child("chat"), cgroups.child("llama"), cgroups.child("llama-next")
    agent = agents(_lifecycle_config(cgroups, port, succ, datetime.now(timezone.utc) - timedelta(days=1)))
    old = start_server(llama, port, name="llama-3.1")
    new = start_server(nxt, succ, name="llama-4.0")
    res = run_client(chat, port)
    assert res["answers"] == {"llama-4.0": 1} and res["peers"][0] == ["127.0.0.1", port]
    rec = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == port][0]
    assert rec["verdict"] == "redirected" and rec["lifecycle_redirect"] is True and rec["deprecated"] is True
    assert (rec["destination"]["name"], rec["actual"]["name"], rec["actual"]["version"]) == \
        ("llama", "llama-next", "4.0")
    old.popen.kill()
    new.popen.kill()


def test_after_sunset_without_successor_backends_is_denied(cgroups, agents):
    port, succ = free_port(), free_port()
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    cfg = _lifecycle_config(cgroups, port, succ, datetime.now(timezone.utc) - timedelta(days=1),
                            successor_endpoints=False)
    agent = agents(cfg)
    old = start_server(llama, port, name="llama-3.1")
    assert run_client(chat, port)["errors"] == {"EPERM": 1}
    rec = [r for r in agent.flows(wait_for=1) if r["destination"]["port"] == port][0]
    assert (rec["verdict"], rec["reason"]) == ("denied", "sunset")
    old.popen.kill()


def test_sunset_passing_while_running(cgroups, agents):
    """The agent recompiles at the sunset instant: allowed before, redirected after, no reload needed."""
    import time
    port, succ = free_port(), free_port()
    chat, llama, nxt = cgroups.child("chat"), cgroups.child("llama"), cgroups.child("llama-next")
    sunset = datetime.now(timezone.utc) + timedelta(seconds=12)
    agent = agents(_lifecycle_config(cgroups, port, succ, sunset))
    old = start_server(llama, port, name="llama-3.1")
    new = start_server(nxt, succ, name="llama-4.0")
    if datetime.now(timezone.utc) < sunset - timedelta(seconds=1):
        assert run_client(chat, port)["answers"] == {"llama-3.1": 1}
    while datetime.now(timezone.utc) < sunset + timedelta(seconds=1):
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while True:
        res = run_client(chat, port)
        if res["answers"] == {"llama-4.0": 1} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res["answers"] == {"llama-4.0": 1}
    old.popen.kill()
    new.popen.kill()


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_sunsets_follow_the_clock_both_ways(cgroups, agents, tmp_path):
    """The agent's wall clock (libfaketime, Debian's faketime: only the agent's process sees it) jumps past a sunset
    and back: redirected to the successor after, served by the deprecated model again before."""
    import os
    import time
    if not os.path.exists(FAKETIME):
        pytest.skip("Debian's faketime is not installed (make setup installs it)")
    port, succ = free_port(), free_port()
    chat, llama, nxt = cgroups.child("chat"), cgroups.child("llama"), cgroups.child("llama-next")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    env = {"LD_PRELOAD": FAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1"}
    agents(_lifecycle_config(cgroups, port, succ, datetime.now(timezone.utc) + timedelta(days=1)), env=env)
    old = start_server(llama, port, name="llama-3.1", count=0, timeout=60)
    new = start_server(nxt, succ, name="llama-4.0", count=0, timeout=60)

    def served_by(want: str) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if run_client(chat, port)["answers"] == {want: 1}:
                return True
            time.sleep(0.2)
        return False
    try:
        assert served_by("llama-3.1")
        clock.write_text("+2d\n")           # past the sunset
        assert served_by("llama-4.0"), "the sunset did not take effect when the clock passed it"
        clock.write_text("+0\n")            # the clock steps back before the sunset
        assert served_by("llama-3.1"), "a clock stepping back did not undo the sunset"
    finally:
        old.popen.kill()
        new.popen.kill()
