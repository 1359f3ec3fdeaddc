"""`python -m bench.calls`: what model-call capture (bpf/capture.c + agent/l7/) costs, and how fast the agent decodes.

One private cgroup subtree (aimesh-bench-calls-<pid>): the agent governs `gov/`, `free/` is outside it. The agent runs
on CPU 0, every client and server on CPU 1 (--agent-cpu, --workload-cpu). Three parts, in one run:

  latency   client-observed latency of a chat call made with httpx (what openai-python uses) from `gov/chat` to the
            local OpenAI-compatible server (tests/llm_server.py), non-streamed and streamed with include_usage, to two
            servers side by side: `llama-on` (kind model: llm capture auto) and `llama-off` (llm: {protocol: off}).
            Each round is one client process that alternates the two servers call by call; figure: the median call
            time per server per round; ratio: on ÷ off per round, median over rounds.  Target ≤ 1.03×.
  decode    model calls per second one agent core records with 0 lost: a fast C server (`aimesh-lg llmserver`, one
            SSE stream of 20 content chunks + finish + usage + [DONE] per call) in `gov/fast` and C clients
            (`aimesh-lg llmcalls`, pre-built 4 KB streamed chat requests, several processes, keep-alive connections)
            in `gov/load`, paced steps; recorded = the agent's aimesh_model_calls_total delta, lost = sent − recorded,
            and the kernel's capture_losses (ring full, truncated). Figure: the highest achieved rate with every
            call recorded and nothing lost in the kernel, with the agent's CPU.  Target ≥ 5,000/s.
  other     cost to traffic that is not captured: pipe ping-pong and TCP ping-pong (64 B, `aimesh-lg pipe`, `rr`) in
            `gov/work` (a governed service, to `gov/store`, a dataset: capture off) and in `free/` (ungoverned), with
            the agent running (capture on for llama-on) against no agent at all (datapath uninstalled: its syscall
            tracepoints gone). Rounds interleave the two states in rotated order. Targets: governed ≤ 1.02×,
            ungoverned ≤ 1.01×.
Figures are printed as a table and written to bench/calls-results.json; nothing is asserted (exit status 0 unless
a part failed to run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench import agents, host, loadgen, rounds, stats
from bench.local import PY, REPO, LocalBench

DEFAULT_OUT = Path(__file__).resolve().parent / "calls-results.json"

LLM_SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.llm_server import LLMServer
srv = LLMServer().__enter__()
print(srv.url, flush=True)
sys.stdin.read()
"""

# One round of the latency part: alternate the two servers call by call (which one goes first alternates too).
LATENCY_CLIENT = """
import json, statistics, sys, time
import httpx
urls = {"on": sys.argv[1], "off": sys.argv[2]}
n, warmup, first = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
msg = [{"role": "user", "content": "say hello to the kernel"}]
plain_body = {"messages": msg, "model": "llama-3.1-8b"}
stream_body = {"messages": msg, "model": "llama-3.1-8b", "stream": True, "stream_options": {"include_usage": True}}
clients = {k: httpx.Client(base_url=u, timeout=30) for k, u in urls.items()}
def plain(c):
    r = c.post("/v1/chat/completions", json=plain_body)
    r.raise_for_status()
    r.json()
def stream(c):
    with c.stream("POST", "/v1/chat/completions", json=stream_body) as r:
        r.raise_for_status()
        for _ in r.iter_lines():
            pass
out = {}
for kind, call in (("plain", plain), ("stream", stream)):
    times = {"on": [], "off": []}
    for i in range(warmup):
        for c in clients.values():
            call(c)
    for i in range(n):
        for k in (("on", "off") if (i + first) % 2 == 0 else ("off", "on")):
            t0 = time.perf_counter()
            call(clients[k])
            times[k].append(time.perf_counter() - t0)
    out[kind] = {k: {"median_ms": statistics.median(v) * 1e3, "mean_ms": statistics.fmean(v) * 1e3, "n": len(v)}
                 for k, v in times.items()}
print(json.dumps(out))
"""

GROUPS = ("gov/chat", "gov/llama-on", "gov/llama-off", "gov/load", "gov/fast", "gov/work", "gov/store", "free")


@dataclass(frozen=True)
class Settings:
    rounds: int
    latency_calls: int
    latency_warmup: int
    decode_rates: tuple[float, ...]
    decode_step_s: float
    decode_clients: int
    decode_conns: int
    request_bytes: int
    response_chunks: int
    rr_n: int
    rr_size: int
    rr_warmup: int
    agent_cpu: Optional[int]
    workload_cpu: Optional[int]
    fast_path: bool
    parts: tuple[str, ...]
    other_wait_s: float
    agent_tree: Path


def agent_config(b: LocalBench, fast_path: bool) -> dict:
    def sel(g: str) -> dict:
        return {"cgroups": [b.rel(b.root / g)]}
    return {"mode": "enforce", "fast_path": fast_path,
            "identities": [
                {"name": "chat", "kind": "service", "select": sel("gov/chat")},
                {"name": "llama-on", "kind": "model", "select": sel("gov/llama-on")},
                {"name": "llama-off", "kind": "model", "select": sel("gov/llama-off"), "llm": {"protocol": "off"}},
                {"name": "load", "kind": "service", "select": sel("gov/load")},
                {"name": "fast", "kind": "model", "select": sel("gov/fast")},
                {"name": "work", "kind": "service", "select": sel("gov/work")},
                {"name": "store", "kind": "dataset", "select": sel("gov/store")}],
            "policies": [{"from": "chat", "to": ["llama-on", "llama-off"]}, {"from": "load", "to": "fast"},
                         {"from": "work", "to": "store"}],
            "telemetry": {"interim_interval": 0}}


class Run:
    """The subtree, the load generator, the agent (started and stopped by the parts) and what the parts report."""

    def __init__(self, tmp: Path, s: Settings) -> None:
        self.s = s
        self.tmp = tmp
        self.b = LocalBench(tmp, "calls")
        for g in GROUPS:
            self.b.group(g)
        self.gov = self.b.root / "gov"
        self.lg = loadgen.build(tmp)
        if self.lg.kind != "c":
            raise RuntimeError(f"bench.calls needs the C load generator: {self.lg.note}")
        self.cfg_path = tmp / "calls.yaml"
        self.agent: Optional[agents.AgentProc] = None
        self.commands: dict[str, str] = {}

    def pin(self, cpu: Optional[int]) -> list[str]:
        return ["taskset", "-c", str(cpu)] if cpu is not None else []

    def line(self, group: str, argv: list[str]) -> str:
        return loadgen.shell_line(self.b.root / group, self.s.workload_cpu, argv)

    # ---- the agent ----
    def start_agent(self) -> float:
        import yaml
        self.cfg_path.write_text(yaml.safe_dump(agent_config(self.b, self.s.fast_path), sort_keys=False))
        port = agents.free_port()
        argv = agents.agent_argv(Path(PY), self.cfg_path, self.gov, port, self.s.agent_cpu)
        self.commands["agent"] = " ".join(argv)
        self.agent = agents.start_agent("calls", argv, port, self.tmp / "agent.log", self.s.agent_tree)
        self.b.agent = self.agent.popen            # LocalBench.cleanup stops it
        return agents.wait_ready(self.agent, 120)

    def stop_agent(self) -> None:
        """SIGTERM, then remove the pinned datapath: no program, link or tracepoint of ours is left on the host."""
        from agent.identity.cgroups import uninstall_datapath
        if self.agent is not None:
            agents.stop_agent(self.agent)
            self.agent = None
        uninstall_datapath(self.gov)

    def metrics(self) -> dict[str, float]:
        assert self.agent is not None
        return agents.scrape(self.agent)

    def cpu_s(self) -> float:
        assert self.agent is not None
        u = agents.usage(self.agent)
        return u.cpu_s if u else 0.0

    def cleanup(self) -> None:
        from agent.identity.cgroups import uninstall_datapath
        self.b.stop_agent()
        uninstall_datapath(self.gov)
        self.b.cleanup()


def total(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include these."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    out = 0.0
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in want):
            out += v
    return out


def paired_ratio(metric: str, config: str, reference: str, on: list[float], off: list[float],
                 higher_is_better: bool = False) -> stats.Ratio:
    """config ÷ reference per round (the cost: for rates, reference ÷ config), the median of those, and the two
    cross-checks stats.render_targets prints."""
    def r(a: float, b: float) -> float:
        return b / a if higher_is_better else a / b
    paired = [r(a, b) for a, b in zip(on, off)]
    return stats.Ratio(metric=metric, config=config, reference=reference,
                       of_medians=r(statistics.median(on), statistics.median(off)),
                       of_lower_quartiles=r(stats.lower_quartile(on), stats.lower_quartile(off)),
                       paired=paired, paired_median=statistics.median(paired))


# ---- part 1: latency ----
def run_latency(run: Run, say: Callable[[str], None]) -> dict:
    s = run.s
    servers, urls = {}, {}
    for name in ("llama-on", "llama-off"):
        argv = run.pin(s.workload_cpu) + [PY, "-c", LLM_SERVER, str(REPO)]
        p = run.b.spawn(argv, run.b.root / "gov" / name, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)
        servers[name], urls[name] = p, p.stdout.readline().strip()
        if not urls[name]:
            raise RuntimeError(f"llm server {name} did not start")
    before = run.metrics()
    per_round: list[dict] = []
    for r in range(s.rounds):
        host.wait_quiet(0.15, 3.0)
        argv = run.pin(s.workload_cpu) + [PY, "-c", LATENCY_CLIENT, urls["llama-on"], urls["llama-off"],
                                          str(s.latency_calls), str(s.latency_warmup), str(r % 2)]
        p = run.b.spawn(argv, run.b.root / "gov" / "chat", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"latency client failed: {err.strip()[-300:]}")
        per_round.append(json.loads(out.strip().splitlines()[-1]))
        pr = per_round[-1]
        say(f"  latency round {r + 1}/{s.rounds}: non-streamed on {pr['plain']['on']['median_ms']:.3f} ms / off "
            f"{pr['plain']['off']['median_ms']:.3f} ms, streamed on {pr['stream']['on']['median_ms']:.3f} / off "
            f"{pr['stream']['off']['median_ms']:.3f} ms")
    # every call to llama-on must have become a record (capture really was on), none to llama-off
    want = s.rounds * 2 * (s.latency_calls + s.latency_warmup)
    deadline = time.monotonic() + 10
    while True:
        after = run.metrics()
        got = total(after, "aimesh_model_calls_total", destination="llama-on") - \
            total(before, "aimesh_model_calls_total", destination="llama-on")
        if got >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    off_got = total(after, "aimesh_model_calls_total", destination="llama-off") - \
        total(before, "aimesh_model_calls_total", destination="llama-off")
    for p in servers.values():
        p.kill()
        p.wait()
    ratios = {kind: paired_ratio(f"latency_{kind}", "capture_on", "capture_off",
                                 [x[kind]["on"]["median_ms"] for x in per_round],
                                 [x[kind]["off"]["median_ms"] for x in per_round])
              for kind in ("plain", "stream")}
    run.commands["latency_client"] = f"{' '.join(run.pin(s.workload_cpu))} {PY} -c <bench.calls.LATENCY_CLIENT> " \
                                     f"URL_ON URL_OFF {s.latency_calls} {s.latency_warmup} FIRST"
    return {"rounds": per_round, "ratios": ratios, "records_on": int(got), "records_on_expected": want,
            "records_off": int(off_got),
            "median_ms": {kind: {k: statistics.median(x[kind][k]["median_ms"] for x in per_round)
                                 for k in ("on", "off")} for kind in ("plain", "stream")}}


# ---- part 2: decode rate ----
def loss_counts(m: dict[str, float]) -> dict[str, float]:
    names = {"ring_full": "aimesh_capture_ring_lost_total", "truncated": "aimesh_capture_truncated_calls_total",
             "not_captured_syscall": "aimesh_capture_not_captured_calls_total",
             "socket_table_full": "aimesh_capture_sockets_full_total", "read_failed": "aimesh_capture_read_failures_total"}
    return {r: total(m, name) for r, name in names.items()}


def decode_step(run: Run, port: int, rate: float, say: Callable[[str], None]) -> dict:
    s = run.s
    n_total = int(rate * s.decode_step_s) if rate > 0 else int(20000 * s.decode_step_s)
    per = max(1, n_total // s.decode_clients)
    host.wait_quiet(0.15, 3.0)
    before, cpu0 = run.metrics(), run.cpu_s()
    core0 = host.cpu_times(s.agent_cpu) if s.agent_cpu is not None else None
    rec0 = total(before, "aimesh_model_calls_total", destination="fast")
    lost0 = loss_counts(before)
    t0 = time.monotonic()
    lines = [run.line("gov/load", run.lg.argv + ["llmcalls", loadgen.HOST, str(port), str(s.decode_conns), str(per),
                                                  f"{rate / s.decode_clients:g}", str(s.request_bytes)])
             for _ in range(s.decode_clients)]
    run.commands["decode_client"] = lines[0]
    procs = [subprocess.Popen(["sh", "-c", ln], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for ln in lines]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120 + 4 * s.decode_step_s)
        if p.returncode != 0:
            raise RuntimeError(f"decode client failed: {err.strip()}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    burst_s = time.monotonic() - t0
    cpu_burst = run.cpu_s() - cpu0
    # what else ran on the agent's CPU meanwhile (other tenants): its busy share minus the agent's own
    core_busy = host.busy_fraction(core0, host.cpu_times(s.agent_cpu)) if core0 is not None else None
    sent = sum(o["n"] for o in outs)
    # drain: until every call is recorded, or the count held still for 1 s
    last, still_since = -1.0, time.monotonic()
    while True:
        got = total(run.metrics(), "aimesh_model_calls_total", destination="fast") - rec0
        if got >= sent:
            break
        if got != last:
            last, still_since = got, time.monotonic()
        elif time.monotonic() - still_since > 1.0:
            break
        time.sleep(0.25)
    rounds.settle([run.agent.popen.pid], max_wait_s=5.0)
    after = run.metrics()
    drain_s = time.monotonic() - t0 - burst_s
    recorded = total(after, "aimesh_model_calls_total", destination="fast") - rec0
    lost = {k: v - lost0[k] for k, v in loss_counts(after).items()}
    cpu_all = run.cpu_s() - cpu0
    achieved = sent / max(o["elapsed_s"] for o in outs)
    step = {"target_per_s": rate, "achieved_per_s": round(achieved, 1), "sent": sent, "recorded": int(recorded),
            "missing": int(sent - recorded), "kernel_lost": {k: int(v) for k, v in lost.items()},
            "agent_cpu_pct_burst": round(100 * cpu_burst / burst_s, 1),
            "others_cpu_pct_burst": (round(max(0.0, 100 * core_busy - 100 * cpu_burst / burst_s), 1)
                                     if core_busy is not None else None),
            "agent_cpu_us_per_call": round(1e6 * cpu_all / recorded, 1) if recorded else None,
            "burst_s": round(burst_s, 2), "drain_s": round(drain_s, 2),
            "client_median_us": statistics.median(o["median_us"] for o in outs)}
    step["clean"] = step["missing"] == 0 and lost["ring_full"] == 0 and lost["truncated"] == 0
    say(f"  decode {('open loop' if rate == 0 else f'{rate:,.0f}/s'):>10}: achieved {achieved:,.0f}/s, sent "
        f"{sent:,}, recorded {int(recorded):,}, kernel ring full {int(lost['ring_full']):,}, truncated "
        f"{int(lost['truncated']):,}; agent {step['agent_cpu_pct_burst']:.0f}% CPU (others on its CPU "
        f"{step['others_cpu_pct_burst']}%), {step['agent_cpu_us_per_call']} µs/call")
    return step


def run_decode(run: Run, say: Callable[[str], None]) -> dict:
    s = run.s
    port = agents.free_port()
    srv_line = run.line("gov/fast", run.lg.argv + ["llmserver", loadgen.HOST, str(port), str(s.response_chunks)])
    run.commands["decode_server"] = srv_line
    srv = loadgen.start_server(srv_line)
    try:
        steps = []
        for rate in s.decode_rates:
            step = decode_step(run, port, rate, say)
            if not step["clean"] and (step["others_cpu_pct_burst"] or 0) > 15:
                say("    (other processes took > 15 % of the agent's CPU: once more)")
                step = decode_step(run, port, rate, say) | {"retried": True, "first_try": step}
            steps.append(step)
    finally:
        loadgen.stop_server(srv)
    clean = [x for x in steps if x["clean"]]
    best = max(clean, key=lambda x: x["achieved_per_s"]) if clean else None
    return {"steps": steps, "best_clean_per_s": best["achieved_per_s"] if best else None,
            "best_clean_agent_cpu_pct": best["agent_cpu_pct_burst"] if best else None,
            "best_clean_agent_us_per_call": best["agent_cpu_us_per_call"] if best else None,
            "request_bytes": s.request_bytes, "response_chunks": s.response_chunks}


# ---- part 3: cost to other traffic ----
OTHER = (("gov_pipe", "governed, pipe ping-pong"), ("gov_tcp", "governed, TCP ping-pong → store"),
         ("free_pipe", "ungoverned, pipe ping-pong"), ("free_tcp", "ungoverned, TCP ping-pong"))


def tracepoint_programs() -> int:
    """Tracepoint and raw tracepoint BPF programs loaded on the host (-1: bpftool missing): nonzero while our agent is uninstalled means
    another tenant's agent is attached, and its syscall tracepoints slow the "none" state down too."""
    try:
        r = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=10)
        return sum(1 for e in json.loads(r.stdout or "[]") if e.get("type") in ("tracepoint", "raw_tracepoint"))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1


def wait_no_tracepoints(max_wait_s: float) -> int:
    """Wait (up to max_wait_s) until no tracepoint program is loaded on the host: the first program attached to a
    syscall tracepoint sends every syscall of every task through the kernel's tracing slow path, so another tenant's
    agent would make 'none' pay most of what is measured. The count when we gave up (0: a clean 'none')."""
    deadline = time.monotonic() + max_wait_s
    n = tracepoint_programs()
    while n > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        n = tracepoint_programs()
    return n


def other_once(run: Run, gov_port: int, free_port: int) -> dict[str, float]:
    s = run.s
    lg = run.lg.argv
    srv = {"gov": loadgen.start_server(run.line("gov/store", lg + ["server", loadgen.HOST, str(gov_port)])),
           "free": loadgen.start_server(run.line("free", lg + ["server", loadgen.HOST, str(free_port)]))}
    try:
        lines = {"gov_pipe": run.line("gov/work", lg + ["pipe", str(s.rr_n), str(s.rr_size), str(s.rr_warmup)]),
                 "gov_tcp": run.line("gov/work", lg + ["rr", loadgen.HOST, str(gov_port), str(s.rr_n), str(s.rr_size),
                                                       str(s.rr_warmup)]),
                 "free_pipe": run.line("free", lg + ["pipe", str(s.rr_n), str(s.rr_size), str(s.rr_warmup)]),
                 "free_tcp": run.line("free", lg + ["rr", loadgen.HOST, str(free_port), str(s.rr_n), str(s.rr_size),
                                                    str(s.rr_warmup)])}
        run.commands.update({f"other_{k}": v for k, v in lines.items()})
        return {k: loadgen.run_client(v, 300)["median_us"] for k, v in lines.items()}
    finally:
        for p in srv.values():
            loadgen.stop_server(p)


def run_other(run: Run, say: Callable[[str], None]) -> dict:
    gov_port, free_port = agents.free_port(), agents.free_port()
    per: dict[str, list[dict[str, float]]] = {"agent": [], "none": []}
    others: list[int] = []
    for r in range(run.s.rounds):
        for state in (("agent", "none") if r % 2 == 0 else ("none", "agent")):
            if state == "agent" and run.agent is None:
                run.start_agent()
            if state == "none" and run.agent is not None:
                run.stop_agent()
            if state == "none":
                others.append(wait_no_tracepoints(run.s.other_wait_s))
            host.wait_quiet(0.15, 3.0)
            per[state].append(other_once(run, gov_port, free_port))
        a, n = per["agent"][-1], per["none"][-1]
        say(f"  other round {r + 1}/{run.s.rounds}: " + ", ".join(f"{k} {a[k]:.2f}/{n[k]:.2f} µs" for k, _ in OTHER)
            + " (agent/none)")
    ratios = {k: paired_ratio(f"other_{k}", "agent", "none", [x[k] for x in per["agent"]],
                              [x[k] for x in per["none"]]) for k, _ in OTHER}
    return {"rounds": per, "ratios": ratios, "host_tracepoint_programs_during_none": others,
            "median_us": {state: {k: statistics.median(x[k] for x in v) for k, _ in OTHER} for state, v in per.items()}}


# ---- report ----
def targets() -> list[stats.Target]:
    return [stats.Target("latency, non-streamed chat call ≤ 1.03×", "latency_plain", "capture_on", "capture_off", 1.03),
            stats.Target("latency, streamed chat call ≤ 1.03×", "latency_stream", "capture_on", "capture_off", 1.03),
            stats.Target("governed pipe ping-pong ≤ 1.02×", "other_gov_pipe", "agent", "none", 1.02),
            stats.Target("governed TCP ping-pong (no capture) ≤ 1.02×", "other_gov_tcp", "agent", "none", 1.02),
            stats.Target("ungoverned pipe ping-pong ≤ 1.01×", "other_free_pipe", "agent", "none", 1.01),
            stats.Target("ungoverned TCP ping-pong ≤ 1.01×", "other_free_tcp", "agent", "none", 1.01)]


def report(res: dict) -> tuple[str, dict]:
    lines = []
    ratios: list[stats.Ratio] = []
    if "latency" in res:
        lat = res["latency"]
        ratios += list(lat["ratios"].values())
        lines.append("latency (median call, ms)      capture on   capture off   on ÷ off (paired)")
        for kind, label in (("plain", "non-streamed chat"), ("stream", "streamed chat")):
            m, r = lat["median_ms"][kind], lat["ratios"][kind]
            lines.append(f"  {label:<28} {m['on']:>10.3f}   {m['off']:>11.3f}   {r.paired_median:.3f}×")
        lines.append(f"  records: {lat['records_on']:,} of {lat['records_on_expected']:,} calls to llama-on, "
                     f"{lat['records_off']:,} to llama-off (capture off)")
    if "decode" in res:
        d = res["decode"]
        lines.append(f"decode ({d['request_bytes']} B request, {d['response_chunks']}-chunk streamed response)")
        lines.append("  target/s   achieved/s      sent  recorded  ring full  truncated  agent CPU  others  µs/call")
        for x in d["steps"]:
            t = "open" if x["target_per_s"] == 0 else f"{x['target_per_s']:,.0f}"
            lines.append(f"  {t:>8}  {x['achieved_per_s']:>11,.0f}  {x['sent']:>8,}  {x['recorded']:>8,}  "
                         f"{x['kernel_lost']['ring_full']:>9,}  {x['kernel_lost']['truncated']:>9,}  "
                         f"{x['agent_cpu_pct_burst']:>8.0f}%  {x.get('others_cpu_pct_burst') or 0:>5.0f}%  "
                         f"{x['agent_cpu_us_per_call'] or 0:>7.1f}")
    if "other" in res:
        o = res["other"]
        ratios += list(o["ratios"].values())
        lines.append("other traffic (median round trip, µs)   agent      none   agent ÷ none (paired)")
        for k, label in OTHER:
            lines.append(f"  {label:<36} {o['median_us']['agent'][k]:>7.2f}  {o['median_us']['none'][k]:>8.2f}   "
                         f"{o['ratios'][k].paired_median:.3f}×")
        busy = [n for n in o["host_tracepoint_programs_during_none"] if n > 0]
        if busy:
            lines.append(f"  note: in {len(busy)} 'none' round(s) another agent's tracepoint programs were still "
                         f"loaded (up to {max(busy)}): 'none' paid the syscall tracing slow path too")
    text, rows = stats.render_targets(targets(), ratios)
    lines += ["targets:", text]
    if "decode" in res:
        best = res["decode"]["best_clean_per_s"]
        ok = best is not None and best >= 5000
        rows.append({"target": "decode rate ≥ 5,000 calls/s, 0 lost", "limit": 5000, "value": best, "pass": ok})
        d = res["decode"]
        got = (f"{best:,.0f}/s (agent {d['best_clean_agent_cpu_pct']:.0f}% of a CPU, "
               f"{d['best_clean_agent_us_per_call']} µs per call)" if best is not None else "no step was clean")
        lines.append(f"  {'PASS' if ok else 'MISS':<5} {'decode ≥ 5,000 calls/s with 0 lost':<50} {got}")
    return "\n".join(lines), {"targets": rows}


def to_json(obj):
    if isinstance(obj, stats.Ratio):
        return {"paired_median": obj.paired_median, "paired": obj.paired, "ratio_of_medians": obj.of_medians,
                "ratio_of_lower_quartiles": obj.of_lower_quartiles}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


PARTS: dict[str, Callable[[Run, Callable[[str], None]], dict]] = {"latency": run_latency, "decode": run_decode,
                                                                  "other": run_other}


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(s: Settings, say: Callable[[str], None]) -> tuple[dict, int]:
    tmp = Path(tempfile.mkdtemp(prefix="aimesh-bench-calls-"))
    res: dict = {"settings": s.__dict__ | {"parts": list(s.parts), "agent_tree": str(s.agent_tree)}}
    status = 0
    r: Optional[Run] = None
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        r = Run(tmp, s)
        res["agent_config"] = agent_config(r.b, s.fast_path)
        for name in s.parts:
            if r.agent is None:
                ready = r.start_agent()
                say(f"agent ready in {ready:.1f}s")
            say(f"{name}:")
            try:
                res[name] = PARTS[name](r, say)
            except (RuntimeError, OSError, loadgen.LoadGenError, agents.AgentStartError) as e:
                say(f"  {name} failed: {e}")
                res[name + "_error"] = str(e)
                status = 1
        res["commands"] = r.commands
    except (RuntimeError, OSError) as e:
        say(f"bench.calls: {e}")
        res["error"] = str(e)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if r is not None:
            r.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, h in old.items():
            signal.signal(sig, h)
    return res, status


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="latency,decode,other", help="some of latency,decode,other")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the latency and other parts")
    ap.add_argument("--latency-calls", type=int, default=200, help="calls per server, per kind, per round")
    ap.add_argument("--latency-warmup", type=int, default=20)
    ap.add_argument("--decode-rates", type=floats, default=(500, 1000, 1250, 1500, 2000, 2500, 3000, 5000, 0),
                    help="calls/s per step, comma-separated; 0: open loop")
    ap.add_argument("--decode-step", type=float, default=3.0, help="seconds per step")
    ap.add_argument("--decode-clients", type=int, default=2, help="client processes per step")
    ap.add_argument("--decode-conns", type=int, default=4, help="keep-alive connections per client process")
    ap.add_argument("--request-bytes", type=int, default=4096)
    ap.add_argument("--response-chunks", type=int, default=20)
    ap.add_argument("--rr-n", type=int, default=20000)
    ap.add_argument("--rr-size", type=int, default=64)
    ap.add_argument("--rr-warmup", type=int, default=1000)
    ap.add_argument("--agent-cpu", type=int, default=0)
    ap.add_argument("--workload-cpu", type=int, default=1 if (os.cpu_count() or 1) > 1 else 0)
    ap.add_argument("--no-fast-path", action="store_true", help="the agent's fast_path: false (other part, TCP)")
    ap.add_argument("--other-wait", type=float, default=20.0,
                    help="seconds to wait for other tenants' tracepoint programs to go before a 'none' measurement")
    ap.add_argument("--agent-tree", type=Path, default=REPO, help="run the agent from this checkout")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"bench.calls: --parts: unknown part {bad[0]!r} (latency, decode, other)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench.calls: run as root (it loads BPF programs and makes cgroups)", file=sys.stderr)
        return 2
    s = Settings(rounds=a.rounds, latency_calls=a.latency_calls, latency_warmup=a.latency_warmup,
                 decode_rates=a.decode_rates, decode_step_s=a.decode_step, decode_clients=a.decode_clients,
                 decode_conns=a.decode_conns, request_bytes=a.request_bytes, response_chunks=a.response_chunks,
                 rr_n=a.rr_n, rr_size=a.rr_size, rr_warmup=a.rr_warmup, agent_cpu=a.agent_cpu,
                 workload_cpu=a.workload_cpu, fast_path=not a.no_fast_path, parts=parts,
                 other_wait_s=a.other_wait, agent_tree=a.agent_tree.resolve())

    def say(t: str) -> None:
        print(t, flush=True)
    t0 = time.monotonic()
    try:
        res, status = run(s, say)
    except KeyboardInterrupt:
        print("bench.calls: interrupted (cleaned up)", file=sys.stderr)
        return 130
    table, extra = report(res)
    res.update(extra)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["command"] = "python -m bench.calls " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table)
    a.out.write_text(json.dumps(to_json(res), indent=1))
    print(f"written to {a.out} ({res['elapsed_s']:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
