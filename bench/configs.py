"""Agent configs for the benchmark: pure functions, config dict in, YAML text out.

Every config has the two identities the workload uses (`client`, a service, and `server`, a governed model) and the
one policy client -> server on the bench port. The rest of the N policy entries are dummies between model identities
m0..mK that no workload belongs to: they only fill the policy map, as a large deployment would.

Optional parts, for the scale and flow sections:
  watched cgroups  empty cgroups `<subtree>/idle-0..idle-N-1`, all matched by one glob to the identity `watched`;
  workloads        cgroups `<subtree>/wl-0..wl-N-1`, each matched by its own glob to its own identity `wl-I`;
  fast_path, telemetry, collector: passed through as the agent's config keys of the same names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import yaml

DUMMY_PORT_BASE = 8000
PORTS_PER_PAIR = 10


@dataclass(frozen=True)
class AgentConfigSpec:
    """What one governed configuration looks like: where its workload lives and how many policy entries it holds."""
    name: str               # "r10", "r100k": also the cgroup directory under the bench subtree
    cgroup_rel: str         # the governed subtree, relative to the cgroup2 mount, e.g. "/aimesh-bench-123/r10"
    port: int               # the server's port
    policy_entries: int     # total entries in the policy map, the client -> server one included
    fast_path: Optional[bool] = None     # None: the agent's default
    watched_cgroups: int = 0
    workloads: int = 0
    telemetry: Optional[dict] = None
    collector: Optional[dict] = None
    extra_ports: tuple[int, ...] = ()    # more ports of the client -> server policy (each one policy entry)


WATCHED_PREFIX = "idle-"
WORKLOAD_PREFIX = "wl-"


def dummy_pairs(entries: int) -> list[tuple[int, int, list[int]]]:
    """(src index, dst index, ports) covering exactly `entries` tcp policy entries, PORTS_PER_PAIR per pair."""
    if entries <= 0:
        return []
    pairs_needed = math.ceil(entries / PORTS_PER_PAIR)
    k = math.isqrt(pairs_needed - 1) + 1          # k*k >= pairs_needed
    out: list[tuple[int, int, list[int]]] = []
    left = entries
    for i in range(k):
        for j in range(k):
            if left == 0:
                return out
            n = min(PORTS_PER_PAIR, left)
            out.append((i, j, list(range(DUMMY_PORT_BASE, DUMMY_PORT_BASE + n))))
            left -= n
    return out


def agent_config(spec: AgentConfigSpec) -> dict:
    """The config dict for one governed configuration (see the module docstring)."""
    pairs = dummy_pairs(spec.policy_entries - 1 - len(spec.extra_ports))
    dummies = sorted({i for i, _, _ in pairs} | {j for _, j, _ in pairs})
    identities = [
        {"name": "client", "kind": "service", "select": {"cgroups": [f"{spec.cgroup_rel}/client"]}},
        {"name": "server", "kind": "model", "version": "1", "select": {"cgroups": [f"{spec.cgroup_rel}/server"]}},
    ] + [{"name": f"m{i}", "kind": "model", "version": "1"} for i in dummies]
    if spec.watched_cgroups:
        identities.append({"name": "watched", "kind": "model", "version": "1",
                           "select": {"cgroups": [f"{spec.cgroup_rel}/{WATCHED_PREFIX}*"]}})
    identities += [{"name": f"{WORKLOAD_PREFIX}{i}", "kind": "model", "version": "1",
                    "select": {"cgroups": [f"{spec.cgroup_rel}/{WORKLOAD_PREFIX}{i}"]}} for i in range(spec.workloads)]
    policies = [{"from": "client", "to": "server", "ports": [spec.port, *spec.extra_ports], "protocol": "tcp"}] + [
        {"from": f"m{i}", "to": f"m{j}", "ports": ports, "protocol": "tcp"} for i, j, ports in pairs
    ]
    config: dict = {"mode": "enforce"}
    if spec.fast_path is not None:
        config["fast_path"] = spec.fast_path
    if spec.telemetry is not None:
        config["telemetry"] = spec.telemetry
    if spec.collector is not None:
        config["collector"] = spec.collector
    config.update(identities=identities, policies=policies)
    return config


def to_yaml(config: dict) -> str:
    """Flow style per list item keeps a 10,000-policy file around 600 kB and quick to parse."""
    return yaml.safe_dump(config, default_flow_style=None, sort_keys=False, width=200)
