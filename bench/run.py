"""`python -m bench.run`: what aimesh costs on the datapath, how that scales, and how many flows it can report.

Sections (all by default, or some with --only), in one process tree, one after another, each with its own agents:
  paths  five paths between two local processes over 127.0.0.1 TCP, interleaved rounds: no agent, agent with
         enforcement only, agent with the fast path, an HAProxy in the path (a sidecar's hop), and an nft REDIRECT
         to that proxy (a classic sidecar mesh's interception). RR, connect+close, bulk; mesh process CPU and RSS.
  scale  RR and connect+close against policy rules (10 … 100k) and watched cgroups (10 … 10k), interleaved; agent
         RSS against the number of workloads.
  flows  the highest connection rate whose flow records all reach the collector; the collector's ingest rate.
Targets are printed PASS/MISS and the exit status is 0 whatever they say (a benchmark informs, it does not gate);
an error in a section is reported, the other sections still run, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench import cgroups, flows, loadgen, paths, scale
from bench.context import REPO, Context, Options
from bench.made import Made, cleanup

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"
SECTIONS: dict[str, Callable[[Context, Made], dict]] = {"paths": paths.run, "scale": scale.run, "flows": flows.run}


class Interrupted(Exception):
    pass


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


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


def options_dict(opts: Options) -> dict:
    from dataclasses import asdict
    d = asdict(opts)
    d["results_path"], d["agent_tree"] = str(opts.results_path), str(opts.agent_tree)
    return d


def run(opts: Options, made: Made, results: dict) -> int:
    """Make the subtree, the temporary directory and the load generator; run each section with its own `Made`,
    cleaned up when the section ends (its agents must not cost the next section anything)."""
    from agent.identity.cgroups import cgroup2_mount

    pid = os.getpid()
    mount = cgroup2_mount()
    made.tree = tree = cgroups.create_tree(mount, f"aimesh-bench-{pid}", [])
    made.tmpdir = tmpdir = Path(tempfile.mkdtemp(prefix="aimesh-bench-"))
    lg = loadgen.build(tmpdir, opts.python_loadgen)
    ctx = Context(opts=opts, lg=lg, tree=tree, tmpdir=tmpdir, pid=pid)
    src = provenance(opts.agent_tree)
    where = (f"{opts.agent_tree} at {src['head'][:10]} + {len(src['uncommitted'])} uncommitted files under agent/ "
             "bpf/" if src.get("head") else str(opts.agent_tree))
    ctx.say(f"aimesh bench: sections {', '.join(opts.sections)}; agent from {where}; load generator {lg.kind}"
            f"{' (' + lg.note + ')' if lg.note else ''}; subtree {tree.root}; workload on CPU {opts.workload_cpu}, "
            f"agents on CPU {opts.agent_cpu}")
    results["agent_source"] = src
    results["subtree"] = str(tree.root)
    results["loadgen"] = {"kind": lg.kind, "note": lg.note, "compile": lg.build, "source": str(loadgen.C_SOURCE),
                          "binary_note": "built in a temporary directory removed at the end; rebuild it with the "
                                         "compile command and rerun the recorded lines by hand (bench/README.md)"}
    results["sections"] = {}
    code = 0
    for name in opts.sections:
        ctx.say()
        ctx.say(f"== {name} ==")
        section = Made()
        made.sections.append(section)
        t0 = time.monotonic()
        try:
            results["sections"][name] = SECTIONS[name](ctx, section)
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as e:  # setup or load-generator failure: say what, go on with the next section
            ctx.say(f"bench: {name}: error: {e}")
            results["sections"][name] = {"error": str(e)}
            code = 1
        finally:
            for problem in cleanup(section, tree):
                print(f"bench: cleanup ({name}): {problem}", file=sys.stderr)
            made.sections.remove(section)
        results["sections"].setdefault(name, {})["seconds"] = round(time.monotonic() - t0, 1)
        ctx.say(f"  ({name}: {time.monotonic() - t0:.0f}s)")
    print_commands(ctx, results["sections"])
    return code


def print_commands(ctx: Context, sections: dict) -> None:
    """The lines that produced the figures, as run (cgroups and the binary are gone afterwards: see README)."""
    ctx.say()
    ctx.say("command lines (each client prints one JSON line; rerun by hand as bench/README.md shows)")
    if ctx.lg.build:
        ctx.say(f"  compile: {' '.join(ctx.lg.build)}")
    for name in ("paths", "scale"):
        cmds = sections.get(name, {}).get("commands", {}).get("clients_and_servers", {})
        for path, lines in cmds.items():
            for kind, line in lines.items():
                ctx.say(f"  {name}/{path} {kind}: {line}")
    pc = sections.get("paths", {}).get("commands", {})
    for n, h in pc.get("haproxy", {}).items():
        ctx.say(f"  paths/{n} haproxy: {h['line']}")
    for line in pc.get("netns", [])[:2] + pc.get("nft", [])[:1]:
        ctx.say(f"  paths/redirect setup: {line}")
    if pc.get("nft_ruleset"):
        ctx.say("  paths/redirect ruleset: " + " ".join(pc["nft_ruleset"].split()))
    fc = sections.get("flows", {}).get("commands", {})
    for key in ("collector", "server"):
        if key in fc:
            ctx.say(f"  flows {key}: {fc[key]}")
    for line in fc.get("clients", []):
        ctx.say(f"  flows client: {line}")
    if "count" in fc:
        ctx.say(f"  flows count: {fc['count']}")


def _cpu(v: str, cpus: int) -> Optional[int]:
    return None if v == "none" or cpus < 2 else int(v)


def parse_args(argv: Optional[Sequence[str]]) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="paths,scale,flows",
                   help="comma-separated sections to run: paths, scale, flows (default: all, in that order)")
    g = p.add_argument_group("paths")
    g.add_argument("--rounds", type=int, default=15, help="rounds of the paths section")
    g.add_argument("--rr-n", type=int, default=20000, help="ping-pongs per RR run")
    g.add_argument("--rr-size", type=int, default=64, help="bytes per RR message")
    g.add_argument("--crr-n", type=int, default=5000, help="connect+close per run")
    g.add_argument("--bulk-mib", type=int, default=256, help="MiB per bulk run (one connection, one way)")
    g.add_argument("--proxy-cpu", default="1", help="CPU for the HAProxy processes ('none' to not pin)")
    g.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the BPF run-time stats phase after the paths rounds")
    g = p.add_argument_group("scale")
    g.add_argument("--scale-rounds", type=int, default=20)
    g.add_argument("--rules", type=int, nargs="+", default=[10, 1000, 100_000], help="policy entries per agent")
    g.add_argument("--watched", type=int, nargs="+", default=[10, 1000, 10_000], help="watched cgroups per agent")
    g.add_argument("--workloads", type=int, nargs="+", default=[10, 1000], help="sleeping workloads, RSS agents")
    g = p.add_argument_group("flows")
    g.add_argument("--flow-rates", type=float, nargs="+", default=[2000, 5000, 10000, 20000, 0],
                   help="connect+close targets per second, in order (0: as fast as the client goes)")
    g.add_argument("--flow-step", type=float, default=8.0, help="seconds per rate step")
    g.add_argument("--no-refine", dest="refine", action="store_false",
                   help="do not add a step between the last rate without loss and the first with")
    g.add_argument("--ingest-records", type=int, default=50_000, help="records per collector ingest run")
    g.add_argument("--ingest-batches", type=int, nargs="+", default=[500, 5000], help="records per pushed batch")
    g = p.add_argument_group("all sections")
    g.add_argument("--workload-cpu", default="1", help="CPU for clients, servers, collector ('none': not pinned)")
    g.add_argument("--agent-cpu", default="0", help="CPU for the agents ('none' to not pin)")
    g.add_argument("--quiet", type=float, default=0.15,
                   help="before each round wait (up to --quiet-wait s) until the host is below this busy")
    g.add_argument("--quiet-wait", type=float, default=3.0)
    g.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    g.add_argument("--python-loadgen", action="store_true", help="use bench/pyloadgen.py even when cc exists")
    g.add_argument("--agent-tree", type=Path, default=REPO,
                   help="run the agent from this checkout (its agent/ and bpf/), e.g. a `git archive` of another "
                        "commit, to compare datapath versions with the same bench")
    a = p.parse_args(argv)
    sections = tuple(s.strip() for s in a.only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        p.error(f"--only: unknown section(s) {', '.join(bad) or '(none given)'}; known: {', '.join(SECTIONS)}")
    if min(a.rounds, a.scale_rounds, a.rr_n, a.crr_n, a.bulk_mib) < 1 or not a.rules or not a.watched:
        p.error("--rounds, --scale-rounds, --rr-n, --crr-n, --bulk-mib must be >= 1")
    cpus = os.cpu_count() or 1
    return Options(
        sections=sections,
        rounds=a.rounds,
        workload=loadgen.Workload(rr_n=a.rr_n, rr_size=a.rr_size, rr_warmup=max(100, a.rr_n // 20),
                                  crr_n=a.crr_n, crr_warmup=max(50, a.crr_n // 25), bulk_bytes=a.bulk_mib * 2**20),
        proxy_cpu=_cpu(a.proxy_cpu, cpus), profile=a.profile,
        scale_rounds=a.scale_rounds, scale_rules=tuple(sorted(set(a.rules))),
        scale_watched=tuple(sorted(set(a.watched))), scale_workloads=tuple(sorted(set(a.workloads))),
        flow_rates=tuple(a.flow_rates), flow_step_s=a.flow_step, flow_refine=a.refine,
        ingest_records=a.ingest_records, ingest_batches=tuple(a.ingest_batches),
        workload_cpu=_cpu(a.workload_cpu, cpus), agent_cpu=_cpu(a.agent_cpu, cpus),
        quiet_threshold=a.quiet, quiet_max_wait_s=a.quiet_wait, agent_timeout_s=180.0,
        results_path=a.results, python_loadgen=a.python_loadgen, agent_tree=a.agent_tree.resolve())


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it starts agents, proxies and makes cgroups)", file=sys.stderr)
        return 1
    made = Made()
    results: dict = {
        "started": datetime.now(timezone.utc).isoformat(),
        "command": [sys.executable, "-m", "bench.run"] + list(sys.argv[1:] if argv is None else argv),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "options": options_dict(opts),
    }
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 0
    t0 = time.monotonic()
    try:
        code = run(opts, made, results)
    except (KeyboardInterrupt, Interrupted):
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        code = 130
    except Exception as e:  # setup failure before any section: say what, clean up, exit 1
        print(f"bench: error: {e}", file=sys.stderr)
        code = 1
    finally:
        for s in old:      # a second Ctrl-C must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        try:
            problems = cleanup(made)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        for pr in problems:
            print(f"bench: cleanup: {pr}", file=sys.stderr)
    if code != 130 and results.get("sections"):
        results["finished"] = datetime.now(timezone.utc).isoformat()
        results["seconds"] = round(time.monotonic() - t0, 1)
        opts.results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\nall figures, per-round values and the exact command lines: {opts.results_path} "
              f"({results['seconds']:.0f}s in all)")
    return code


if __name__ == "__main__":
    sys.exit(main())
