"""The `aimesh` command: argument parsing and wiring only. Errors are one line, no traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from agent.config import FAST_PATH_CAVEAT, ConfigError, load_config
from agent.errors import AgentError


def _agent(args: argparse.Namespace) -> int:
    from agent.daemon import Agent, AgentOptions
    opts = AgentOptions(config_path=Path(args.config), cgroup_root=args.cgroup_root,
                        metrics_addr=args.metrics_addr, flow_log=args.flow_log, records_log=args.records_log,
                        collector=args.collector, agent_id=args.agent_id, ephemeral=args.ephemeral,
                        bpf_root=args.bpf_root, watch_config={"auto": None, "on": True, "off": False}[args.watch_config],
                        kubeconfig=args.kubeconfig, node_name=args.node_name,
                        gateway_process=not args.no_gateway_process, state_dir=args.state_dir)
    return Agent(opts).run()


def _root_dir(cgroup_root: Optional[Path]):
    from agent.identity.cgroups import cgroup2_mount, cgroup_id
    from agent.kernel.pins import DatapathDir
    root = cgroup_root or cgroup2_mount()
    if not root.is_dir():
        raise AgentError(f"--cgroup-root {root} does not exist")
    return root, DatapathDir.for_root(cgroup_id(root))


def _uninstall(args: argparse.Namespace) -> int:
    from agent.kernel.install import uninstall
    from agent.kernel.pins import agent_attached
    root, d = _root_dir(args.cgroup_root)
    if agent_attached(d):
        raise AgentError(f"an aimesh agent is running on {root} ({d.path}): stop it first")
    removed = uninstall(d, root)
    if not removed:
        print(f"nothing of aimesh is pinned or attached for {root}")
        return 0
    for r in removed:
        print(f"removed {r}")
    print(f"aimesh datapath for {root} removed: {len(removed)} objects; nothing of aimesh is attached there now")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json as _json

    from agent.kernel.install import status
    from agent.kernel.pins import all_datapaths
    dirs = [_root_dir(args.cgroup_root)[1]] if args.cgroup_root else all_datapaths()
    out = [status(d) for d in dirs if d.path.exists()]
    if args.output == "json":
        print(_json.dumps([{"path": str(st.path), "agent_attached": st.agent_attached, "manifest": st.manifest,
                            "links": [vars(x) for x in st.links], "maps": st.maps, "builds": st.builds,
                            "error": st.error} for st in out], indent=1))
        return 0
    if not out:
        print("no aimesh datapath is pinned on this host")
        return 0
    for st in out:
        m = st.manifest or {}
        print(f"datapath {st.path}")
        print(f"  cgroup root      {m.get('cgroup_root', '?')}")
        print(f"  aimesh version   {m.get('aimesh_version', '?')} (manifest format {m.get('format', '?')})")
        print(f"  build            {(m.get('build') or {}).get('build', '?')}")
        print(f"  config gen       {m.get('config_generation', '?')} from {m.get('config_path', '?')}, "
              f"written {m.get('updated', '?')}")
        print(f"  agent            {'attached (pid ' + str(m.get('agent_pid')) + ')' if st.agent_attached else 'none running: the datapath enforces the last policy'}")
        print(f"  links            {len(st.links)}")
        for li in st.links:
            print(f"    {li.name:<24} link {li.link_id:<6} prog {li.prog_id:<6} {li.prog_name:<16} {li.target}")
        print(f"  maps             {len(st.maps)}; builds pinned: {', '.join(st.builds) or '-'}")
        if st.error:
            print(f"  error            {st.error}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from agent.policy.compile import compile_image
    from agent.policy.identities import IdentityNumbering
    cfg = load_config(Path(args.config))
    image = compile_image(cfg, IdentityNumbering(), 0, datetime.now(timezone.utc))
    for w in image.warnings:
        print(f"warning: {w}")
    if cfg.fast_path:
        print(f"warning: fast_path: true: {FAST_PATH_CAVEAT}")
    else:
        print(f"note: fast_path is off (the default): {FAST_PATH_CAVEAT}")
        for p in cfg.policies:
            if p.fast_path:
                print(f"warning: policy {','.join(p.from_)} -> {','.join(p.to)} has fast_path: true: its "
                      f"connections get the fast path's differences")
    print(f"{args.config}: ok — {len(cfg.identities)} identities, {len(image.policies)} policy entries, "
          f"{len(image.redirects)} redirect entries, {len(image.endpoints)} endpoints")
    return 0


def _ca_export(args: argparse.Namespace) -> int:
    from agent.gateway.ca import CAError, NodeCA
    try:
        sys.stdout.write(NodeCA(args.ca_dir).cert_pem().decode())
    except (CAError, OSError) as e:
        raise AgentError(f"--ca-dir {args.ca_dir}: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aimesh", description="eBPF governance mesh for AI workloads")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the node agent (root)")
    a.add_argument("--config", required=True, help="YAML config file")
    a.add_argument("--cgroup-root", type=Path, default=None,
                   help="cgroup v2 directory to attach at (default: the cgroup2 mount)")
    a.add_argument("--metrics-addr", default="127.0.0.1:9464",
                   help="HOST:PORT for /metrics, /readyz, /livez and /healthz (default: loopback only; give "
                   "0.0.0.0:9464 or the node's address to expose them)")
    a.add_argument("--flow-log", default=None, help="write one JSON line per decision to PATH, or - for stdout")
    a.add_argument("--records-log", default=None,
                   help="write one JSON line per flow record (connection close, interim, UDP window) to PATH or -")
    a.add_argument("--collector", default=None, help="HOST:PORT of the collector (overrides collector.address)")
    a.add_argument("--agent-id", default=None, help="this agent's id in exported batches (default: host name)")
    a.add_argument("--ephemeral", action="store_true",
                   help="remove the datapath when the agent exits (development); by default it stays in force")
    a.add_argument("--watch-config", choices=["auto", "on", "off"], default="auto",
                   help="re-read the config when the file changes, as SIGHUP does (checked every second); auto "
                   "(default): on when the file is in a kubelet-mounted ConfigMap (its directory has ..data), whose "
                   "updates are atomic; off elsewhere, where an editor may save a file in several writes")
    a.add_argument("--state-dir", type=Path, default=None,
                   help="where the node gateway's policy file and records socket live (default /run/aimesh/<root>)")
    a.add_argument("--no-gateway-process", action="store_true",
                   help="compile the gateway redirect but run no gateway process (development: one run by hand)")
    a.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file for the Kubernetes API (development; overrides kubernetes.kubeconfig); "
                   "default: the pod's service account (in-cluster)")
    a.add_argument("--node-name", default=None,
                   help="this node's Kubernetes name: only its pods are watched (overrides kubernetes.node_name; "
                   "default: the NODE_NAME environment variable, set from the downward API spec.nodeName)")
    a.add_argument("--bpf-root", type=Path, default=None, help=argparse.SUPPRESS)   # tests: build from a copy of bpf/
    a.set_defaults(func=_agent)

    u = sub.add_parser("uninstall", help="detach and unpin the aimesh datapath of a cgroup root (root)")
    u.add_argument("--cgroup-root", type=Path, default=None, help="default: the cgroup2 mount")
    u.set_defaults(func=_uninstall)

    st = sub.add_parser("status", help="pinned datapaths: programs, links, config generation, agent (root)")
    st.add_argument("--cgroup-root", type=Path, default=None, help="default: every pinned datapath")
    st.add_argument("-o", "--output", choices=["text", "json"], default="text")
    st.set_defaults(func=_status)

    c = sub.add_parser("check", help="validate and compile a config without loading anything")
    c.add_argument("--config", required=True)
    c.set_defaults(func=_check)

    ca = sub.add_parser("ca", help="the node CA of the gateway's TLS interception")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    ce = ca_sub.add_parser("export", help="print the node CA certificate (PEM) to mount into workloads "
                           "(created on first use, key 0600)")
    ce.add_argument("--ca-dir", type=Path, default=Path("/var/lib/aimesh/ca"))
    ce.set_defaults(func=_ca_export)

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
