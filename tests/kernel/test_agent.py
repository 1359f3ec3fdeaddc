"""The agent as a process: ingress from another host, identities for new cgroups, SIGHUP, SIGTERM, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from agent.kernel.registry import CGROUP_PROGRAMS
from tests.kernel.harness import REPO, attached_programs, free_port, run_client, start_server
from tests.kernel.netns import NetnsHost
from tests.kernel.test_enforce import base_config


@pytest.fixture
def testhost():
    h = NetnsHost()
    try:
        yield h
    finally:
        h.remove()


@pytest.mark.parametrize("v6", [False, True])
def test_ingress_from_remote_source(cgroups, agents, testhost, v6):
    port = free_port()
    llama = cgroups.child("llama")
    allowed_src, world_src = (testhost.addrs6 if v6 else testhost.addrs)[:2]
    server_addr = testhost.host_addr6 if v6 else testhost.host_addr
    cfg = base_config(cgroups, port)
    cfg["identities"].append({"name": "lab", "kind": "external",
                              "endpoints": [f"[{allowed_src}/128]" if v6 else f"{allowed_src}/32"]})
    cfg["policies"].append({"from": "lab", "to": "llama", "ports": [port]})
    agent = agents(cfg)
    srv = start_server(llama, port, name="llama", host="::" if v6 else "0.0.0.0")
    ok = run_client(None, port, host=server_addr, bind=allowed_src, netns=testhost.ns, timeout=2)
    assert ok["ok"] == 1 and ok["answers"] == {"llama": 1}, ok
    dropped = run_client(None, port, host=server_addr, bind=world_src, netns=testhost.ns, timeout=1.5)
    assert dropped["ok"] == 0 and list(dropped["errors"]) == ["timeout"], dropped
    recs = [r for r in agent.flows(wait_for=2) if r["hook"] == "ingress" and r["destination"]["port"] == port]
    seen = {(r["source"]["name"], r["source"]["address"], r["destination"]["name"], r["verdict"]) for r in recs}
    assert ("lab", allowed_src, "llama", "allowed") in seen
    assert ("world", world_src, "llama", "denied") in seen
    srv.popen.kill()


def test_new_cgroup_gets_identity(cgroups, agents):
    port = free_port()
    llama = cgroups.child("llama")
    agent = agents(base_config(cgroups, port))
    srv = start_server(llama, port, name="llama")
    t0 = time.monotonic()
    chat = cgroups.child("chat")        # created after the agent started
    time.sleep(0.1)
    res = run_client(chat, port)
    waited = 0.1
    while res["ok"] != 1 and waited < 5:  # the brief asks for 100 ms; retry only to report, never to hide
        time.sleep(0.1)
        waited = time.monotonic() - t0
        res = run_client(chat, port)
    assert res["ok"] == 1, agent.log()
    assert waited <= 0.1 + 1e-9 or pytest.fail(f"identity took {waited:.2f}s to apply")
    srv.popen.kill()


def test_sighup_good_and_bad_config(cgroups, agents):
    port = free_port()
    batch, llama = cgroups.child("batch"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    agent = agents(cfg)
    srv = start_server(llama, port, name="llama")
    assert run_client(batch, port)["errors"] == {"EPERM": 1}

    good = base_config(cgroups, port)
    good["policies"].append({"from": "batch", "to": "llama", "ports": [port]})
    agent.reload(good)
    assert run_client(batch, port)["ok"] == 1

    bad = base_config(cgroups, port)
    bad["identities"][2]["kind"] = "modle"
    agent.reload(bad, expect="config reload rejected")
    assert "identities.2.kind" in agent.log() and "'modle'" in agent.log()
    assert run_client(batch, port)["ok"] == 1, "the previous policy must stay in force"

    agent.reload("policies: [ {from: nobody, to: llama} ]", expect="config reload rejected")
    assert "policies.0.from: unknown identity 'nobody'" in agent.log()
    assert run_client(batch, port)["ok"] == 1

    agent.reload(cfg)  # back to the first config: batch denied again
    assert run_client(batch, port)["errors"] == {"EPERM": 1}
    _, metrics = agent.get("/metrics")
    assert 'aimesh_config_reloads_total{result="ok"} 2.0' in metrics
    assert 'aimesh_config_reloads_total{result="failed"} 2.0' in metrics
    srv.popen.kill()


def test_sigterm_leaves_the_datapath_in_force_and_uninstall_removes_exactly_it(cgroups, agents):
    agent = agents(base_config(cgroups, 18000))
    names = attached_programs(cgroups.root)
    assert len(names) == len(CGROUP_PROGRAMS) and all(n.startswith("aimesh_") for n in names)
    assert agent.get("/healthz")[0] == 200
    assert agent.stop() == 0
    assert sorted(attached_programs(cgroups.root)) == sorted(names)   # a rollout keeps enforcing
    r = _aimesh("uninstall", "--cgroup-root", str(cgroups.root))
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout and "links/connect4" in r.stdout
    assert attached_programs(cgroups.root) == []
    assert not pinned_dir(cgroups.root).exists()


def test_a_second_agent_on_the_same_root_refuses(cgroups, agents, tmp_path):
    """One datapath per root: a second agent would otherwise stack a second set of programs next to the first."""
    agents(base_config(cgroups, 18000))
    (tmp_path / "second").mkdir()
    cfg = tmp_path / "second" / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(cgroups, 18000)))
    r = _aimesh("agent", "--config", str(cfg), "--cgroup-root", str(cgroups.root), "--metrics-addr",
                f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "another aimesh agent is running" in r.stderr and "Traceback" not in r.stderr
    assert len(attached_programs(cgroups.root)) == len(CGROUP_PROGRAMS)


def pinned_dir(root):
    from agent.identity.cgroups import cgroup_id
    from agent.kernel.pins import DatapathDir
    return DatapathDir.for_root(cgroup_id(root)).path


def _aimesh(*args, user=None):
    cmd = [sys.executable, "-m", "agent", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_clear_errors(cgroups, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("mode: enforce\n")
    r = _aimesh("agent", "--config", str(good), user=65534)
    assert r.returncode == 2 and "must run as root" in r.stderr and "Traceback" not in r.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: enforse\n")
    r = _aimesh("agent", "--config", str(bad))
    assert r.returncode == 2 and "mode" in r.stderr and "'enforse'" in r.stderr and "Traceback" not in r.stderr

    r = _aimesh("agent", "--config", str(good), "--cgroup-root", "/tmp")
    assert r.returncode == 2 and "not inside the cgroup2 mount" in r.stderr

    r = _aimesh("agent", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    assert attached_programs(cgroups.root) == []


def test_a_vanished_cgroup_root_degrades_health(cgroups, tmp_path):
    """The agent governs a subtree that is then removed: /healthz turns degraded and says why."""
    from tests.kernel.harness import start_agent
    sub = cgroups.child("sub")
    agent = start_agent(tmp_path, sub, base_config(cgroups, 18000))
    try:
        sub.rmdir()
        deadline = time.monotonic() + 5
        while True:
            code, body = agent.get("/healthz")
            if code == 503 and "cgroup root gone" in body:
                break
            assert time.monotonic() < deadline, (code, body)
            time.sleep(0.2)
        assert agent.get("/livez")[0] == 200          # alive, but not ready
        assert "is gone: nothing is enforced there" in agent.log()
    finally:
        agent.stop()
        # the datapath's pins outlive the cgroup: remove them by the id the agent used
        import json
        import subprocess
        import sys as _sys
        st = json.loads(subprocess.run([_sys.executable, "-m", "agent", "status", "-o", "json"], capture_output=True,
                                       text=True, cwd=REPO).stdout)
        from agent.kernel.install import uninstall
        from agent.kernel.pins import DatapathDir
        from pathlib import Path
        for d in st:
            if (d.get("manifest") or {}).get("cgroup_root") == str(sub):
                uninstall(DatapathDir(Path(d["path"])))


def test_a_changed_collector_section_is_refused_on_reload(cgroups, agents):
    cfg = base_config(cgroups, 18000)
    agent = agents(cfg)
    changed = dict(cfg, collector={"address": "127.0.0.1:1", "spool_dir": None})
    agent.reload(changed, expect="config reload rejected")
    assert "collector: changed" in agent.log()
    _, metrics = agent.get("/metrics")
    assert 'aimesh_config_reloads_total{result="failed"} 1.0' in metrics
