"""The datapath outlives the agent: kill -9, SIGTERM, config changes across a crash and program upgrades leave no
instant with a wrong verdict, exactly one set of programs, and the identities of workloads born meanwhile."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.kernel.registry import CGROUP_PROGRAMS
from tests.kernel.harness import REPO, attached_programs, free_port, run_client, start_server
from tests.kernel.test_enforce import base_config

PROBER = Path(__file__).resolve().parent / "prober.py"


def start_prober(cgroup: Path, port: int, duration: float, rate: float = 0) -> subprocess.Popen:
    def enter():
        (cgroup / "cgroup.procs").write_text("0")
    p = subprocess.Popen([sys.executable, str(PROBER), "--port", str(port), "--duration", str(duration),
                          "--rate", str(rate)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter)
    assert p.stdout.readline().startswith('{"started"')
    return p


def prober_result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def pinned(root: Path):
    from agent.identity.cgroups import cgroup_id
    from agent.kernel.pins import DatapathDir
    return DatapathDir.for_root(cgroup_id(root))


def status(root: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "agent", "status", "--cgroup-root", str(root), "-o", "json"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def link_programs(root: Path) -> dict[str, int]:
    return {li["name"]: li["prog_id"] for li in status(root)["links"]}


def _setup(cgroups, port):
    chat, batch, llama = (cgroups.child(n) for n in ("chat", "batch", "llama"))
    srv = start_server(llama, port, name="llama", count=0, timeout=90)
    return chat, batch, llama, srv


def test_kill9_keeps_enforcing_and_the_next_agent_adopts_with_no_gap(cgroups, agents):
    port = free_port()
    chat, batch, llama, srv = _setup(cgroups, port)
    agent = agents(base_config(cgroups, port))
    links = link_programs(cgroups.root)
    allowed, denied = start_prober(chat, port, 6), start_prober(batch, port, 6)
    time.sleep(1.0)
    agent.popen.send_signal(signal.SIGKILL)
    agent.popen.wait()
    time.sleep(1.5)                                  # no agent at all
    assert len(attached_programs(cgroups.root)) == len(CGROUP_PROGRAMS)
    assert status(cgroups.root)["agent_attached"] is False
    agents(base_config(cgroups, port))
    a, d = prober_result(allowed), prober_result(denied)
    assert set(a["counts"]) == {"ok"} and a["counts"]["ok"] > 100, a
    assert set(d["counts"]) == {"EPERM"} and d["counts"]["EPERM"] > 100, d
    names = attached_programs(cgroups.root)
    # one set, not two
    assert len(names) == len(CGROUP_PROGRAMS) and all(n.startswith("aimesh_") for n in names), names
    assert link_programs(cgroups.root) == links     # adopted: the same programs behind the same links
    srv.popen.kill()


def test_a_config_change_across_a_crash_takes_effect(cgroups, agents):
    port = free_port()
    chat, batch, llama, srv = _setup(cgroups, port)
    agent = agents(base_config(cgroups, port))
    assert run_client(batch, port)["errors"] == {"EPERM": 1}
    agent.popen.send_signal(signal.SIGKILL)
    agent.popen.wait()
    assert run_client(batch, port)["errors"] == {"EPERM": 1}          # the last policy holds while no agent runs
    cfg = base_config(cgroups, port)
    cfg["policies"].append({"from": "batch", "to": "llama", "ports": [port]})
    probe = start_prober(batch, port, 4)
    agent2 = agents(cfg)
    t_ready = time.monotonic_ns()
    res = prober_result(probe)
    assert run_client(batch, port)["ok"] == 1
    assert run_client(chat, port)["ok"] == 1
    # denied until the new agent put the new policy in force, allowed from then on: one change, never back
    outcomes = [o for _, o in res["changes"]]
    assert outcomes in (["EPERM", "ok"], ["ok"]), res
    if outcomes == ["EPERM", "ok"]:
        assert res["changes"][1][0] <= t_ready
    assert len(attached_programs(cgroups.root)) == len(CGROUP_PROGRAMS)
    flows = agent2.records_where(lambda r: r["verdict"] == "allowed" and r["source"]["name"] == "batch")
    assert flows
    srv.popen.kill()


def test_sigterm_then_start_has_no_gap(cgroups, agents):
    port = free_port()
    chat, batch, llama, srv = _setup(cgroups, port)
    agent = agents(base_config(cgroups, port))
    allowed, denied = start_prober(chat, port, 5), start_prober(batch, port, 5)
    time.sleep(0.5)
    assert agent.stop() == 0
    time.sleep(1.0)
    agents(base_config(cgroups, port))
    a, d = prober_result(allowed), prober_result(denied)
    assert set(a["counts"]) == {"ok"}, a
    assert set(d["counts"]) == {"EPERM"}, d
    srv.popen.kill()


def test_an_upgrade_swaps_only_the_changed_program_and_keeps_the_maps(cgroups, agents, tmp_path):
    port = free_port()
    chat, batch, llama, srv = _setup(cgroups, port)
    agent = agents(base_config(cgroups, port))
    assert run_client(batch, port)["errors"] == {"EPERM": 1}
    before = link_programs(cgroups.root)
    maps_before = status(cgroups.root)["maps"]
    _, m = agent.get("/metrics")
    denied_before = _metric(m, 'aimesh_kernel_decisions_total{hook="connect",verdict="denied"}')
    assert denied_before >= 1
    # a test copy of bpf/ in which one program (cgroup_skb egress) does something new
    bpf = tmp_path / "bpf"
    shutil.copytree(REPO / "bpf", bpf)
    src = (bpf / "sock_egress.c").read_text()
    assert "int aimesh_egress(struct __sk_buff *skb)\n{\n" in src
    (bpf / "sock_egress.c").write_text(src.replace(
        "int aimesh_egress(struct __sk_buff *skb)\n{\n",
        "int aimesh_egress(struct __sk_buff *skb)\n{\n\tif (skb->len == 0x7fffffff)\n\t\treturn 1;\n"))
    allowed, denied = start_prober(chat, port, 8), start_prober(batch, port, 8)
    time.sleep(0.3)
    agent.stop()
    agent2 = agents(base_config(cgroups, port), extra=["--bpf-root", str(bpf)])
    a, d = prober_result(allowed), prober_result(denied)
    assert set(a["counts"]) == {"ok"}, a
    assert set(d["counts"]) == {"EPERM"}, d
    after = link_programs(cgroups.root)
    assert after.keys() == before.keys()
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"egress"}, changed
    assert "1 swapped" in agent2.log()
    assert status(cgroups.root)["maps"] == maps_before            # same layouts: the same maps, contents kept
    _, m = agent2.get("/metrics")
    assert _metric(m, 'aimesh_kernel_decisions_total{hook="connect",verdict="denied"}') >= denied_before + 100
    assert len(attached_programs(cgroups.root)) == len(CGROUP_PROGRAMS)
    assert len(status(cgroups.root)["builds"]) == 1                # the old build is unpinned
    srv.popen.kill()


def test_workloads_born_while_no_agent_runs_are_classified_after_the_start(cgroups, agents):
    port, gport = free_port(), free_port()
    cfg = base_config(cgroups, port)
    cfg["identities"].append({"name": "gpu", "kind": "model", "select": {"cgroups": [cgroups.rel(cgroups.root)
                                                                                     + "/late*"]}})
    cfg["policies"].append({"from": "chat", "to": "gpu", "ports": [gport]})
    chat, batch = cgroups.child("chat"), cgroups.child("batch")
    agent = agents(cfg)
    agent.popen.send_signal(signal.SIGKILL)
    agent.popen.wait()
    late = cgroups.child("late1")
    srv = start_server(late, gport, name="gpu", count=0, timeout=60)
    # unknown to the kernel until an agent classifies it: served as unmanaged meanwhile
    assert run_client(batch, gport)["ok"] == 1
    agents(cfg)
    deadline = time.monotonic() + 1.0
    while run_client(batch, gport)["errors"] != {"EPERM": 1}:
        assert time.monotonic() < deadline, "the cgroup made while no agent ran was not classified within 1 s"
    assert run_client(chat, gport)["ok"] == 1
    srv.popen.kill()


def test_pins_from_a_future_version_are_refused_and_left_alone(cgroups, agents, tmp_path):
    from agent.kernel.pins import read_manifest, write_manifest
    d = pinned(cgroups.root)
    d.make()
    future = {"format": 99, "aimesh_version": "9.0.0"}
    write_manifest(d, future)
    port = free_port()
    cfgf = tmp_path / "c.yaml"
    import yaml
    cfgf.write_text(yaml.safe_dump(base_config(cgroups, port)))
    r = subprocess.run([sys.executable, "-m", "agent", "agent", "--config", str(cfgf), "--cgroup-root",
                        str(cgroups.root), "--metrics-addr", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "manifest format 99" in r.stderr and "Nothing was changed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert read_manifest(d) == future
    assert attached_programs(cgroups.root) == []
    assert sorted(p.name for p in d.path.iterdir()) == ["links", "maps", "progs", "state"]


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics")


def _export_config(cgroups, port, tmp_path, coll) -> dict:
    return base_config(cgroups, port, collector={"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.2,
                                                 "batch_size": 50, "token_file": str(coll.token_file)},
                       telemetry={"interim_interval": 0, "udp_window": 1})


def _client_records(coll, want: int, timeout: float = 20) -> list:
    """The collector's client-side connection records chat -> llama, once there are want of them (or at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in coll.records() if r.source.name == "chat" and r.destination.name == "llama"
                and r.hook == 1 and not r.interim]
        if len(recs) >= want or time.monotonic() > deadline:
            return recs
        time.sleep(0.3)


def test_every_flow_record_around_a_kill9_reaches_the_collector_exactly_once(cgroups, agents, tmp_path):
    """Records queued in the dead agent, made while no agent ran and made after: each stored once."""
    from tests.kernel.test_collector_e2e import Collector
    coll = Collector(tmp_path, free_port())
    coll.start()
    try:
        port = free_port()
        chat, batch, llama, srv = _setup(cgroups, port)
        cfg = _export_config(cgroups, port, tmp_path, coll)
        extra = ["--collector", f"127.0.0.1:{coll.port}", "--agent-id", "node-k"]
        agent = agents(cfg, extra)
        probe = start_prober(chat, port, 5, rate=1000)   # 2,000 records/s: 1.5 s without agent fit in the ring
        time.sleep(1.5)
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait()
        time.sleep(1.5)
        agents(cfg, extra)
        made = prober_result(probe)["counts"]["ok"]
        client_side = _client_records(coll, made)
        cookies = [r.cookie for r in client_side]
        assert len(cookies) == len(set(cookies)), "a record was stored twice"
        assert len(client_side) == made, f"{made} connections, {len(client_side)} client-side records"
        srv.popen.kill()
    finally:
        coll.stop()


def test_a_kill9_during_a_collector_outage_loses_nothing(cgroups, agents, tmp_path):
    """Records queued while the collector is down are on disk (spool, fsync'd), not in the agent's memory."""
    from tests.kernel.test_collector_e2e import Collector
    coll = Collector(tmp_path, free_port())
    coll.start()
    try:
        port = free_port()
        chat, batch, llama, srv = _setup(cgroups, port)
        cfg = _export_config(cgroups, port, tmp_path, coll)
        extra = ["--collector", f"127.0.0.1:{coll.port}", "--agent-id", "node-o"]
        agent = agents(cfg, extra)
        coll.stop()                                          # the outage
        made = run_client(chat, port, count=300)["ok"]
        assert made == 300
        time.sleep(0.5)                                      # the agent has read and spooled them
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait()
        coll.start()
        agents(cfg, extra)
        client_side = _client_records(coll, made)
        assert len({r.cookie for r in client_side}) == len(client_side) == made
        srv.popen.kill()
    finally:
        coll.stop()


def _stored_calls(coll) -> list:
    """Every stored ModelCall (read-only access to the collector's SQLite file)."""
    import sqlite3
    from agent._gen.aimesh.v1 import model_call_pb2
    con = sqlite3.connect(f"file:{coll.db}?mode=ro", uri=True)
    try:
        return [model_call_pb2.ModelCall.FromString(b) for (b,) in con.execute("SELECT record FROM model_calls")]
    finally:
        con.close()


def _spooled_calls(spool: Path) -> int:
    from agent.export.collector_client import CALLS, read_spool_file
    n = 0
    for path in spool.glob("*.batch"):
        try:
            n += len(read_spool_file(path, CALLS))
        except Exception:  # noqa: BLE001 - gone meanwhile (sent)
            pass
    return n


def test_model_calls_completed_before_a_kill9_reach_the_collector_exactly_once(cgroups, agents, tmp_path):
    """Calls completed while the collector is down are group-committed to the calls spool, not kept in memory: a
    kill -9 right after loses none, the next agent sends each once."""
    from agent.export.collector_client import CALLS_SPOOL
    from tests.kernel.test_capture import model_calls, run_openai, start_llm_server
    from tests.kernel.test_collector_e2e import Collector
    coll = Collector(tmp_path, free_port())
    coll.start()                                            # creates the token file the agent reads
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    records = tmp_path / "records.jsonl"
    spool = tmp_path / "spool"
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
            {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(llama)]}},
        ],
        "policies": [{"from": "chat", "to": "llama"}],
        "collector": {"spool_dir": str(spool), "flush_interval": 0.2, "token_file": str(coll.token_file)},
    }
    extra = ["--collector", f"127.0.0.1:{coll.port}", "--agent-id", "node-c"]
    srv, url = start_llm_server(llama)
    try:
        coll.stop()                                         # the outage
        agent = agents(cfg, extra + ["--records-log", str(records)])
        seen = run_openai(chat, url) + run_openai(chat, url)   # 4 calls on 2 keep-alive connections, all complete
        assert len(model_calls(records, want=4, timeout=20)) == 4
        deadline = time.monotonic() + 20                    # decoded calls reach the disk within a drain turn
        while _spooled_calls(spool / CALLS_SPOOL) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _spooled_calls(spool / CALLS_SPOOL) == 4
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait()
        coll.start()
        agents(cfg, extra)
        deadline = time.monotonic() + 30
        while (list((spool / CALLS_SPOOL).glob("*.batch")) or len(_stored_calls(coll)) < 4) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
        calls = _stored_calls(coll)
        assert not list((spool / CALLS_SPOOL).glob("*.batch"))
        assert len(calls) == 4, [(c.cookie, c.request_model) for c in calls]
        assert sorted(c.request_model for c in calls) == sorted(["llama-3.1-8b", "llama-3.1-8b-s"] * 2)
        assert sorted((c.output_tokens, c.agent_id) for c in calls) == sorted((s["out"], "node-c") for s in seen)
        assert len({(c.cookie, c.start_time_unix_nano) for c in calls}) == 4   # none stored twice
    finally:
        srv.kill()
        srv.wait()
        coll.stop()
