"""`aimesh demo`: the agent and the demo workloads in a cgroup subtree of their own, and a live view of the decisions.

    add_arguments(parser)   the flags (--config, --duration, --metrics-addr, ...)
    run(args) -> int        0 when stopped by Ctrl-C/SIGTERM or --duration; 1 when something failed; 2 on bad input

Steps: read the demo config (agent config + `demo:` workloads), make `<cgroup2 mount>/aimesh-demo-<pid>/<child>`,
make the demo CA when a server serves https (agent/demo/tls.py, in the private work directory), start the collector
and the agent on that subtree and wait for its /healthz, start the servers then the clients each in its cgroup,
follow the flow log, the model calls the collector stores (`aimesh calls -f -o json`, a child whose output is read
like the flow log) and the workloads' output, redraw. Cleanup, whatever happened: the workloads (by pid), then the
agent, then the calls follower, a last `aimesh calls` listing, the collector, then the cgroups (children, then the
subtree), then the work directory unless kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from agent.config import ConfigError, parse_config
from agent.demo import view
from agent.demo.cgroups import CgroupError, CgroupTree, create_tree, find_cgroup2_mount, remove_tree
from agent.demo.plan import ClientSpec, DemoConfig, DemoConfigError, DemoPlan, ServerSpec, config_mode, \
    expected_identity, split_config
from agent.demo.procs import Child, FileTail, Spawner, SpawnError, stop_children
from agent.demo.tls import DemoTls, TlsError, make_demo_tls

DEFAULT_CONFIG = "deploy/examples/demo.yaml"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
FRAME_INTERVAL_S = 0.5
TICK_S = 0.1
DEFAULT_COLLECTOR_ADDR = "127.0.0.1:4790"
WORKLOAD_GRACE_S = 3.0
AGENT_GRACE_S = 15.0
SERVER_READY_TIMEOUT_S = 15.0
FOLLOW_RESTART_S = 2.0          # a calls follower that exited (collector not up yet?) is restarted after this
CALLS_BACKLOG = 100000          # a restarted follower's backlog (the table counts each call once)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `aimesh demo` flags."""
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"demo config: an agent config plus a `demo:` workloads section (default {DEFAULT_CONFIG})")
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                        help="stop and clean up after this many seconds of traffic (default: run until Ctrl-C)")
    parser.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="HOST:PORT",
                        help=f"where the demo's agent serves /metrics and /healthz (default {DEFAULT_METRICS_ADDR})")
    parser.add_argument("--collector-addr", default=DEFAULT_COLLECTOR_ADDR, metavar="HOST:PORT",
                        help=f"where the demo's local flow collector listens (default {DEFAULT_COLLECTOR_ADDR})")
    parser.add_argument("--flow-log", default=None, metavar="PATH",
                        help="where the agent writes its flow log (default: in a temporary directory removed at exit)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the work directory (flow log, agent and workload output) and print its path")
    parser.add_argument("--agent-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the agent's /healthz (BPF compile included; default 60)")
    parser.add_argument("--plain", action="store_true",
                        help="print appended lines instead of a live table, even on a terminal")
    parser.add_argument("--agent-module", default="agent", help=argparse.SUPPRESS)   # tests: a stand-in agent


# ---- small pure helpers ----------------------------------------------------------------------------------------

def parse_hostport(text: str) -> tuple[str, int]:
    """`127.0.0.1:9464` / `[::1]:9464` -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics-addr: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def agent_argv(python: str, module: str, config: Path, cgroup_root: Path, flow_log: Path, metrics_addr: str,
               collector_addr: str | None = None) -> list[str]:
    return [python, "-m", module, "agent", "--config", str(config), "--cgroup-root", str(cgroup_root),
            "--flow-log", str(flow_log), "--metrics-addr", metrics_addr] + (
        ["--collector", collector_addr, "--agent-id", "demo"] if collector_addr else [])


def collector_argv(python: str, listen: str, db: Path, token_file: Path) -> list[str]:
    return [python, "-m", "agent", "collector", "--listen", listen, "--db", str(db), "--token-file", str(token_file)]


def server_argv(python: str, spec: ServerSpec, tls: DemoTls | None = None) -> list[str]:
    role = "model-server" if spec.kind == "model" else "dataset-server"
    argv = [python, "-m", "agent.demo.workloads", role, "--name", spec.name, "--version", spec.version,
            "--port", str(spec.port)]
    if spec.tls:
        if tls is None:
            raise ValueError(f"server {spec.name}: tls: true needs the demo CA")
        argv += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
    return argv


def client_argv(python: str, spec: ClientSpec, plan: DemoPlan, tls: DemoTls | None = None) -> list[str]:
    """A model server's client asks for its model id (`llama-3.1-8b`), over https with the demo CA when it is TLS."""
    server = plan.server(spec.target)
    scheme = "https" if server.tls else "http"
    model = server.model_id if server.kind == "model" else server.name
    argv = [python, "-m", "agent.demo.workloads", "client", "--name", spec.name,
            "--url", f"{scheme}://127.0.0.1:{server.port}", "--interval", f"{spec.interval:g}",
            "--api", "chat" if server.kind == "model" else "dataset", "--model", model]
    if server.tls:
        if tls is None:
            raise ValueError(f"client {spec.name}: its server {server.name} is https and needs the demo CA")
        argv += ["--ca-file", str(tls.ca_cert)]
    if spec.error_every:
        argv += ["--error-every", str(spec.error_every)]
    return argv


def calls_argv(python: str, collector_addr: str, token_file: Path, follow: bool,
               limit: int = CALLS_BACKLOG) -> list[str]:
    """`aimesh calls -o json` against the demo's collector: followed (with a backlog), or listed once."""
    return [python, "-m", "agent", "calls", "--collector", collector_addr, "--token-file", str(token_file),
            "-o", "json", "--limit", str(limit)] + (["--follow"] if follow else [])


def tail_lines(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# ---- the outside world -----------------------------------------------------------------------------------------

def load_demo_config(path: Path) -> DemoConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise DemoConfigError(f"{path}: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DemoConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        demo = split_config(doc)
    except DemoConfigError as e:
        raise DemoConfigError(f"{path}: {e}") from None
    check_agent_config(demo.agent_config, path)
    return demo


def check_agent_config(agent_config: dict[str, Any], path: Path) -> None:
    """Validate the agent's part now, with the agent's own rules, rather than after making cgroups."""
    try:
        parse_config(yaml.safe_dump(agent_config, sort_keys=False), str(path))
    except ConfigError as e:
        raise DemoConfigError(str(e)) from None


def tcp_accepts(host: str, port: int, timeout: float = 0.3) -> bool:
    """Does something accept connections on host:port? (The demo itself is outside the governed subtree.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def healthz_ok(metrics_addr: str, timeout: float = 1.0) -> bool:
    host, port = parse_hostport(metrics_addr)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through an http_proxy
    try:
        with opener.open(f"http://{url_host(host)}:{port}/healthz", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP; the loops poll it."""

    signal_name: str = ""

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name


def install_handlers(stop: StopFlag) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, stop.handler)
        except ValueError:      # not the main thread: the caller handles signals
            break
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@dataclass
class Console:
    """The live table on a terminal, appended plain lines otherwise."""

    out: TextIO
    live: bool
    painted: bool = False
    broken: bool = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except OSError:         # a closed pipe must not stop the cleanup
            self.broken = True

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def paint(self, frame: view.Frame) -> None:
        size = shutil.get_terminal_size((120, 40))
        lines = view.render_frame(frame, width=size.columns, height=max(10, size.lines - 1), color=True)
        self.write(("\x1b[?25l" if not self.painted else "") + view.frame_text(lines, first=not self.painted))
        self.painted = True

    def close(self) -> None:
        if self.live and self.painted:
            self.write("\x1b[?25h")


# ---- the session -----------------------------------------------------------------------------------------------

@dataclass
class Session:
    """One demo run: what it made (so cleanup removes exactly that) and what it has seen."""

    config_path: Path
    demo: DemoConfig
    mount: Path
    metrics_addr: str
    console: Console
    stop: StopFlag
    workdir: Path
    flow_log: Path
    agent_module: str
    python: str = sys.executable
    tree: CgroupTree | None = None
    agent: Child | None = None
    collector: Child | None = None
    collector_addr: str | None = None
    summary: list[str] = field(default_factory=list)
    workloads: list[Child] = field(default_factory=list)
    table: view.FlowTable = field(default_factory=view.FlowTable)
    flows: FileTail | None = None
    tls: DemoTls | None = None
    calls: view.CallTable = field(default_factory=view.CallTable)
    calls_follower: Child | None = None
    follow_again: float = 0.0       # when an exited follower may be restarted
    followers: int = 0
    stored_calls: int | None = None   # the last listing's count (None: not listed)
    started: float = field(default_factory=time.monotonic)
    message: str = ""
    said: str = ""              # the last status message printed in plain mode
    next_frame: float = 0.0

    # -- setup --

    def make_cgroups(self) -> None:
        self.tree = create_tree(self.mount, f"aimesh-demo-{os.getpid()}", self.demo.plan.cgroups())

    def make_tls(self) -> None:
        """The demo CA and the https server's certificate, in the private work directory (0700, files 0600)."""
        if self.demo.plan.uses_tls:
            self.tls = make_demo_tls(self.workdir / "tls")

    def spawner(self) -> Spawner:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return Spawner(cwd=Path(__file__).resolve().parents[2], env=env)

    def start_collector(self, spawner: Spawner) -> None:
        """The local flow collector the agent exports to (SQLite in the work directory)."""
        if self.collector_addr:
            from agent.collector.auth import load_or_create_token
            load_or_create_token(self.token_file)   # before either side starts: the agent reads it at once
            self.collector = spawner.start("aimesh collector", "collector",
                                           collector_argv(self.python, self.collector_addr, self.workdir / "flows.db",
                                                          self.token_file),
                                           self.workdir / "collector.log")

    @property
    def token_file(self) -> Path:
        """The bearer token the demo's collector, agent and `aimesh flows` share (0600 in the work directory)."""
        return self.workdir / "collector.token"

    def start_agent(self, spawner: Spawner) -> None:
        assert self.tree is not None
        config = self.workdir / "agent-config.yaml"
        agent_config = dict(self.demo.agent_config)
        if self.collector_addr:
            agent_config["collector"] = {**agent_config.get("collector", {}),
                                         "spool_dir": str(self.workdir / "spool"), "flush_interval": 0.5,
                                         "token_file": str(self.token_file)}
        config.write_text(
            f"# rendered by `aimesh demo` from {self.config_path} (its `demo:` section removed)\n"
            + yaml.safe_dump(agent_config, sort_keys=False)
        )
        self.flows = FileTail(self.flow_log)
        self.flows.skip_existing()
        argv = agent_argv(self.python, self.agent_module, config, self.tree.root, self.flow_log, self.metrics_addr,
                          self.collector_addr)
        self.agent = spawner.start("aimesh agent", "agent", argv, self.workdir / "agent.log")

    def start_calls_follower(self, spawner: Spawner) -> None:
        """`aimesh calls -f -o json` into calls.jsonl; pump() reads it like the flow log. Restarted when it exits."""
        if not self.collector_addr or self.collector is None:
            return
        self.followers += 1
        log = self.workdir / f"calls-{self.followers}.jsonl"
        self.calls_follower = spawner.start("aimesh calls -f", "calls", calls_argv(
            self.python, self.collector_addr, self.token_file, follow=True), log)
        self.follow_again = time.monotonic() + FOLLOW_RESTART_S

    def keep_following(self, spawner: Spawner) -> None:
        f = self.calls_follower
        if f is None or f.running() or self.stop.requested or time.monotonic() < self.follow_again:
            return
        for line in f.log.read_lines():
            self._call_line(line)
        self.start_calls_follower(spawner)

    def _call_line(self, line: str) -> None:
        record = self.calls.add_line(line)
        if record is not None and not self.console.live:
            self.console.line(view.call_line(record))

    def list_calls(self) -> None:
        """Every call the collector stored, into the table (each once): the closing table misses none."""
        if not self.collector_addr or self.collector is None or not self.collector.running():
            return
        try:
            r = subprocess.run(calls_argv(self.python, self.collector_addr, self.token_file, follow=False, limit=0),
                               capture_output=True, text=True, timeout=20, cwd=Path(__file__).resolve().parents[2])
        except (OSError, subprocess.SubprocessError) as e:
            self.calls.last_error = f"aimesh calls failed: {e}"
            return
        if r.returncode != 0:
            self.calls.last_error = " ".join((r.stderr or "").split())[:200] or f"aimesh calls exited {r.returncode}"
            return
        lines = [x for x in r.stdout.splitlines() if x.strip()]
        self.stored_calls = len(lines)
        for line in lines:
            self._call_line(line)

    def collector_summary(self) -> list[str]:
        """The last flows the collector stored, as `aimesh flows` prints them."""
        if not self.collector_addr or self.collector is None or not self.collector.running():
            return []
        try:
            r = subprocess.run([self.python, "-m", "agent", "flows", "--collector", self.collector_addr,
                                "--token-file", str(self.token_file), "--limit", "8"],
                               capture_output=True, text=True, timeout=20,
                               cwd=Path(__file__).resolve().parents[2])
        except (OSError, subprocess.SubprocessError) as e:
            return [f"aimesh flows failed: {e}"]
        return (r.stdout or r.stderr).rstrip().splitlines()

    def wait_agent(self, timeout_s: float) -> str | None:
        """None when /healthz says 200, else why not."""
        assert self.agent is not None
        deadline = time.monotonic() + timeout_s
        while not self.stop.requested:
            if not self.agent.running():
                return f"the agent {self.agent.state()} before it was healthy"
            if healthz_ok(self.metrics_addr):
                return None
            if time.monotonic() >= deadline:
                return f"the agent was not healthy on http://{self.metrics_addr}/healthz after {timeout_s:g}s"
            self.message = "waiting for the agent's /healthz (it compiles and loads the BPF programs first)"
            self.tick()
            time.sleep(0.25)
        return None

    def start_workloads(self, spawner: Spawner) -> str | None:
        """Servers first (each in its cgroup, so its bind makes it an endpoint of its identity), then the clients."""
        assert self.tree is not None
        plan = self.demo.plan
        for spec in plan.servers:
            self.workloads.append(spawner.start(
                spec.name, spec.kind + "-server", server_argv(self.python, spec, self.tls),
                self.workdir / f"{spec.name}.log", self.tree.procs_file(spec.cgroup), spec.cgroup))
        problem = self.wait_servers()
        if problem:
            return problem
        for spec in plan.clients:
            self.workloads.append(spawner.start(
                spec.name, "client", client_argv(self.python, spec, plan, self.tls), self.workdir / f"{spec.name}.log",
                self.tree.procs_file(spec.cgroup), spec.cgroup))
        return None

    def wait_servers(self) -> str | None:
        pending = {s.name: s.port for s in self.demo.plan.servers}
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        by_name = {c.name: c for c in self.workloads}
        while pending and not self.stop.requested:
            for name, port in list(pending.items()):
                if not by_name[name].running():
                    lines = tail_lines(by_name[name].log.path, 5)
                    return f"server {name} {by_name[name].state()}: {' | '.join(lines) or 'no output'}"
                if tcp_accepts("127.0.0.1", port):
                    del pending[name]
            if not pending:
                break
            if time.monotonic() >= deadline:
                return f"servers not listening after {SERVER_READY_TIMEOUT_S:g}s: {', '.join(sorted(pending))}"
            self.message = f"starting servers: waiting for {', '.join(sorted(pending))}"
            self.tick()
            time.sleep(0.1)
        return None

    # -- the loop --

    def pump(self) -> None:
        """Read what the agent and the workloads wrote since last time."""
        live = self.console.live
        if self.flows is not None:
            for line in self.flows.read_lines():
                record = self.table.add_line(line)
                if record is not None and not live:
                    self.console.line(view.decision_line(record, color=False))
        if self.calls_follower is not None:
            for line in self.calls_follower.log.read_lines():
                self._call_line(line)
        for child in ([self.agent] if self.agent else []) + self.workloads:
            for line in child.log.read_lines():
                if line.strip():
                    child.last_line = line.strip()
                    if not live:
                        self.console.line(view.plain_workload_line(child.name, child.last_line))

    def frame(self) -> view.Frame:
        assert self.tree is not None
        agent_state = "-"
        if self.agent is not None:
            agent_state = f"pid {self.agent.pid} {self.agent.state()}"
        subtitle = f"mode {config_mode(self.demo.agent_config)}   agent {agent_state}   subtree {self.tree.root}"
        rows: list[view.WorkloadStatus] = []
        if self.agent is not None:
            rows.append(view.WorkloadStatus(self.agent.name, "agent", "-", "-", self.agent.pid, self.agent.state(),
                                            self.agent.last_line))
        for c in self.workloads:
            ident = expected_identity(self.demo.agent_config, self.tree.relative(c.cgroup))
            rows.append(view.WorkloadStatus(c.name, c.role, c.cgroup, ident, c.pid, c.state(), c.last_line))
        return view.Frame(
            title="aimesh demo: eBPF governance for AI workloads   Ctrl-C stops and cleans up",
            subtitle=subtitle,
            elapsed_s=time.monotonic() - self.started,
            table=self.table,
            workloads=rows,
            message=self.message,
            calls=self.calls,
        )

    def tick(self, force: bool = False) -> None:
        self.pump()
        now = time.monotonic()
        if self.console.live and (force or now >= self.next_frame) and self.tree is not None:
            self.console.paint(self.frame())
            self.next_frame = now + FRAME_INTERVAL_S
        elif not self.console.live and self.message and self.message != self.said:
            self.console.line(f"-- {self.message}")
            self.said = self.message

    def watch(self, duration_s: float, spawner: Spawner) -> str | None:
        """Follow until stopped or `duration_s` (0 = no limit); returns why it failed, if it did."""
        assert self.agent is not None
        self.message = ""
        began = time.monotonic()
        while not self.stop.requested:
            self.keep_following(spawner)
            self.tick()
            if not self.agent.running():
                return f"the agent {self.agent.state()}"
            if duration_s > 0 and time.monotonic() - began >= duration_s:
                break
            time.sleep(TICK_S)
        return None

    # -- cleanup --

    def cleanup(self) -> list[str]:
        """Stop what was started and remove what was made; returns the problems."""
        problems: list[str] = []
        killed = stop_children(self.workloads, WORKLOAD_GRACE_S)
        if killed:
            problems.append(f"workloads needed SIGKILL: {', '.join(killed)}")
        if self.agent is not None:
            killed = stop_children([self.agent], AGENT_GRACE_S)
            if killed:
                problems.append(f"the agent did not stop on SIGTERM within {AGENT_GRACE_S:g}s (killed)")
        self.pump()
        if self.calls_follower is not None:
            stop_children([self.calls_follower], WORKLOAD_GRACE_S)
            self.pump()
        self.list_calls()                          # after the agent flushed its last calls
        self.summary = self.collector_summary()   # after the agent flushed its last records
        if self.collector is not None:
            killed = stop_children([self.collector], WORKLOAD_GRACE_S)
            if killed:
                problems.append("the collector did not stop on SIGTERM (killed)")
        if self.tree is not None:
            problems += [f"cgroup not removed: {p}" for p in remove_tree(self.tree)]
        return problems

    def failed_workloads(self) -> list[Child]:
        return [c for c in self.workloads if c.popen.returncode not in (0, -signal.SIGTERM)]


def _err(msg: str) -> None:
    print(f"aimesh demo: {msg}", file=sys.stderr, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


class PreflightError(Exception):
    """The demo cannot start here (bad input or environment); nothing was made yet."""


@dataclass(frozen=True)
class Preflight:
    demo: DemoConfig
    mount: Path


def preflight(args: argparse.Namespace) -> Preflight:
    """Everything checked before anything is made: config, flags, root, cgroup2, free ports."""
    config_path = Path(args.config)
    try:
        demo = load_demo_config(config_path)
        host, port = parse_hostport(args.metrics_addr)
    except (DemoConfigError, ValueError) as e:
        raise PreflightError(str(e)) from None
    if args.duration < 0:
        raise PreflightError("--duration: must be >= 0")
    if os.geteuid() != 0:
        raise PreflightError("run as root: the agent loads BPF programs, and the demo makes cgroups")
    try:
        mount = find_cgroup2_mount(Path("/proc/mounts").read_text())
    except OSError as e:
        raise PreflightError(f"/proc/mounts: {e.strerror}") from None
    if mount is None:
        raise PreflightError("no cgroup2 filesystem is mounted (see /proc/mounts); mount one, e.g. "
                             "`mount -t cgroup2 none /sys/fs/cgroup/unified`")
    if tcp_accepts(host, port):
        raise PreflightError(f"something already listens on {args.metrics_addr} (another agent?); "
                             "pass --metrics-addr HOST:PORT")
    if args.collector_addr:
        chost, cport = parse_hostport(args.collector_addr)
        if tcp_accepts(chost, cport):
            raise PreflightError(f"something already listens on {args.collector_addr}; pass --collector-addr HOST:PORT")
    busy = [f"{s.name}:{s.port}" for s in demo.plan.servers if tcp_accepts("127.0.0.1", s.port)]
    if busy:
        raise PreflightError(f"ports already in use on 127.0.0.1: {', '.join(busy)}; change them in {config_path}")
    return Preflight(demo=demo, mount=Path(mount))


def drive(session: Session, args: argparse.Namespace) -> str | None:
    """Make, start, watch; returns why it failed, if it did. Stops early when a stop signal arrives."""
    try:
        session.make_cgroups()
        session.make_tls()
        spawner = session.spawner()
        session.start_collector(spawner)
        session.start_agent(spawner)
        failure = session.wait_agent(args.agent_timeout)
        if failure is None and not session.stop.requested:
            session.start_calls_follower(spawner)
            failure = session.start_workloads(spawner)
        if failure is None and not session.stop.requested:
            failure = session.watch(args.duration, spawner)
        return failure
    except (CgroupError, SpawnError, TlsError, OSError) as e:
        return str(e)


def report(session: Session, args: argparse.Namespace, failure: str | None, problems: list[str]) -> int:
    """The closing lines; the exit status."""
    console, table = session.console, session.table
    console.line(f"aimesh demo: ran {time.monotonic() - session.started:.0f}s, {table.total} decisions: "
                 f"{view.verdict_summary(table.totals)}"
                 + (f", {table.bad_lines} unreadable flow-log lines ({table.last_error})" if table.bad_lines else ""))
    failed = session.failed_workloads()
    for child in failed:
        _err(f"workload {child.name} {child.state()}: {child.last_line or 'no output'}")
    if failure:
        _err(failure)
        if session.agent is not None:
            lines = tail_lines(session.agent.log.path, 25)
            if lines:
                _err(f"last lines of the agent's output ({session.agent.log.path}):")
                for line in lines:
                    _err(f"  {line}")
    for p in problems:
        _err(p)
    status = 1 if failure or problems or failed else 0
    if args.keep_logs or status:
        console.line(f"aimesh demo: logs kept in {session.workdir}")
    else:
        shutil.rmtree(session.workdir, ignore_errors=True)
    if session.stored_calls is not None:
        calls = session.calls
        console.line(f"aimesh demo: {session.stored_calls} model calls in the collector; MODEL CALLS "
                     f"(aimesh calls --summary --collector {session.collector_addr}):")
        for line in view.call_rows(calls, color=False, empty="(none: no model call reached the collector)"):
            console.line(f"  {line}")
    elif session.calls.last_error:
        console.line(f"aimesh demo: model calls not listed: {session.calls.last_error}")
    if session.summary:
        console.line(f"aimesh demo: the last flows in the collector (aimesh flows --collector {session.collector_addr}):")
        for line in session.summary:
            console.line(f"  {line}")
    if args.flow_log:
        console.line(f"aimesh demo: flow log at {session.flow_log}")
    if session.tree is not None and not problems:
        started = len(session.workloads) + (1 if session.agent else 0)
        console.line(f"aimesh demo: cleaned up: stopped {_plural(started, 'process')}, removed {session.tree.root}")
    return status


def run(args: argparse.Namespace) -> int:
    """Run the demo; the exit status: 0 stopped (signal or --duration), 1 something failed, 2 cannot start here."""
    try:
        pre = preflight(args)
    except PreflightError as e:
        _err(str(e))
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="aimesh-demo-"))
    stop = StopFlag()
    session = Session(
        config_path=Path(args.config), demo=pre.demo, mount=pre.mount, metrics_addr=args.metrics_addr,
        console=Console(out=sys.stdout, live=sys.stdout.isatty() and not args.plain), stop=stop, workdir=workdir,
        flow_log=Path(args.flow_log).resolve() if args.flow_log else workdir / "flows.jsonl",
        agent_module=args.agent_module, collector_addr=args.collector_addr or None,
    )
    # Until everything is removed, SIGINT/SIGTERM/SIGHUP only set the flag: a second Ctrl-C cannot cut the cleanup.
    previous = install_handlers(stop)
    failure: str | None = "interrupted by an unexpected error"
    problems: list[str] = []
    try:
        failure = drive(session, args)
    finally:
        reason = stop.signal_name or ("failed" if failure else "duration reached")
        session.message = f"stopping ({reason}): cleaning up"
        try:
            session.tick(force=True)
        finally:
            problems = session.cleanup()
            restore_handlers(previous)
            session.console.close()
    return report(session, args, failure, problems)
