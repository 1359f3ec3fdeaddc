"""Section `scale`: does the datapath stay flat as the policy and the node grow?

Interleaved rounds (RR and connect+close, no bulk) over one agent per size, each on its own subtree
`scale/<name>`, all with the agent's default config (fast path on):
  base    the smallest: 10 policy entries, 10 watched cgroups
  r1k …   more policy entries (dummies between identities no workload has), 10 watched cgroups
  c1k …   10 policy entries, more watched cgroups: empty cgroups `scale/<name>/idle-N` that exist before the agent
          starts and all carry the identity `watched` through one glob
  none    no agent, for reference
Ratios are to `base`. Besides, two agents that take no part in the rounds measure RSS against the number of
workloads: `scale/wl<N>/wl-I` are N cgroups, each with its own identity and one sleeping process.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench import agents, cgroups, rounds, stats
from bench.configs import WATCHED_PREFIX, WORKLOAD_PREFIX, AgentConfigSpec
from bench.context import Context, count_label, distinct_ports
from bench.made import Made

BASE = "base"
RSS_LIMIT_BYTES = 150e6
CGROUP_ENTRIES = 'aimesh_map_entries{map="cgroup_identity"}'
COLUMNS = [stats.Column("rr_median_us", "RR median µs", 18), stats.Column("rr_p99_us", "RR p99 µs", 18),
           stats.Column("connect_rate", "connect+close/s", 20), stats.Column("connect_time_us", "connect µs", 18)]


def plan(rules: tuple[int, ...], watched: tuple[int, ...]) -> list[tuple[str, str, int, int]]:
    """(name, label, policy entries, watched cgroups) of every measured agent: the smallest of both, then each
    larger rule count at the fewest cgroups, then each larger cgroup count at the fewest rules."""
    r0, w0 = min(rules), min(watched)
    out = [(BASE, f"{r0:,} rules, {w0:,} cgroups", r0, w0)]
    out += [(f"r{count_label(n)}", f"{n:,} rules, {w0:,} cgroups", n, w0) for n in sorted(rules) if n != r0]
    out += [(f"c{count_label(n)}", f"{r0:,} rules, {n:,} cgroups", r0, n) for n in sorted(watched) if n != w0]
    return out


def spawn_workloads(tree: cgroups.BenchTree, parent: Path, n: int, made: Made) -> None:
    """n sleeping processes, each moved into its own cgroup parent/wl-I (made here)."""
    dirs = cgroups.add_many(tree, parent, [f"{WORKLOAD_PREFIX}{i}" for i in range(n)])
    for d in dirs:
        p = subprocess.Popen(["sleep", "86400"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        made.procs.append(p)
        (d / "cgroup.procs").write_text(str(p.pid))


def run(ctx: Context, made: Made) -> dict:
    opts = ctx.opts
    top = ctx.tree.root / "scale"
    made.cgroup_tops.append(top)
    sizes = plan(opts.scale_rules, opts.scale_watched)
    names = ["none"] + [s[0] for s in sizes]
    wl_names = [f"wl{count_label(n)}" for n in opts.scale_workloads]
    cgroups.add_groups(ctx.tree, [f"scale/{n}" for n in names + wl_names])
    t0 = time.monotonic()
    total_watched = 0
    for name, _, _, watched in sizes:
        cgroups.add_many(ctx.tree, ctx.tree.group(f"scale/{name}"), [f"{WATCHED_PREFIX}{i}" for i in range(watched)])
        total_watched += watched
    for name, n in zip(wl_names, opts.scale_workloads):
        spawn_workloads(ctx.tree, ctx.tree.group(f"scale/{name}"), n, made)
    ctx.say(f"  made {total_watched:,} watched cgroups and {sum(opts.scale_workloads):,} workload cgroups with a "
            f"sleeping process each in {time.monotonic() - t0:.1f}s")
    ports = dict(zip(names + wl_names, distinct_ports(len(names) + len(wl_names))))
    specs: dict[str, AgentConfigSpec] = {}
    labels = {"none": "no agent"}
    for name, label, entries, watched in sizes:
        specs[name] = AgentConfigSpec(name, ctx.rel(ctx.tree.group(f"scale/{name}")), ports[name], entries,
                                      watched_cgroups=watched)
        labels[name] = label
    for name, n in zip(wl_names, opts.scale_workloads):
        specs[name] = AgentConfigSpec(name, ctx.rel(ctx.tree.group(f"scale/{name}")), ports[name], min(opts.scale_rules),
                                      workloads=n)
        labels[name] = f"{n:,} workloads"
    ctx.say(f"  starting {len(specs)} agents at once on CPU {opts.agent_cpu} …")
    ready = ctx.start_agents([(s, ctx.tree.group(f"scale/{n}")) for n, s in specs.items()], made)
    ctx.say("  ready: " + ", ".join(f"{n} in {s:.1f}s" for n, s in ready.items()))
    by_name = {a.name: a for a in made.agents}
    routes = [rounds.Route("none", labels["none"], "scale/none", ports["none"], ports["none"])]
    routes += [rounds.Route(n, labels[n], f"scale/{n}", ports[n], ports[n], agent=specs[n], meter=n)
               for n, *_ in sizes]
    meters = rounds.Meters({n: a.ps for n, a in by_name.items()})
    settings = rounds.RoundSettings(workload=opts.workload, workload_cpu=opts.workload_cpu,
                                    quiet_threshold=opts.quiet_threshold, quiet_max_wait_s=opts.quiet_max_wait_s,
                                    client_timeout_s=120.0 if opts.python_loadgen else 60.0, kinds=("rr", "crr"))
    lines = {r.name: rounds.lines_for(r, ctx.tree, ctx.lg, settings) for r in routes}
    results, rounds_s = rounds.run_rounds(routes, lines, opts.scale_rounds, settings, made, meters, ctx.say)
    usage = {n: agents.usage(a) for n, a in by_name.items()}
    metrics = {n: agents.scrape(a) for n, a in by_name.items()}
    return report(ctx, routes, results, rounds_s, usage, metrics, ready, labels, wl_names, specs, lines)


def report(ctx: Context, routes, results, rounds_s, usage, metrics, ready, labels, wl_names, specs, lines) -> dict:
    opts, w = ctx.opts, ctx.opts.workload
    order = [r.name for r in routes]
    summaries = {n: stats.summarize(results, n) for n in order}
    ratios = stats.all_ratios(results, summaries, [(n, BASE) for n in order if n != BASE])
    cells = {}
    for n in specs:
        u = usage.get(n)
        m = metrics.get(n, {})
        cells[n] = {"RSS MB": f"{u.rss_bytes / 1e6:.0f}" if u else "?", "ready s": f"{ready.get(n, 0):.1f}",
                    "cgroups known": f"{m.get(CGROUP_ENTRIES, float('nan')):,.0f}"}
    ctx.say()
    ctx.say(f"scale — {opts.scale_rounds} rounds × {len(order)} agents, interleaved; medians across rounds, "
            f"(paired-median ratio to {labels[BASE]}); {rounds_s:.0f}s of rounds; RR {w.rr_n} × {w.rr_size} B, "
            f"connect+close {w.crr_n}; agent default config (fast path on)")
    ctx.say()
    ctx.say(stats.render_table(summaries, ratios, order, labels, COLUMNS, BASE, cells,
                               (("RSS MB", 9), ("ready s", 9), ("cgroups known", 15))))
    ctx.say()
    ctx.say(f"per-round paired ratios to {labels[BASE]}, min–max")
    ctx.say(stats.render_spread(ratios, order, labels, ["rr_median_us", "connect_time_us"], BASE))
    tg = []
    for n in order:
        if n in (BASE, "none"):
            continue
        tg.append(stats.Target(f"RR median, {labels[n]} ≤ 1.05× smallest", "rr_median_us", n, BASE, 1.05))
        tg.append(stats.Target(f"connect time, {labels[n]} ≤ 1.05× smallest", "connect_time_us", n, BASE, 1.05))
    text, rows = stats.render_targets(tg, ratios)
    ctx.say()
    ctx.say("targets (informational, the exit status is 0 either way)")
    ctx.say(text)
    rss_rows = []
    wl_rss = {n: usage[n].rss_bytes for n in wl_names if usage.get(n)}
    if len(wl_rss) >= 2:
        small, big = wl_names[0], wl_names[-1]
        r = wl_rss[big] / wl_rss[small]
        ok = r <= 1.05
        ctx.say(f"  {'PASS' if ok else 'MISS'}  {'agent RSS, ' + labels[big] + ' ≤ 1.05× ' + labels[small]:<50} "
                f"{r:.3f}×   ({wl_rss[small] / 1e6:.0f} → {wl_rss[big] / 1e6:.0f} MB)")
        rss_rows.append({"target": f"agent RSS, {labels[big]} ≤ 1.05× {labels[small]}", "limit": 1.05,
                         "value": r, "pass": ok})
    for n in wl_names:
        line, row = stats.check(f"agent RSS with {labels[n]} ≤ 150 MB", wl_rss[n] / 1e6 if n in wl_rss else None,
                                RSS_LIMIT_BYTES / 1e6, " MB")
        ctx.say(line)
        rss_rows.append(row)
    lost = {n: sum(v for k, v in m.items() if k.startswith("aimesh_events_lost")) for n, m in metrics.items()}
    if any(lost.values()):
        ctx.say(f"  note: agent events lost: {lost}")
    return {
        "rounds_s": rounds_s,
        "labels": labels,
        "summary": {n: {"median": s.median, "low": s.low, "high": s.high} for n, s in summaries.items()},
        "ratios_to_base": [{"metric": r.metric, "config": r.config, "paired_median": r.paired_median,
                            "paired_min": min(r.paired), "paired_max": max(r.paired)} for r in ratios],
        "targets": rows + rss_rows,
        "agents": {n: {"rss_bytes": usage[n].rss_bytes if usage.get(n) else None, "ready_s": ready.get(n),
                       "policy_entries": specs[n].policy_entries, "watched_cgroups": specs[n].watched_cgroups,
                       "workloads": specs[n].workloads,
                       "cgroup_identity_entries": metrics.get(n, {}).get(CGROUP_ENTRIES),
                       "events_lost": lost.get(n)} for n in specs},
        "commands": {"clients_and_servers": lines},
        "rounds": [r.__dict__ for r in results],
    }
