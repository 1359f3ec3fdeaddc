"""Everything a bench run starts or creates, so that cleanup removes exactly that — by pid, by name — and nothing else.

One `Made` per section (stopped when the section ends, so its agents cost the next section nothing) and one for the
whole run (the temporary directory and the cgroup subtree). Cleanup order: clients' servers, other processes
(proxies, collector, sleeping workloads), agents (SIGTERM: they detach), nft tables, network namespaces, cgroups,
the temporary directory.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench import agents, cgroups, loadgen, proxy


@dataclass
class Made:
    tmpdir: Optional[Path] = None
    tree: Optional[cgroups.BenchTree] = None
    cgroup_tops: list[Path] = field(default_factory=list)          # section subtrees, removed with remove_below
    agents: list[agents.AgentProc] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)    # proxies, collector, workloads
    nft_tables: list[tuple[str, str]] = field(default_factory=list)  # (netns, table)
    netns: list[str] = field(default_factory=list)
    sections: list["Made"] = field(default_factory=list)            # the run's: each section's own, until it ends


def _kill(p: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in (p.stdout, p.stderr):
        if f:
            f.close()


def cleanup(made: Made, tree: Optional[cgroups.BenchTree] = None) -> list[str]:
    """Undo what `made` holds; `tree` (the run's) lets a section remove its own cgroup subtrees."""
    problems: list[str] = []
    for sub in made.sections:
        problems += cleanup(sub, made.tree or tree)
    made.sections.clear()
    for s in list(made.servers):
        loadgen.stop_server(s)
    made.servers.clear()
    for p in list(made.procs):
        _kill(p)
    made.procs.clear()
    for a in made.agents:
        was_running = a.popen.poll() is None
        code = agents.stop_agent(a)
        if was_running and code != 0:
            problems.append(f"agent {a.name} exited with {code} when stopped")
    made.agents.clear()
    for netns, table in made.nft_tables:
        err = proxy.delete_table(netns, table)
        if err:
            problems.append(err)
    made.nft_tables.clear()
    for ns in made.netns:
        err = proxy.delete_netns(ns)
        if err:
            problems.append(err)
    made.netns.clear()
    owner = made.tree or tree
    if owner is not None:
        for top in reversed(made.cgroup_tops):
            problems += cgroups.remove_below(owner, top)
    made.cgroup_tops.clear()
    if made.tree is not None:
        problems += cgroups.remove_tree(made.tree)
        made.tree = None
    if made.tmpdir is not None:
        shutil.rmtree(made.tmpdir, ignore_errors=True)
        made.tmpdir = None
    return problems
