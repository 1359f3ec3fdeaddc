"""Section `flows`: how many new connections per second the agent can report to the collector with none lost.

A collector (`python -m agent collector`, SQLite WAL in the temporary directory) listens on loopback; one agent
governs `flows/gov` and exports to it (`collector.address`, spool in the temporary directory, agent id
`aimesh-bench-<pid>`). A client and a server in `flows/gov/{client,server}` — both governed, so every connection
yields two flow records at close: the client's socket and the server's accepted socket. Step by step, the client
opens and resets connections at a paced rate (loadgen `crate`; rate 0 = as fast as it goes), then the bench waits
until the exporter has sent everything it was given and the collector's row count stops moving, and compares the
rows stored for this agent id (sqlite3, read-only) with 2 × the connections made. Loss counters say where records
went: the kernel ring (aimesh_flow_records_lost_total{stage="kernel_ring_full"}, aimesh_events_lost_total), the
exporter (aimesh_export_records_total{outcome=dropped_*|rejected|invalid}) or the collector (sent, not stored).

Then the collector's own ingest rate: pre-encoded FlowBatch messages (agent/_gen aimesh.v1) pushed with a plain
gRPC client, timed from the first push to the last reply.
"""
from __future__ import annotations

import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

from bench import agents, cgroups, host, loadgen
from bench.configs import AgentConfigSpec
from bench.context import Context, distinct_ports
from bench.made import Made

RECORDS_PER_CONNECTION = 2   # both ends governed: the client's socket and the server's accepted socket
KEPT_UP_PCT = 10             # a step counts as kept up with when less than this % of its records was still unread
CONTENDED_PCT = 15           # other processes took more than this % of the agent's CPU during a burst
OUTCOMES = ("submitted", "sent", "dropped_queue_full", "dropped_spool_full", "rejected", "invalid")


def _m(m: dict, name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return m.get(key, 0.0)


def counters(m: dict) -> dict[str, float]:
    """The agent's export and loss counters from one scrape."""
    out = {o: _m(m, "aimesh_export_records_total", outcome=o) for o in OUTCOMES}
    out["kernel_ring_full"] = _m(m, "aimesh_flow_records_lost_total", stage="kernel_ring_full")
    out["udp_table_full"] = _m(m, "aimesh_flow_records_lost_total", stage="udp_table_full")
    out["decision_events_lost"] = _m(m, "aimesh_events_lost_total", ring="decision_events")
    out["agent_events_lost"] = _m(m, "aimesh_events_lost_total", ring="agent_events")
    out["queue"] = _m(m, "aimesh_export_queue_records")
    out["backlog_batches"] = (_m(m, "aimesh_export_backlog_batches", where="memory")
                              + _m(m, "aimesh_export_backlog_batches", where="spool"))
    out["export_errors"] = _m(m, "aimesh_export_errors_total")
    return out


def stored(db: Path, agent_id: str) -> int:
    """Rows the collector holds for agent_id (a read-only connection; WAL lets it read while the collector writes)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT count(*) FROM flows WHERE agent_id = ?", (agent_id,)).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def wait_drained(agent: agents.AgentProc, db: Path, agent_id: str, timeout_s: float = 90.0) -> tuple[float, dict]:
    """Until everything the exporter was given is sent or dropped, its queue is empty, and the submitted and stored
    counts held still for a second: (seconds waited, last counters)."""
    t0 = time.monotonic()
    last: Optional[tuple] = None
    still_since = time.monotonic()
    c = counters(agents.scrape(agent))
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.25)
        c = counters(agents.scrape(agent))
        done = c["sent"] + c["dropped_queue_full"] + c["dropped_spool_full"] + c["rejected"] + c["invalid"]
        now = (c["submitted"], stored(db, agent_id))
        if now != last:
            last, still_since = now, time.monotonic()
        if done >= c["submitted"] and c["queue"] == 0 and c["backlog_batches"] == 0 \
                and time.monotonic() - still_since >= 1.0:
            break
    return time.monotonic() - t0, c


def where_it_broke(d: dict, missing_from_agent: int, overflows: int) -> str:
    """Where the missing records went, from the loss counters; `missing_from_agent`: expected - submitted."""
    if d["kernel_ring_full"]:
        return (f"kernel flow ring full: {d['kernel_ring_full']:.0f} records lost (the agent reads the ring too "
                "slowly)")
    if missing_from_agent and overflows:
        return (f"{overflows} connections overflowed the server's accept queue (no server socket, so one record "
                f"each); {missing_from_agent} records never reached the agent")
    if d["dropped_queue_full"]:
        return f"exporter queue full: {d['dropped_queue_full']:.0f} records dropped"
    if d["dropped_spool_full"]:
        return f"exporter spool full: {d['dropped_spool_full']:.0f} records dropped"
    if d["rejected"] or d["invalid"]:
        return f"collector rejected {d['rejected']:.0f}, invalid {d['invalid']:.0f}"
    if missing_from_agent:
        return f"{missing_from_agent} records never reached the agent, and no loss counter moved"
    return "records missing without a loss counter"


def token_file(ctx: Context) -> Path:
    """The collector's bearer token, shared with the agent, `aimesh flows` and the ingest clients."""
    return ctx.tmpdir / "collector.token"


def start_collector(ctx: Context, made: Made, cgroup: Path, port: int, metrics_port: int, db: Path) -> tuple:
    from agent.collector.auth import load_or_create_token
    load_or_create_token(token_file(ctx))      # before the agent starts: it reads the file at once
    argv = [str(ctx.python()), "-m", "agent", "collector", "--listen", f"127.0.0.1:{port}", "--db", str(db),
            "--metrics", f"127.0.0.1:{metrics_port}", "--token-file", str(token_file(ctx))]
    line = loadgen.shell_line(cgroup, ctx.opts.workload_cpu, argv)
    log = open(ctx.tmpdir / "collector.log", "wb")
    try:
        p = subprocess.Popen(["sh", "-c", line], cwd=ctx.opts.agent_tree, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    made.procs.append(p)
    deadline = time.monotonic() + 60
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"collector exited with {p.returncode}: "
                               f"{(ctx.tmpdir / 'collector.log').read_text(errors='replace')[-400:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("collector did not listen within 60 s") from None
            time.sleep(0.1)
    return p, line


def run(ctx: Context, made: Made) -> dict:
    opts = ctx.opts
    top = ctx.tree.root / "flows"
    made.cgroup_tops.append(top)
    cgroups.add_groups(ctx.tree, ["flows/gov"])
    coll_cg = cgroups.add_dir(ctx.tree, top / "collector")
    server_port, coll_port, coll_metrics = distinct_ports(3)
    db = ctx.tmpdir / "flows.db"
    agent_id = f"aimesh-bench-{ctx.pid}"
    collector, coll_line = start_collector(ctx, made, coll_cg, coll_port, coll_metrics, db)
    coll_ps = psutil.Process(collector.pid)
    spec = AgentConfigSpec("flows", ctx.rel(ctx.tree.group("flows/gov")), server_port, 10,
                           collector={"address": f"127.0.0.1:{coll_port}", "spool_dir": str(ctx.tmpdir / "spool"),
                                      "token_file": str(token_file(ctx))})
    ctx.say(f"  collector on 127.0.0.1:{coll_port} (CPU {opts.workload_cpu}); starting the agent (CPU "
            f"{opts.agent_cpu}) …")
    ready = ctx.start_agents([(spec, ctx.tree.group("flows/gov"))], made, {"flows": ("--agent-id", agent_id)})
    agent = next(a for a in made.agents if a.name == "flows")
    agent_yaml = (ctx.tmpdir / "flows.yaml").read_text()
    server_line = loadgen.shell_line(ctx.tree.leaf("flows/gov", "server"), opts.workload_cpu,
                                     loadgen.server_argv(ctx.lg, server_port))
    server = loadgen.start_server(server_line)
    made.servers.append(server)
    client_cg = ctx.tree.leaf("flows/gov", "client")

    steps: list[dict] = []
    fails_in_a_row = 0
    best: Optional[dict] = None
    first_fail: Optional[dict] = None
    rates = list(opts.flow_rates)
    i = 0
    while i < len(rates):
        rate = rates[i]
        i += 1
        n = int(max(2000, (rate or 20000) * opts.flow_step_s))
        step = one_step(ctx, agent, coll_ps, db, agent_id, client_cg, server_port, rate, n)
        if step["lost"] and step["others_pct"] > CONTENDED_PCT:
            ctx.say(f"  target {rate:.0f}/s lost {step['lost']:,} records while other processes took "
                    f"{step['others_pct']:.0f}% of the agent's CPU: once more")
            step["retry_of_contended"] = True
            steps.append(step)
            step = one_step(ctx, agent, coll_ps, db, agent_id, client_cg, server_port, rate, n)
        steps.append(step)
        ok = step["lost"] == 0
        ctx.say(f"  target {('%.0f/s' % rate) if rate else 'open loop':>9}: {step['connections']:,} connections at "
                f"{step['achieved_per_s']:,.0f}/s → {step['stored']:,} of {step['expected']:,} records stored "
                f"({'0 lost' if ok else str(step['lost']) + ' lost: ' + step['where']}); agent CPU "
                f"{step['agent_cpu_pct_burst']:.0f}% during the burst, {step['agent_us_per_record']:.1f} µs/record; "
                f"RSS {step['agent_rss_bytes'] / 1e6:.0f} MB; drained in {step['drain_s']:.1f}s")
        if ok:
            fails_in_a_row = 0
            if best is None or step["achieved_per_s"] > best["achieved_per_s"]:
                best = step
        else:
            fails_in_a_row += 1
            if first_fail is None:
                first_fail = step
                # one step halfway between the best pass and this first failure, once
                if best is not None and rate and opts.flow_refine and rate > best["target_per_s"] * 1.3:
                    rates.insert(i, round((best["achieved_per_s"] + step["achieved_per_s"]) / 2, -2))
            if fails_in_a_row >= 2:
                break
    sample = subprocess.run([str(ctx.python()), "-m", "agent", "flows", "--collector", f"127.0.0.1:{coll_port}",
                             "--token-file", str(token_file(ctx)), "-o", "json", "--limit", "2"],
                            cwd=opts.agent_tree, capture_output=True, text=True,
                            timeout=30)     # the agent's last two records, before the ingest runs add others
    ingest = collector_ingest(ctx, coll_port, db, coll_ps)
    return report(ctx, steps, best, first_fail, ingest, {
        "collector": coll_line, "server": server_line, "agent": agent.argv, "agent_config": agent_yaml,
        "clients": [s["command"] for s in steps],
        "flows_sample": f"{ctx.python()} -m agent flows --collector 127.0.0.1:{coll_port} -o json --limit 2",
        "count": f"sqlite3 'file:{db}?mode=ro' \"SELECT count(*) FROM flows WHERE agent_id = '{agent_id}'\"",
    }, ready, sample.stdout.strip().splitlines()[:2])


def one_step(ctx: Context, agent, coll_ps, db: Path, agent_id: str, client_cg: Path, port: int, rate: float,
             n: int) -> dict:
    host.wait_quiet(ctx.opts.quiet_threshold, ctx.opts.quiet_max_wait_s)
    line = loadgen.shell_line(client_cg, ctx.opts.workload_cpu, loadgen.crate_argv(ctx.lg, port, n, rate))
    c0 = counters(agents.scrape(agent))
    s0 = stored(db, agent_id)
    u0, k0 = agents.usage(agent), agents.usage_of(coll_ps)
    agent_cpu = ctx.opts.agent_cpu
    l0 = host.listen_counters()
    b0 = host.cpu_times(agent_cpu)
    f0, kw0 = host.cpu_fields(agent_cpu) if agent_cpu is not None else {}, host.kernel_thread_cpu_s()
    t0 = time.monotonic()
    out = loadgen.run_client(line, 600)
    burst_s = time.monotonic() - t0
    u1 = agents.usage(agent)
    b1 = host.cpu_times(agent_cpu)
    f1, kw1 = host.cpu_fields(agent_cpu) if agent_cpu is not None else {}, host.kernel_thread_cpu_s()
    c_end = counters(agents.scrape(agent))
    l1 = host.listen_counters()
    drain_s, c1 = wait_drained(agent, db, agent_id)
    u2, k2 = agents.usage(agent), agents.usage_of(coll_ps)
    s1 = stored(db, agent_id)
    d = {k: c1[k] - c0[k] for k in c0 if k not in ("queue", "backlog_batches")}
    conns = int(out["n"])
    expected = RECORDS_PER_CONNECTION * conns
    got = s1 - s0
    cpu_all = u2.cpu_s - u0.cpu_s
    read_by_end = int(c_end["submitted"] - c0["submitted"])
    step = {
        "target_per_s": rate, "connections": conns, "achieved_per_s": out["rate_per_s"],
        # records the agent had not read yet when the client finished: what the ring (and the exporter queue behind
        # it) had to hold; a step the agent keeps up with ends with little of it
        "behind_at_end": expected - read_by_end, "behind_at_end_pct": 100 * (expected - read_by_end) / expected,
        # how busy the agent's CPU was during the burst, whoever used it (other tenants share the machine)
        "agent_cpu_busy_pct_all": 100 * host.busy_fraction(b0, b1),
        "others_pct": 100 * host.busy_fraction(b0, b1) - 100 * (u1.cpu_s - u0.cpu_s) / burst_s,
        "agent_cpu_ticks_burst": {k: f1[k] - f0.get(k, 0) for k in f1},
        "kworker_cpu_s_burst": kw1 - kw0,
        "late_1ms": out.get("late_1ms"), "expected": expected, "stored": got, "lost": expected - got,
        "submitted": int(d["submitted"]), "sent": int(d["sent"]), "counters": d,
        "burst_s": burst_s, "drain_s": drain_s,
        "agent_cpu_pct_burst": 100 * (u1.cpu_s - u0.cpu_s) / burst_s,
        "agent_cpu_s": cpu_all,
        "agent_us_per_record": 1e6 * cpu_all / max(1, int(d["submitted"])),
        "agent_rss_bytes": u2.rss_bytes,
        "collector_cpu_s": (k2.cpu_s - k0.cpu_s) if (k0 and k2) else None,
        "command": line,
        "client": out,
    }
    step["listen_overflows"] = l1.get("ListenOverflows", 0) - l0.get("ListenOverflows", 0)
    step["decision_events_lost"] = int(d["decision_events_lost"])
    step["where"] = where_it_broke(d, expected - step["submitted"], step["listen_overflows"]) if step["lost"] else ""
    return step


def sample_record():
    from agent.export.records import FlowRecordData, IdentityData, to_proto
    now = time.time_ns()
    return to_proto(FlowRecordData(
        agent_id="bench-ingest", node="bench", cookie=1, kind=1, start_time_unix_nano=now - 1_000_000,
        end_time_unix_nano=now, source=IdentityData("chat-ui", "service", ""),
        destination=IdentityData("llm", "model", "2"), actual_destination=IdentityData("llm", "model", "2"),
        source_address="10.0.0.12", source_port=43122, destination_address="10.0.0.40", destination_port=8000,
        dialed_address="10.0.0.40", dialed_port=8000, protocol=6, hook=1, verdict=1, reason=1, rule_id=3,
        bytes_sent=1834, bytes_received=48213, packets_sent=9, packets_received=14, duration_ns=1_000_000,
        srtt_us=42, retransmits=0, pid=4242, comm="python3"))


def push_batches(address: str, batches: list[bytes], clients: int, token: str) -> tuple[float, int]:
    """Push pre-encoded FlowBatch messages over `clients` channels in parallel: (seconds, records accepted)."""
    import grpc
    from agent._gen.aimesh.v1 import collector_pb2
    accepted = [0] * clients
    errors: list[str] = []
    chans = [grpc.insecure_channel(address) for _ in range(clients)]
    try:
        for ch in chans:
            grpc.channel_ready_future(ch).result(timeout=10)
        calls = [ch.unary_unary("/aimesh.v1.FlowCollector/Push", request_serializer=None,
                                response_deserializer=collector_pb2.PushReply.FromString) for ch in chans]

        def worker(k: int) -> None:
            try:
                for b in batches[k::clients]:
                    accepted[k] += calls[k](b, timeout=60, metadata=(("authorization", f"Bearer {token}"),)).accepted
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    finally:
        for ch in chans:
            ch.close()
    if errors:
        raise RuntimeError(f"push failed: {errors[0]}")
    return elapsed, sum(accepted)


def collector_ingest(ctx: Context, port: int, db: Path, coll_ps) -> list[dict]:
    """The bench process itself is the client, moved to the agent CPU (the agent is idle by now) so that the
    collector has the workload CPU to itself."""
    import os
    affinity = os.sched_getaffinity(0)
    if ctx.opts.agent_cpu is not None:
        os.sched_setaffinity(0, {ctx.opts.agent_cpu})
    try:
        return _ingest(ctx, port, db, coll_ps)
    finally:
        os.sched_setaffinity(0, affinity)


def _ingest(ctx: Context, port: int, db: Path, coll_ps) -> list[dict]:
    from agent._gen.aimesh.v1 import collector_pb2
    rec = sample_record()
    out = []
    seq = 0
    for batch_size in ctx.opts.ingest_batches:
        for clients in (1, 4):
            agent_id = f"bench-ingest-{ctx.pid}-b{batch_size}-c{clients}"
            batches = []
            for _ in range(max(1, ctx.opts.ingest_records // batch_size)):
                b = collector_pb2.FlowBatch(agent_id=agent_id, sequence=seq)
                seq += 1
                for j in range(batch_size):
                    r = b.records.add()
                    r.CopyFrom(rec)
                    r.agent_id = agent_id
                    r.cookie = seq * 100_000 + j
                batches.append(b.SerializeToString())
            host.wait_quiet(ctx.opts.quiet_threshold, ctx.opts.quiet_max_wait_s)
            k0 = agents.usage_of(coll_ps)
            elapsed, accepted = push_batches(f"127.0.0.1:{port}", batches, clients,
                                             token_file(ctx).read_text().strip())
            k1 = agents.usage_of(coll_ps)
            time.sleep(0.2)
            rows = stored(db, agent_id)
            row = {"batch_records": batch_size, "clients": clients, "batches": len(batches),
                   "records": batch_size * len(batches), "accepted": accepted, "stored": rows,
                   "seconds": elapsed, "rows_per_s": accepted / elapsed, "batch_bytes": len(batches[0]),
                   "collector_cpu_s": (k1.cpu_s - k0.cpu_s) if (k0 and k1) else None}
            out.append(row)
            ctx.say(f"  collector ingest: {row['records']:,} records in batches of {batch_size:,} "
                    f"({row['batch_bytes'] / 1e3:.0f} kB), {clients} client{'s' if clients > 1 else ''}: "
                    f"{row['rows_per_s']:,.0f} rows/s; collector CPU {row['collector_cpu_s'] or 0:.2f}s; "
                    f"{rows:,} rows stored")
    return out


def report(ctx: Context, steps: list[dict], best: Optional[dict], first_fail: Optional[dict], ingest: list[dict],
           commands: dict, ready: dict, sample: list[str]) -> dict:
    ctx.say()
    ctx.say(f"flows — connect+close bursts of ~{ctx.opts.flow_step_s:.0f}s at increasing rates; {RECORDS_PER_CONNECTION} "
            f"records expected per connection (client and server sockets both governed); agent on CPU "
            f"{ctx.opts.agent_cpu}, client, server and collector on CPU {ctx.opts.workload_cpu}")
    head = (f"  {'target/s':>9} {'achieved/s':>11} {'conns':>8} {'records':>9} {'stored':>9} {'lost':>7} "
            f"{'behind':>7} {'agent CPU%':>10} {'others%':>8} {'µs/rec':>7} {'RSS MB':>7} {'coll CPU s':>10} "
            f"{'drain s':>8} {'decisions lost':>15}  where")
    ctx.say(head)
    for s in steps:
        ctx.say(f"  {('%.0f' % s['target_per_s']) if s['target_per_s'] else 'max':>9} {s['achieved_per_s']:>11,.0f} "
                f"{s['connections']:>8,} {s['expected']:>9,} {s['stored']:>9,} {s['lost']:>7,} "
                f"{s['behind_at_end_pct']:>6.0f}% {s['agent_cpu_pct_burst']:>10.0f} "
                f"{s['others_pct']:>7.0f}{'*' if s['others_pct'] > CONTENDED_PCT else ' '}"
                f"{s['agent_us_per_record']:>7.1f} "
                f"{s['agent_rss_bytes'] / 1e6:>7.0f} {s['collector_cpu_s'] or 0:>10.2f} {s['drain_s']:>8.1f} "
                f"{s['decision_events_lost']:>15,}  {s['where'] or '-'}")
    ctx.say("  behind: records not yet read from the kernel ring when the client finished, % of the step's; agent "
            "CPU%: the agent's CPU time over the burst; others%: the rest of its CPU's busy time (other tenants, "
            f"kworkers; * above {CONTENDED_PCT}%: the agent had less than a CPU); µs/rec: agent CPU over burst + "
            "drain per record; decisions lost: connect decisions dropped because the decision ring was full "
            "(aimesh_events_lost_total{ring=\"decision_events\"}: not flow records, but the flow log's lines)")
    ctx.say()
    kept = [s for s in steps if s["lost"] == 0 and s["behind_at_end_pct"] < KEPT_UP_PCT]
    kept_best = max(kept, key=lambda s: s["achieved_per_s"]) if kept else None
    if kept_best:
        ctx.say(f"  highest rate the agent kept up with (0 lost, < {KEPT_UP_PCT}% behind at the end of the burst): "
                f"{kept_best['achieved_per_s']:,.0f} connections/s = "
                f"{kept_best['achieved_per_s'] * RECORDS_PER_CONNECTION:,.0f} records/s")
    if best:
        per_rec = best["agent_us_per_record"]
        ctx.say(f"  highest rate with 0 lost (bursts of {ctx.opts.flow_step_s:.0f}s): {best['achieved_per_s']:,.0f} "
                f"connections/s = "
                f"{best['achieved_per_s'] * RECORDS_PER_CONNECTION:,.0f} flow records/s; agent "
                f"{best['agent_cpu_pct_burst']:.0f}% of a CPU during the burst, RSS {best['agent_rss_bytes'] / 1e6:.0f} "
                f"MB; {per_rec:.1f} µs of agent CPU per record (burst + drain) → at most "
                f"~{1e6 / per_rec:,.0f} records/s per agent core")
    else:
        ctx.say("  no step finished with 0 lost")
    if first_fail:
        ctx.say(f"  first loss at {first_fail['achieved_per_s']:,.0f} connections/s: {first_fail['where']}")
    elif steps:
        top = max(steps, key=lambda s: s["achieved_per_s"])
        per_core = 1e6 / top["agent_us_per_record"]
        client_limited = not top["target_per_s"] or top["achieved_per_s"] < 0.97 * top["target_per_s"]
        ctx.say(f"  no loss up to the highest rate reached ({top['achieved_per_s']:,.0f}/s"
                + (", the load generator's limit on one CPU with the agent's programs in the path" if client_limited
                   else "") +
                f"); the agent used {top['agent_cpu_pct_burst']:.0f}% of its CPU there: at "
                f"{top['agent_us_per_record']:.1f} µs per record one core handles ~{per_core:,.0f} records/s "
                f"(~{per_core / RECORDS_PER_CONNECTION:,.0f} connections/s)"
                + (", so the agent is near its own limit too" if top["agent_cpu_pct_burst"] > 80 else ""))
    goal = 100_000
    reached = best["achieved_per_s"] * RECORDS_PER_CONNECTION if best else 0
    ctx.say(f"  {'PASS' if reached >= goal else 'MISS'}  ≥ {goal:,} flow records/s per node with 0 lost: "
            f"{reached:,.0f} records/s reached")
    if ingest:
        best_ingest = max(ingest, key=lambda r: r["rows_per_s"])
        ctx.say(f"  collector ingest: up to {best_ingest['rows_per_s']:,.0f} rows/s (batches of "
                f"{best_ingest['batch_records']:,}, {best_ingest['clients']} client(s))")
    return {"steps": steps, "best": best, "kept_up_best": kept_best, "first_loss": first_fail, "ingest": ingest,
            "agent_ready_s": ready,
            "records_per_connection": RECORDS_PER_CONNECTION, "goal_records_per_s": goal,
            "reached_records_per_s": reached, "commands": commands, "collector_sample": sample}
