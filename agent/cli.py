"""The `aimesh` command: argument parsing and wiring only. Errors are one line, no traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from agent.config import ConfigError, load_config
from agent.errors import AgentError


def _agent(args: argparse.Namespace) -> int:
    from agent.daemon import Agent, AgentOptions
    opts = AgentOptions(config_path=Path(args.config), cgroup_root=args.cgroup_root,
                        metrics_addr=args.metrics_addr, flow_log=args.flow_log, records_log=args.records_log,
                        collector=args.collector, agent_id=args.agent_id)
    return Agent(opts).run()


def _check(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from agent.policy.compile import compile_image
    from agent.policy.identities import IdentityNumbering
    cfg = load_config(Path(args.config))
    image = compile_image(cfg, IdentityNumbering(), 0, datetime.now(timezone.utc))
    for w in image.warnings:
        print(f"warning: {w}")
    print(f"{args.config}: ok — {len(cfg.identities)} identities, {len(image.policies)} policy entries, "
          f"{len(image.redirects)} redirect entries, {len(image.endpoints)} endpoints")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aimesh", description="eBPF governance mesh for AI workloads")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the node agent (root)")
    a.add_argument("--config", required=True, help="YAML config file")
    a.add_argument("--cgroup-root", type=Path, default=None,
                   help="cgroup v2 directory to attach at (default: the cgroup2 mount)")
    a.add_argument("--metrics-addr", default="0.0.0.0:9464", help="HOST:PORT for /metrics and /healthz")
    a.add_argument("--flow-log", default=None, help="write one JSON line per decision to PATH, or - for stdout")
    a.add_argument("--records-log", default=None,
                   help="write one JSON line per flow record (connection close, interim, UDP window) to PATH or -")
    a.add_argument("--collector", default=None, help="HOST:PORT of the collector (overrides collector.address)")
    a.add_argument("--agent-id", default=None, help="this agent's id in exported batches (default: host name)")
    a.set_defaults(func=_agent)

    c = sub.add_parser("check", help="validate and compile a config without loading anything")
    c.add_argument("--config", required=True)
    c.set_defaults(func=_check)

    try:
        from agent.demo import runner as demo
    except ImportError:
        demo = None
    if demo is not None:
        d = sub.add_parser("demo", help="agent + model servers + clients, with a live view (root)")
        demo.add_arguments(d)
        d.set_defaults(func=demo.run)
    try:
        from agent.collector import cli as collector_cli
    except ImportError:
        collector_cli = None
    if collector_cli is not None:
        collector_cli.add_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (AgentError, ConfigError) as e:
        print(f"aimesh: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
