"""What every section of a run shares: the options, the load generator, the cgroup subtree, the temporary directory,
and starting agents from specs."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench import agents, cgroups, loadgen
from bench.configs import AgentConfigSpec, agent_config, to_yaml
from bench.made import Made

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Options:
    sections: tuple[str, ...]
    # paths
    rounds: int
    workload: loadgen.Workload
    proxy_cpu: Optional[int]
    profile: bool
    # scale
    scale_rounds: int
    scale_rules: tuple[int, ...]
    scale_watched: tuple[int, ...]
    scale_workloads: tuple[int, ...]
    # flows
    flow_rates: tuple[float, ...]       # conn/s targets; 0 = open loop, as fast as the client goes
    flow_step_s: float
    flow_refine: bool
    ingest_records: int
    ingest_batches: tuple[int, ...]
    # all
    workload_cpu: Optional[int]
    agent_cpu: Optional[int]
    quiet_threshold: float
    quiet_max_wait_s: float
    agent_timeout_s: float
    results_path: Path
    python_loadgen: bool
    agent_tree: Path


@dataclass
class Context:
    opts: Options
    lg: loadgen.LoadGen
    tree: cgroups.BenchTree
    tmpdir: Path
    pid: int

    def rel(self, path: Path) -> str:
        return self.tree.relative(path)

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def python(self) -> Path:
        venv = REPO / ".venv" / "bin" / "python"
        return venv if venv.exists() else Path(sys.executable)

    def start_agents(self, specs: list[tuple[AgentConfigSpec, Path]], made: Made,
                     extra: Optional[dict[str, tuple[str, ...]]] = None) -> dict[str, float]:
        """Start one agent per (spec, cgroup root) at once; seconds until each answered /healthz (checked in turn,
        so a later one's figure is an upper bound)."""
        started = []
        t0 = time.monotonic()
        for spec, root in specs:
            cfg_path = self.tmpdir / f"{spec.name}.yaml"
            cfg_path.write_text(to_yaml(agent_config(spec)))
            port = agents.free_port()
            argv = agents.agent_argv(self.python(), cfg_path, root, port, self.opts.agent_cpu,
                                     (extra or {}).get(spec.name, ()))
            a = agents.start_agent(spec.name, argv, port, self.tmpdir / f"{spec.name}.log", self.opts.agent_tree)
            made.agents.append(a)
            started.append(a)
        ready = {}
        for a in started:       # all were started at t0: the seconds until each was seen healthy
            agents.wait_ready(a, self.opts.agent_timeout_s)
            ready[a.name] = time.monotonic() - t0
        want = {spec.name: spec.policy_entries for spec, _ in specs}
        for a in started:
            got = agents.scrape(a).get('aimesh_map_entries{map="policy_verdict"}')
            if got is not None and int(got) != want[a.name]:
                raise RuntimeError(f"agent {a.name} holds {int(got)} policy entries, expected {want[a.name]}")
        return ready


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = agents.free_port()
        if p not in ports:
            ports.append(p)
    return ports


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
