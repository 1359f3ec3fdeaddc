"""Section `paths`: the same client/server pair over five paths, measured in interleaved rounds.

  1 none      no agent: `paths/none/{client,server}`, outside every agent's subtree
  2 enforce   agent with `fast_path: false`, attached at `paths/enforce`: every packet passes the cgroup programs
  3 fast      agent with `fast_path: true` (the default), attached at `paths/fast`: sockhash + sk_msg
  4 proxy     the client dials an HAProxy (tcp mode, one thread) that forwards to the server: a sidecar's hop
  5 redirect  the client dials the server's own port; an nft nat OUTPUT rule, restricted to the client's cgroup,
              redirects it to an HAProxy that forwards to the server: how classic sidecar meshes intercept. This path
              lives in a network namespace of its own, so the NAT hook and connection tracking it needs never touch
              the host's (or another tenant's) traffic, nor the four other paths.

The agents and proxies run for the whole section; the proxies on the workload CPU (a sidecar shares its node), the
agents on the agent CPU.
"""
from __future__ import annotations

import json
import subprocess
from typing import Optional

from bench import agents, cgroups, conformance, loadgen, progstats, proxy, rounds, stats
from bench.configs import AgentConfigSpec
from bench.context import Context, distinct_ports
from bench.made import Made

LABELS = {
    "none": "1 no agent",
    "enforce": "2 agent, enforcement only",
    "fast": "3 agent, fast path",
    "proxy": "4 HAProxy in the path",
    "redirect": "5 nft REDIRECT -> HAProxy",
}
BASELINE = "none"
COLUMNS = [stats.Column("rr_median_us", "RR median µs", 18), stats.Column("rr_p99_us", "RR p99 µs", 18),
           stats.Column("connect_rate", "connect+close/s", 20), stats.Column("bulk_mb_s", "bulk MB/s", 18),
           stats.Column("mesh_cpu_ms", "CPU ms/round", 14)]


def targets() -> list[stats.Target]:
    return [
        stats.Target("RR median, fast path ≤ 0.75× no agent", "rr_median_us", "fast", BASELINE, 0.75),
        stats.Target("RR median, enforcement only ≤ 1.02× no agent", "rr_median_us", "enforce", BASELINE, 1.02),
        stats.Target("connect time, enforcement only ≤ 1.10× no agent", "connect_time_us", "enforce", BASELINE,
                     1.10),
        stats.Target("connect time, fast path ≤ 1.10× no agent", "connect_time_us", "fast", BASELINE, 1.10),
        stats.Target("RR median, HAProxy in the path (expected ~2×)", "rr_median_us", "proxy", BASELINE, 2.0,
                     "info"),
        stats.Target("RR median, nft REDIRECT -> HAProxy (expected ~2×)", "rr_median_us", "redirect", BASELINE,
                     2.0, "info"),
    ]


def _nft_counter(netns: str, table: str) -> Optional[int]:
    """Packets the redirect rule counted: in a nat chain only a connection's first packet passes, so connections."""
    res = subprocess.run(["nsenter", f"--net={loadgen.netns_path(netns)}", "nft", "-j", "list", "table", "ip", table],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None
    try:
        for item in json.loads(res.stdout).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    except (ValueError, KeyError, TypeError):
        return None
    return None


def run(ctx: Context, made: Made) -> dict:
    opts = ctx.opts
    out: dict = {"notes": []}
    top = ctx.tree.root / "paths"
    made.cgroup_tops.append(top)
    names = ["none", "enforce", "fast"]
    try:
        done = proxy.ensure_tools(["haproxy", "nft", "ip", "nsenter"])
        if done:
            ctx.say(f"  installed: {'; '.join(done)}")
            out["installed"] = done
        names += ["proxy", "redirect"]
    except proxy.ProxyError as e:
        ctx.say(f"  paths 4 and 5 skipped: {e}")
        out["notes"].append(f"paths 4 and 5 skipped: {e}")
    cgroups.add_groups(ctx.tree, [f"paths/{n}" for n in names])
    ports = dict(zip(names, distinct_ports(len(names))))
    proxy_ports = distinct_ports(len(names) + 2)[-2:]
    while set(proxy_ports) & set(ports.values()):
        proxy_ports = distinct_ports(len(names) + 2)[-2:]
    conf_names = conformance.scenarios()
    conf_ports = dict(zip(conf_names, distinct_ports(len(conf_names) + len(names))[len(names):]))
    while set(conf_ports.values()) & set(ports.values()):
        conf_ports = dict(zip(conf_names, distinct_ports(len(conf_names) + len(names))[len(names):]))
    extra = tuple(conf_ports.values())
    specs = {
        "enforce": AgentConfigSpec("enforce", ctx.rel(ctx.tree.group("paths/enforce")), ports["enforce"],
                                   10 + len(extra), fast_path=False, extra_ports=extra),
        "fast": AgentConfigSpec("fast", ctx.rel(ctx.tree.group("paths/fast")), ports["fast"], 10 + len(extra),
                                fast_path=True, extra_ports=extra),
    }
    routes = [rounds.Route("none", LABELS["none"], "paths/none", ports["none"], ports["none"]),
              rounds.Route("enforce", LABELS["enforce"], "paths/enforce", ports["enforce"], ports["enforce"],
                           agent=specs["enforce"], meter="enforce"),
              rounds.Route("fast", LABELS["fast"], "paths/fast", ports["fast"], ports["fast"], agent=specs["fast"],
                           meter="fast")]
    proxies: dict[str, proxy.ProxyProc] = {}
    extra_lines: dict[str, object] = {}
    netns = table = None
    if "proxy" in names:
        netns, table = f"aimesh-bench-{ctx.pid}", f"aimesh_bench_{ctx.pid}"
        proxy.create_netns(netns)
        made.netns.append(netns)
        redirect = proxy.Redirect(table=table, netns=netns, cgroup=ctx.tree.leaf("paths/redirect", "client"),
                                  mount=ctx.tree.mount, dport=ports["redirect"], to_port=proxy_ports[1])
        rules_file = ctx.tmpdir / "redirect.nft"
        made.nft_tables.append((netns, table))
        proxy.add_redirect(redirect, rules_file)
        for name, port, ns in (("proxy", proxy_ports[0], None), ("redirect", proxy_ports[1], netns)):
            leaf = cgroups.add_dir(ctx.tree, ctx.tree.group(f"paths/{name}") / "haproxy")
            p = proxy.start_haproxy(name, proxy.haproxy_config([(port, ports[name])]), ctx.tmpdir, leaf,
                                    opts.proxy_cpu, ns, [port])
            made.procs.append(p.popen)
            proxies[name] = p
        routes.append(rounds.Route("proxy", LABELS["proxy"], "paths/proxy", ports["proxy"], proxy_ports[0],
                                   meter="haproxy-proxy"))
        routes.append(rounds.Route("redirect", LABELS["redirect"], "paths/redirect", ports["redirect"],
                                   ports["redirect"], netns=netns, meter="haproxy-redirect"))
        extra_lines = {
            "netns": [f"ip netns add {netns}", f"ip -n {netns} link set lo up", f"ip netns del {netns}"],
            "nft_ruleset": redirect.ruleset(),
            "nft": redirect.command_lines(rules_file),
            "haproxy": {n: {"line": p.line, "config": p.config.read_text()} for n, p in proxies.items()},
        }
    ctx.say(f"  starting 2 agents (enforcement only, fast path) on CPU {opts.agent_cpu}; HAProxy on CPU "
            f"{opts.proxy_cpu} …")
    ready = ctx.start_agents([(specs[n], ctx.tree.group(f"paths/{n}")) for n in ("enforce", "fast")], made)
    by_name = {a.name: a for a in made.agents}
    meters = rounds.Meters({**{n: a.ps for n, a in by_name.items()},
                            **{f"haproxy-{n}": p.ps for n, p in proxies.items()}})
    settings = rounds.RoundSettings(workload=opts.workload, workload_cpu=opts.workload_cpu,
                                    quiet_threshold=opts.quiet_threshold, quiet_max_wait_s=opts.quiet_max_wait_s,
                                    client_timeout_s=120.0 if opts.python_loadgen else 60.0)
    lines = {r.name: rounds.lines_for(r, ctx.tree, ctx.lg, settings) for r in routes}
    ctx.say("  ready: " + ", ".join(f"{LABELS[n]} in {s:.1f}s" for n, s in ready.items()))
    usage_before = {n: agents.usage_of(ps) for n, ps in meters.procs.items()}
    results, rounds_s = rounds.run_rounds(routes, lines, opts.rounds, settings, made, meters, ctx.say)
    usage_after = {n: agents.usage_of(ps) for n, ps in meters.procs.items()}
    metrics = {a.name: agents.scrape(a) for a in made.agents}
    conf = _conformance(ctx, conf_ports)
    redirected = _nft_counter(netns, table) if netns else None
    prog_cost: dict = {}
    if opts.profile:
        fd = progstats.enable_stats()
        if fd is not None:
            try:
                for r in routes:
                    if r.agent is None:
                        continue
                    before = progstats.counters(ctx.tree.group(r.group))
                    rounds.measure_round([r], lines, -1, settings, made, meters)
                    prog_cost[r.name] = progstats.per_run(before, progstats.counters(ctx.tree.group(r.group)))
            finally:
                progstats.disable_stats(fd)
    out.update(report(ctx, routes, results, rounds_s, usage_before, usage_after, metrics, ready, prog_cost,
                      redirected, conf))
    out["commands"] = {"compile": ctx.lg.build, "clients_and_servers": lines, **extra_lines,
                       "agents": {a.name: a.argv for a in made.agents}}
    out["agent_configs"] = {n: (ctx.tmpdir / f"{n}.yaml").read_text() for n in specs}
    return out


def _conformance(ctx: Context, ports: dict[str, int]) -> dict:
    """tests/kernel/conformance.py between the client and server cgroups of paths 1-3, after the rounds (so it
    never disturbs them): per agent path, the scenarios identical to no agent."""
    seen, errors = {}, {}
    for n in ("none", "enforce", "fast"):
        try:
            seen[n] = conformance.run(ctx.python(), ctx.tree.leaf(f"paths/{n}", "client"),
                                      ctx.tree.leaf(f"paths/{n}", "server"), ports)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            errors[n] = str(e)
    return {"compared": conformance.compare(seen, BASELINE) if BASELINE in seen else {}, "errors": errors}


def report(ctx: Context, routes: list[rounds.Route], results: list[stats.RoundResult], rounds_s: float,
           usage_before: dict, usage_after: dict, metrics: dict, ready: dict, prog_cost: dict,
           redirected: Optional[int], conf: Optional[dict] = None) -> dict:
    opts, w = ctx.opts, ctx.opts.workload
    order = [r.name for r in routes]
    labels = {r.name: r.label for r in routes}
    summaries = {n: stats.summarize(results, n) for n in order}
    ratios = stats.all_ratios(results, summaries, [(n, BASELINE) for n in order if n != BASELINE])
    rss = {}
    cpu_total = {}
    for r in routes:
        if r.meter and usage_after.get(r.meter):
            rss[r.name] = usage_after[r.meter].rss_bytes
            b = usage_before.get(r.meter)
            cpu_total[r.name] = usage_after[r.meter].cpu_s - (b.cpu_s if b else 0.0)
    extra = {n: {"RSS MB": f"{rss[n] / 1e6:.0f}"} for n in rss}
    ctx.say()
    ctx.say(f"paths — {opts.rounds} rounds × {len(order)} paths, interleaved (order rotated per round); medians across "
            f"rounds, (paired-median ratio to no agent); {rounds_s:.0f}s of rounds")
    ctx.say(f"  RR: {w.rr_n} × {w.rr_size} B ping-pong on one connection; connect+close: {w.crr_n} × socket/"
            f"connect/close(RST); bulk: {w.bulk_bytes / 2**20:.0f} MiB one way on one connection; 127.0.0.1 TCP; "
            f"client+server on CPU {opts.workload_cpu}, HAProxy on CPU {opts.proxy_cpu}, agents on CPU "
            f"{opts.agent_cpu}; {ctx.lg.kind} load generator")
    ctx.say("  CPU ms/round: the path's agent or HAProxy during the path's own three runs; RSS at the end; ratios "
            "below 1 are better for µs, above 1 for /s and MB/s")
    ctx.say()
    ctx.say(stats.render_table(summaries, ratios, order, labels, COLUMNS, BASELINE, extra, (("RSS MB", 9),)))
    ctx.say()
    ctx.say("per-round paired ratios to no agent, min–max")
    ctx.say(stats.render_spread(ratios, order, labels, ["rr_median_us", "rr_p99_us", "connect_rate", "bulk_mb_s"],
                                BASELINE))
    ctx.say()
    text, rows = stats.render_targets(targets(), ratios)
    ctx.say("targets (paired-median ratios; informational, the exit status is 0 either way)")
    ctx.say(text)
    checks = {}
    for name in ("enforce", "fast"):
        m = metrics.get(name, {})
        checks[name] = {
            "fastpath_sockets": m.get("aimesh_fastpath_sockets_total"),
            "fastpath_messages": m.get("aimesh_fastpath_messages_total"),
            "connects_allowed": m.get('aimesh_kernel_decisions_total{hook="connect",verdict="allowed"}'),
            "events_lost": sum(v for k, v in m.items() if k.startswith("aimesh_events_lost")),
        }
    ctx.say()
    for name in ("enforce", "fast"):
        c = checks[name]
        ctx.say(f"  {labels[name]}: ready in {ready.get(name, 0):.1f}s; fast-path sockets {c['fastpath_sockets']}, "
                f"messages {c['fastpath_messages']}; connects allowed {c['connects_allowed']}; events lost "
                f"{c['events_lost']:.0f}")
    if redirected is not None:
        expected = opts.rounds * (1 + w.crr_warmup + w.crr_n + 1)
        ctx.say(f"  nft REDIRECT rule matched {redirected} connections (path 5 made {expected})")
    for name, progs in prog_cost.items():
        cells = [f"{v['program']} {v['ns_per_run']:.0f} ns × {v['runs']}" for v in progs.values()]
        ctx.say(f"  BPF run time, {labels[name]}: " + ", ".join(cells))
    conf = conf or {"compared": {}, "errors": {}}
    for name in ("enforce", "fast"):      # the speed figures above hold only with what applications see below
        if name in conf["compared"]:
            ctx.say(conformance.line(labels[name], conf["compared"][name]))
        elif name in conf["errors"] or BASELINE in conf["errors"]:
            ctx.say(f"  conformance, {labels[name]}: not measured "
                    f"({conf['errors'].get(name) or conf['errors'].get(BASELINE)})")
    overflow = sum(1 for x in results if x.listen_overflows)
    if overflow:
        ctx.say(f"  note: {overflow} connect runs saw host-wide accept-queue overflows (a SYN retransmit costs 1 s)")
    return {
        "rounds_s": rounds_s,
        "labels": labels,
        "summary": {n: {"median": s.median, "low": s.low, "high": s.high, "lower_quartile": s.lower_quartile}
                    for n, s in summaries.items()},
        "ratios_to_no_agent": [{"metric": r.metric, "path": r.config, "paired_median": r.paired_median,
                                "paired_min": min(r.paired), "paired_max": max(r.paired),
                                "of_medians": r.of_medians} for r in ratios],
        "targets": rows,
        "mesh_process": {n: {"rss_bytes": rss.get(n), "cpu_s_during_rounds": cpu_total.get(n)} for n in order
                         if n in rss},
        "agent_checks": checks,
        "conformance": conf,
        "agents_ready_s": ready,
        "nft_redirected_connections": redirected,
        "bpf_prog_cost": prog_cost,
        "rounds": [r.__dict__ for r in results],
    }
