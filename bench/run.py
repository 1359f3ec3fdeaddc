"""`python -m bench.run`: the datapath's cost, measured between two local processes over 127.0.0.1 TCP.

One run, interleaved rounds. Each round measures every configuration once, in an order rotated per round:
  none    the client and server sit in <mount>/aimesh-bench-<pid>/base/{client,server}: no program runs for them;
  r10     .../r10/{client,server}, governed by an agent attached at .../r10 holding 10 policy entries;
  r100k   .../r100k/{client,server}, governed by a second agent attached at .../r100k holding 100,000.
Both agents run for the whole run (each governs only its own subtree), so the three configurations share every round
and drift of the machine hits all of them alike. Figures are medians across rounds; targets are printed PASS/MISS
and the exit status is 0 whatever they say (a benchmark informs, it does not gate). Setup failures exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from bench import agents, cgroups, host, loadgen, progstats, stats
from bench.configs import AgentConfigSpec, agent_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"


@dataclass(frozen=True)
class Options:
    rounds: int
    workload: loadgen.Workload
    rules: tuple[int, ...]
    workload_cpu: Optional[int]
    agent_cpu: Optional[int]
    quiet_threshold: float
    quiet_max_wait_s: float
    agent_timeout_s: float
    results_path: Path
    python_loadgen: bool
    profile: bool
    agent_tree: Path         # the checkout the agent runs from (its agent/ and bpf/); the repo by default


@dataclass(frozen=True)
class Configuration:
    """One column of the table: where its workload runs and, when governed, the agent's config."""
    name: str
    label: str
    port: int
    agent: Optional[AgentConfigSpec] = None


@dataclass
class Made:
    """Everything this run started or created, so cleanup removes exactly that."""
    tmpdir: Optional[Path] = None
    tree: Optional[cgroups.BenchTree] = None
    agents: list[agents.AgentProc] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)


class Interrupted(Exception):
    pass


# ---- small pure helpers ----
def rules_name(n: int) -> str:
    return f"r{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"r{n}"


def rules_label(n: int) -> str:
    return f"{n // 1000}k rules" if n >= 1000 and n % 1000 == 0 else f"{n:,} rules"


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def expected_decisions(opts: Options) -> int:
    """Connects each governed configuration makes: the RR connection plus every connect+close, per round."""
    w = opts.workload
    return opts.rounds * (1 + w.crr_warmup + w.crr_n)


# ---- setup ----
def plan(tree: cgroups.BenchTree, rules: tuple[int, ...]) -> list[Configuration]:
    ports: list[int] = []
    while len(ports) < 1 + len(rules):
        port = agents.free_port()
        if port not in ports:
            ports.append(port)
    configs = [Configuration(stats.BASELINE, "no agent", ports[0])]
    for n, port in zip(rules, ports[1:]):
        name = rules_name(n)
        spec = AgentConfigSpec(name, tree.relative(tree.group(name)), port, n)
        configs.append(Configuration(name, rules_label(n), port, spec))
    return configs


def agent_python() -> Path:
    venv = REPO / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def start_agents(configs: list[Configuration], tree: cgroups.BenchTree, tmpdir: Path, opts: Options,
                 made: Made) -> dict[str, float]:
    """Start every governed configuration's agent at once; seconds each took to answer /healthz."""
    for c in configs:
        if c.agent is None:
            continue
        cfg_path = tmpdir / f"{c.name}.yaml"
        cfg_path.write_text(to_yaml(agent_config(c.agent)))
        port = agents.free_port()
        argv = agents.agent_argv(agent_python(), cfg_path, tree.group(c.name), port, opts.agent_cpu)
        made.agents.append(agents.start_agent(c.name, argv, port, tmpdir / f"{c.name}.log", opts.agent_tree))
    return {a.name: agents.wait_ready(a, opts.agent_timeout_s) for a in made.agents}


def check_policy_entries(made: Made, configs: list[Configuration]) -> None:
    """The agent's own gauge of policy entries must equal what the config asked for."""
    want = {c.name: c.agent.policy_entries for c in configs if c.agent}
    for a in made.agents:
        got = agents.scrape(a).get('aimesh_map_entries{map="policy_verdict"}')
        if got is not None and int(got) != want[a.name]:
            raise RuntimeError(f"agent {a.name} holds {int(got)} policy entries, expected {want[a.name]}")


# ---- one measurement ----
def lines_for(c: Configuration, tree: cgroups.BenchTree, lg: loadgen.LoadGen, opts: Options) -> dict[str, str]:
    group = "base" if c.agent is None else c.name
    cpu, w = opts.workload_cpu, opts.workload
    return {
        "server": loadgen.shell_line(tree.leaf(group, "server"), cpu, loadgen.server_argv(lg, c.port)),
        "rr": loadgen.shell_line(tree.leaf(group, "client"), cpu, loadgen.rr_argv(lg, c.port, w)),
        "crr": loadgen.shell_line(tree.leaf(group, "client"), cpu, loadgen.crr_argv(lg, c.port, w)),
    }


def timed_client(line: str, timeout: float, agent: Optional[agents.AgentProc]) -> tuple[dict, float]:
    """Run one client to completion: (its JSON, CPU the governing agent used meanwhile, 0 without an agent)."""
    before = agents.usage(agent) if agent else None
    out = loadgen.run_client(line, timeout)
    after = agents.usage(agent) if agent else None
    return out, (after.cpu_s - before.cpu_s) if (before and after) else 0.0


def measure_round(order: list[Configuration], lines: dict[str, dict[str, str]], round_no: int, opts: Options,
                  made: Made, by_name: dict[str, agents.AgentProc]) -> list[stats.RoundResult]:
    """Every configuration's server up; the RR runs back to back, then the connect+close runs; servers down.

    Back to back matters: this VM's host flips between a fast and a ~20 % slower state every few seconds, so
    the runs a paired ratio compares should be as close in time as possible.
    """
    busy, waited = host.wait_quiet(opts.quiet_threshold, opts.quiet_max_wait_s)
    timeout = 120.0 if opts.python_loadgen else 60.0
    servers = []
    try:
        for c in order:
            servers.append(loadgen.start_server(lines[c.name]["server"]))
            made.servers.append(servers[-1])
        rr = {c.name: timed_client(lines[c.name]["rr"], timeout, by_name.get(c.name)) for c in order}
        crr, overflows = {}, {}
        for c in order:
            before = host.listen_counters()
            crr[c.name] = timed_client(lines[c.name]["crr"], timeout, by_name.get(c.name))
            after = host.listen_counters()
            overflows[c.name] = after.get("ListenOverflows", 0) - before.get("ListenOverflows", 0)
    finally:
        for srv in servers:
            loadgen.stop_server(srv)
            made.servers.remove(srv)
    return [stats.RoundResult(round=round_no, position=pos, config=c.name, busy_before=round(busy, 4),
                              quiet_wait_s=round(waited, 3), rr=rr[c.name][0], crr=crr[c.name][0],
                              listen_overflows=overflows[c.name],
                              agent_cpu_s=round(rr[c.name][1] + crr[c.name][1], 4) if c.agent else None)
            for pos, c in enumerate(order)]


def profile(configs: list[Configuration], tree: cgroups.BenchTree, lines: dict[str, dict[str, str]], opts: Options,
            made: Made) -> dict[str, dict]:
    """One extra workload per governed configuration with BPF run-time stats on: ns per program run."""
    fd = progstats.enable_stats()
    if fd is None:
        return {}
    out: dict[str, dict] = {}
    try:
        for c in configs:
            if c.agent is None:
                continue
            before = progstats.counters(tree.group(c.name))
            measure_round([c], lines, -1, opts, made, {})
            out[c.name] = progstats.per_run(before, progstats.counters(tree.group(c.name)))
    finally:
        progstats.disable_stats(fd)
    return out


def progress_line(round_no: int, rounds: int, results: list[stats.RoundResult]) -> str:
    mine = sorted((r for r in results if r.round == round_no), key=lambda r: r.position)
    cells = [f"{r.config} {r.rr['median_us']:.2f}µs {r.crr['rate_per_s']:,.0f}/s" for r in mine]
    busy = max(r.busy_before for r in mine)
    return f"  round {round_no + 1:>2}/{rounds}: " + " | ".join(cells) + f"   (host busy before ≤{busy:.0%})"


# ---- cleanup ----
def cleanup(made: Made) -> list[str]:
    problems: list[str] = []
    for s in list(made.servers):
        loadgen.stop_server(s)
    made.servers.clear()
    for a in made.agents:
        was_running = a.popen.poll() is None
        code = agents.stop_agent(a)
        if was_running and code != 0:
            problems.append(f"agent {a.name} exited with {code} when stopped")
    if made.tree is not None:
        problems += cgroups.remove_tree(made.tree)
    if made.tmpdir is not None:
        shutil.rmtree(made.tmpdir, ignore_errors=True)
    return problems


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ---- the run ----
@dataclass
class RunData:
    """Everything measured, for the report."""
    opts: Options
    lg: loadgen.LoadGen
    tree: cgroups.BenchTree
    configs: list[Configuration]
    lines: dict[str, dict[str, str]]
    ready_s: dict[str, float]
    agent_argv: dict[str, list[str]]
    results: list[stats.RoundResult]
    rounds_s: float
    usage_before: dict[str, Optional[agents.Usage]]
    usage_after: dict[str, Optional[agents.Usage]]
    metrics: dict[str, dict[str, float]]
    prog_cost: dict[str, dict]


def run(opts: Options, made: Made) -> RunData:
    from agent.identity.cgroups import cgroup2_mount

    mount = cgroup2_mount()
    made.tree = tree = cgroups.create_tree(mount, f"aimesh-bench-{os.getpid()}",
                                           ["base"] + [rules_name(n) for n in opts.rules])
    made.tmpdir = tmpdir = Path(tempfile.mkdtemp(prefix="aimesh-bench-"))
    lg = loadgen.build(tmpdir, opts.python_loadgen)
    configs = plan(tree, opts.rules)
    labels = {c.name: c.label for c in configs}

    src = provenance(opts.agent_tree)
    where = (f"{opts.agent_tree} at {src['head'][:10]} + {len(src['uncommitted'])} uncommitted files under "
             "agent/ bpf/" if src.get("head") else str(opts.agent_tree))
    print(f"aimesh bench: agent from {where}; load generator {lg.kind}{' (' + lg.note + ')' if lg.note else ''}; "
          f"subtree {tree.root}; workload on CPU {opts.workload_cpu}, agents on CPU {opts.agent_cpu}")
    print(f"  starting {len(opts.rules)} agents at once (one per rule set, each on its own subtree) …", flush=True)
    ready_s = start_agents(configs, tree, tmpdir, opts, made)
    check_policy_entries(made, configs)
    print("  ready: " + ", ".join(f"{labels[n]} in {s:.1f}s" for n, s in ready_s.items()), flush=True)

    by_name = {a.name: a for a in made.agents}
    usage_before = {a.name: agents.usage(a) for a in made.agents}
    lines = {c.name: lines_for(c, tree, lg, opts) for c in configs}
    results: list[stats.RoundResult] = []
    t0 = time.monotonic()
    for r in range(opts.rounds):
        results += measure_round(rotated(configs, r), lines, r, opts, made, by_name)
        print(progress_line(r, opts.rounds, results), flush=True)
    rounds_s = time.monotonic() - t0
    usage_after = {a.name: agents.usage(a) for a in made.agents}
    metrics = {a.name: agents.scrape(a) for a in made.agents}
    prog_cost = profile(configs, tree, lines, opts, made) if opts.profile else {}
    return RunData(opts=opts, lg=lg, tree=tree, configs=configs, lines=lines, ready_s=ready_s,
                   agent_argv={a.name: a.argv for a in made.agents}, results=results,
                   rounds_s=rounds_s, usage_before=usage_before, usage_after=usage_after, metrics=metrics,
                   prog_cost=prog_cost)


def report(d: RunData) -> dict:
    """Print the table, the targets and the agents' usage; return what results.json holds."""
    opts, w = d.opts, d.opts.workload
    labels = {c.name: c.label for c in d.configs}
    governed = [c.name for c in d.configs if c.agent]
    summaries = {c.name: stats.summarize(d.results, c.name) for c in d.configs}
    ratios = stats.all_ratios(d.results, summaries, governed)
    print()
    print(f"aimesh datapath cost — {opts.rounds} rounds × {len(d.configs)} configurations, interleaved (order "
          f"rotated per round); medians across rounds [min–max]; ratio = median over rounds of (configuration / no "
          f"agent in the same round)")
    print(f"RR: {w.rr_n} × {w.rr_size} B ping-pong on one connection; connect+close: {w.crr_n} × socket/connect/"
          f"close(RST) per round; 127.0.0.1 TCP; client+server on CPU {opts.workload_cpu}, agents on CPU "
          f"{opts.agent_cpu}; both agents running throughout, each on its own subtree; {d.lg.kind} load generator; "
          f"{d.rounds_s:.0f}s of rounds")
    print()
    print(stats.render_table(summaries, ratios, [c.name for c in d.configs], labels))
    print()
    target_text, target_rows = stats.render_targets(stats.targets(governed, labels), ratios)
    print("targets (paired-median ratios as in the table; informational, the exit status is 0 either way)")
    print(target_text)
    print()
    agent_rows = agent_report(d, labels)
    if d.prog_cost:
        print("kernel program cost (BPF run-time stats, one extra workload per agent after the rounds; not in the "
              "table)")
        for name, progs in d.prog_cost.items():
            cells = [f"{v['program']} {v['ns_per_run']:.0f} ns × {v['runs']}" for v in progs.values()]
            print(f"  {labels[name]:>12}: " + ", ".join(cells))
    overflow_runs = sum(1 for x in d.results if x.listen_overflows)
    if overflow_runs:
        print(f"note: {overflow_runs} connect runs saw host-wide accept-queue overflows (a SYN retransmit costs 1 s)")
    busy = len({x.round for x in d.results if x.busy_before > opts.quiet_threshold})
    if busy:
        print(f"note: {busy} of {opts.rounds} rounds started on a host busier than {opts.quiet_threshold:.0%} "
              f"(other tenants); interleaving spreads that over all configurations")
    return {
        "finished": datetime.now(timezone.utc).isoformat(),
        "command": [sys.executable, "-m", "bench.run"] + sys.argv[1:],
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "options": {**asdict(opts), "results_path": str(opts.results_path), "agent_tree": str(opts.agent_tree)},
        "agent_source": provenance(opts.agent_tree),
        "agents_mode": "both agents ran for the whole run, each attached to its own subtree; the no-agent baseline "
                       "ran in an ungoverned sibling subtree",
        "subtree": str(d.tree.root),
        "loadgen": {
            "kind": d.lg.kind, "note": d.lg.note, "compile": d.lg.build, "source": str(loadgen.C_SOURCE),
            "binary_note": "built in a temporary directory removed at the end; rebuild with the compile command "
                           "and rerun these lines by hand (bench/README.md)",
            "commands": d.lines,
        },
        "agents": agent_rows,
        "summary": {name: asdict(s) for name, s in summaries.items()},
        "ratios": [asdict(x) for x in ratios],
        "targets": target_rows,
        "bpf_prog_cost": d.prog_cost,
        "rounds": [asdict(x) for x in d.results],
    }


def provenance(tree: Path) -> dict:
    """Which datapath was measured: HEAD and the uncommitted changes under agent/ and bpf/, when tree is a checkout."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    head = git("rev-parse", "HEAD")
    if not head:
        return {"tree": str(tree), "git": None}
    return {"tree": str(tree), "head": head,
            "uncommitted": git("status", "--porcelain", "--", "agent", "bpf").splitlines()}


def agent_report(d: RunData, labels: dict[str, str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    expected = expected_decisions(d.opts)
    print("agents (psutil; CPU = user+system, all threads)")
    for c in d.configs:
        if c.agent is None:
            continue
        b, e, m = d.usage_before.get(c.name), d.usage_after.get(c.name), d.metrics.get(c.name, {})
        allowed = int(m.get('aimesh_kernel_decisions_total{hook="connect",verdict="allowed"}', -1))
        denied = int(m.get('aimesh_kernel_decisions_total{hook="connect",verdict="denied"}', 0))
        lost = int(sum(v for k, v in m.items() if k.startswith("aimesh_events_lost")))
        own = [x.agent_cpu_s for x in d.results if x.config == c.name and x.agent_cpu_s is not None]
        own_cpu = sum(own)
        row = {
            "argv": d.agent_argv.get(c.name),
            "policy_entries": c.agent.policy_entries, "ready_s": d.ready_s.get(c.name),
            "rss_bytes": e.rss_bytes if e else None,
            "cpu_s_since_start": e.cpu_s if e else None,
            "cpu_s_during_rounds": (e.cpu_s - b.cpu_s) if (b and e) else None,
            "cpu_s_during_own_measurements": own_cpu,
            "cpu_us_per_connect": 1e6 * own_cpu / expected,
            "connects_allowed_by_hook": allowed, "connects_denied_by_hook": denied,
            "connects_expected": expected, "events_lost": lost,
        }
        rows[c.name] = row
        rss = f"{row['rss_bytes'] / 2**20:.0f} MiB" if row["rss_bytes"] else "?"
        rounds_cpu = f"{row['cpu_s_during_rounds']:.2f}" if row["cpu_s_during_rounds"] is not None else "?"
        print(f"  {c.label:>12}: RSS {rss}; CPU {rounds_cpu} s over the {d.rounds_s:.0f} s of rounds, of which "
              f"{own_cpu:.2f} s during its own measurements ≈ {row['cpu_us_per_connect']:.1f} µs per connect "
              f"decision; {row['cpu_s_since_start'] or 0:.1f} s since start (compile and map load included)")
        print(f"  {'':>12}  connects judged by its hook: {allowed} allowed (expected {expected}), {denied} denied, "
              f"{lost} events lost")
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="rounds; each measures every configuration once")
    p.add_argument("--rr-n", type=int, default=20000, help="ping-pongs per round")
    p.add_argument("--rr-size", type=int, default=64, help="bytes per message")
    p.add_argument("--crr-n", type=int, default=5000, help="connect+close per round")
    p.add_argument("--rules", type=int, nargs="+", default=[10, 100_000], help="policy entries, one agent each")
    p.add_argument("--workload-cpu", default="1", help="CPU for client and server (both), or 'none' to not pin")
    p.add_argument("--agent-cpu", default="0", help="CPU for the agents, or 'none' to not pin")
    p.add_argument("--quiet", type=float, default=0.15,
                   help="before each measurement wait (up to --quiet-wait s) until the host is below this busy")
    p.add_argument("--quiet-wait", type=float, default=3.0)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--python-loadgen", action="store_true", help="use bench/pyloadgen.py even when cc exists")
    p.add_argument("--agent-tree", type=Path, default=REPO,
                   help="run the agent from this checkout (its agent/ and bpf/), e.g. a `git archive` of another "
                        "commit, to compare datapath versions with the same bench")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the BPF run-time stats phase after the rounds")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.rr_n < 1 or a.crr_n < 1 or not a.rules:
        p.error("--rounds, --rr-n, --crr-n must be >= 1 and --rules non-empty")
    cpus = os.cpu_count() or 1

    def cpu(v: str) -> Optional[int]:
        return None if v == "none" or cpus < 2 else int(v)

    return Options(
        rounds=a.rounds,
        workload=loadgen.Workload(rr_n=a.rr_n, rr_size=a.rr_size, rr_warmup=max(100, a.rr_n // 20),
                                  crr_n=a.crr_n, crr_warmup=max(50, a.crr_n // 25)),
        rules=tuple(sorted(set(a.rules))), workload_cpu=cpu(a.workload_cpu), agent_cpu=cpu(a.agent_cpu),
        quiet_threshold=a.quiet, quiet_max_wait_s=a.quiet_wait, agent_timeout_s=180.0,
        results_path=a.results, python_loadgen=a.python_loadgen, profile=a.profile,
        agent_tree=a.agent_tree.resolve())


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it starts the agent and makes cgroups)", file=sys.stderr)
        return 1
    made = Made()
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        results = report(run(opts, made))
        opts.results_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nraw per-round figures and the load generator's command lines: {opts.results_path}")
    except (KeyboardInterrupt, Interrupted):
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        code = 130
    except Exception as e:  # setup or load-generator failure: say what, clean up, exit 1
        print(f"bench: error: {e}", file=sys.stderr)
        code = 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        try:
            problems = cleanup(made)
        except KeyboardInterrupt:
            problems = ["cleanup interrupted; rerunning cleanup"]
            problems += cleanup(made)
        for pr in problems:
            print(f"bench: cleanup: {pr}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
