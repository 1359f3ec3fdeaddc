"""The node agent: wires config -> compile -> kernel maps, and kernel events -> decode -> flow log and metrics.

The datapath lives in bpffs (agent/kernel/pins.py) and outlives this process: start adopts what is pinned for the
cgroup root (building it first with the short-lived loader when the programs changed or nothing is there), stop
leaves it in force. `aimesh uninstall` removes it; `--ephemeral` removes it at exit (development).

Signals: SIGHUP re-reads the config (a bad one is rejected and the old policy stays); SIGTERM/SIGINT stop the agent
and leave the datapath enforcing. With the config watch on (by default when the file is in a kubelet-mounted
ConfigMap) a change of the file is re-read the same way, within about a second (ConfigWatch).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from agent.config import GATEWAY, GATEWAY_CGROUP, Config, ConfigError, limits_of, load_config
from agent.gateway.node import DOWN as GATEWAY_DOWN, GatewayNode, reload_refusal
from agent.export.flow_metrics import FlowTally
from agent.export.http import MetricsServer
from agent.export.metrics import AgentCollector, build_registry
from agent.flows.log import FlowLog
from agent.flows.sink import RecordSink, RecordsLogSink
from agent.identity.assigner import IdentityAssigner
from agent.identity.cgroups import cgroup2_mount, cgroup_id
from agent.identity.addrwatch import AddressWatch
from agent.identity.host import RESOLV_CONF, dns_resolver_keys, local_address_keys
from agent.config_watch import ConfigWatch, kubelet_mounted
from agent.identity.k8s.model import ClusterState
from agent.identity.k8s.source import KubernetesSource
from agent.kernel.pins import FORMAT as PIN_FORMAT
from agent.kernel.pins import DatapathDir, PinError, RootLock, check_format, prune_dir, read_manifest, write_manifest
from agent.errors import AgentError
from agent.flows.denials import DenialAggregator, denial_record
from agent.flows.decode import DecodeError, decode_agent_event, decode_decision, format_addr, to_json, wall_time
from agent.flows.records import (UdpWindow, decision_record, decode_flow_event, flow_record, udp_aggregate)
from agent.kernel import abi
from agent.kernel.maps import MapError
from agent.export.call_sinks import CallDispatch, CallSinks, CommCache, build_call_sinks
from agent.collector.channel import ConfigError as ChannelError
from agent.export.collector_client import FlowExporter
from agent.export.genai_metrics import IdentityCompute
from agent.export.model_metrics import ModelCallTally
from agent.identity.cgroups import walk as cgroup_walk
from agent.l7.capture import CaptureDecodeError, CaptureTracker, decode_capture_event
from agent.l7.llm import Protocol as LlmProtocol
from agent.l7.record import DecoderOptions
from agent.l7.redact import compile_redaction
from agent.l7.tls_visibility import NotVisible, TlsNotVisibleTally, TlsVisibility, describe_not_visible
from agent.policy.capacity import check_capacity
from agent.policy.compile import compile_image
from agent.policy.identities import IdentityMeta, IdentityNumbering

log = logging.getLogger("aimesh.agent")

LOOPBACK6 = b"\0" * 15 + b"\1"
LOOPBACK4_PREFIX = b"\0" * 10 + b"\xff\xff\x7f"   # ::ffff:127.0.0.0/104
POLL_MS = 25          # how often queued decision and flow events are drained (they do not wake the agent)
DRAIN_BUDGET = 20000  # records read from one ring per loop turn: signals and reloads are never starved by a flood
DRAIN_TIME_S = 0.05   # ... and at most this long per turn, so signals, reloads and sunsets act within ~100 ms
FULL_LOG_EVERY_S = 60  # a full map is logged at once, then at most this often
MAX_WRITE_BACKLOG = 64  # spool batches queued for the disk before the loop stops reading the rings
HOUSEKEEPING_S = 15   # prune exited processes and ports no socket holds; refresh the clock offset


@dataclass
class AgentOptions:
    config_path: Path
    cgroup_root: Optional[Path] = None
    metrics_addr: str = "127.0.0.1:9464"
    flow_log: Optional[str] = None
    records_log: Optional[str] = None          # flow records as JSON lines (local debugging, tests)
    collector: Optional[str] = None            # overrides config collector.address
    agent_id: Optional[str] = None             # overrides config collector.agent_id
    limits: Optional[abi.Limits] = None          # map capacities; default: the config's `limits:` section
    ephemeral: bool = False                    # remove the datapath at exit (development); default: leave it in force
    bpf_root: Optional[Path] = None            # bpf/ sources to build from (tests of upgrades); default: the package's
    pin_base: Optional[Path] = None            # default /sys/fs/bpf/aimesh
    kubeconfig: Optional[Path] = None          # overrides config kubernetes.kubeconfig (development)
    node_name: Optional[str] = None            # overrides config kubernetes.node_name (default: $NODE_NAME)
    watch_config: Optional[bool] = None        # reload when the file changes; None: when it is kubelet-mounted
    state_dir: Optional[Path] = None           # the gateway's policy file and records socket; default /run/aimesh/<pins>
    gateway_process: bool = True               # run the node gateway when the config uses one (False: run by hand)


def preflight() -> None:
    """The checks that make a clear error instead of a traceback."""
    if os.geteuid() != 0:
        raise AgentError("aimesh agent must run as root: it loads BPF programs and attaches them to cgroups")
    if not Path("/sys/fs/bpf").exists():
        raise AgentError("this kernel has no BPF filesystem (/sys/fs/bpf missing): is CONFIG_BPF_SYSCALL set?")
    if not os.path.ismount("/sys/fs/bpf"):
        raise AgentError("bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf): the datapath is pinned there")


def loader_preflight() -> None:
    """What building the programs needs (only when the pinned build is missing or different)."""
    rel = os.uname().release
    if not (Path(f"/lib/modules/{rel}/build").exists() or Path("/sys/kernel/kheaders.tar.xz").exists()):
        raise AgentError(f"kernel headers for {rel} are missing (no /lib/modules/{rel}/build and no "
                         "/sys/kernel/kheaders.tar.xz): bcc needs them; run `make setup`")
    import importlib.util
    if importlib.util.find_spec("bcc") is None:   # found, not imported: the loader child imports it
        e = "no module named bcc"
        raise AgentError(f"bcc is not importable ({e}): install Debian's python3-bpfcc; run `make setup`") from None


def build_exporter(config: Config, opts: AgentOptions):
    """The collector exporter from the config's collector section and the flag overrides; None when no address."""
    cfg = exporter_config(config, opts)
    if cfg is None:
        return None
    try:
        return FlowExporter(cfg)
    except ChannelError as e:   # the spool directory cannot be made or is shared
        raise AgentError(f"collector: {e}") from None


def exporter_config(config: Config, opts: AgentOptions):
    """The flow exporter's ExporterConfig (the model-call exporter derives its own); None when no address."""
    c = config.collector
    target = opts.collector or c.address
    if not target:
        return None
    from agent.collector.channel import ClientTls, ConfigError as ChannelError, read_token
    from agent.export.collector_client import ExporterConfig
    tls = None
    if c.tls or c.tls_ca or c.tls_cert:
        tls = ClientTls(ca=c.tls_ca, cert=c.tls_cert, key=c.tls_key, server_name=c.tls_server_name)
    try:
        token = read_token(None, c.token_file)
        cfg = ExporterConfig(target=target, agent_id=opts.agent_id or c.agent_id or os.uname().nodename, tls=tls,
                             token=token, spool_dir=c.spool_dir, spool_max_bytes=c.spool_max_bytes,
                             max_queue_records=c.queue_records, batch_max_records=c.batch_size,
                             flush_interval_s=c.flush_interval, durable=c.spool_dir is not None)
        cfg.validate()
        if tls:
            tls.credentials()   # read the files now: a missing key is a start-up error, not a silent export failure
        return cfg
    except ChannelError as e:
        raise AgentError(f"collector: {e}") from None


class Agent:
    def __init__(self, opts: AgentOptions, cluster: Optional[ClusterState] = None) -> None:
        """cluster: a ClusterState someone else fills (tests); default: one the agent's own watch fills when the
        config uses Kubernetes (agent/identity/k8s/source.py)."""
        self.opts = opts
        self._lock: Optional[RootLock] = None        # held on the datapath directory while the agent runs
        self.k8s = KubernetesSource(cluster, opts.kubeconfig, opts.node_name)
        self._workloads = None                      # cgroup id -> WorkloadData, when Kubernetes is on
        self.resolved: tuple = ()                   # the remote ends the live generation was compiled with
        self.numbering = IdentityNumbering()
        self.identities: dict[int, IdentityMeta] = {}
        self.config: Optional[Config] = None
        self.healthy = False
        self.degraded: dict[str, str] = {}          # reason -> what an operator should know (see /healthz)
        self._full_logged: dict[str, float] = {}
        self._kernel_full: dict[str, tuple[int, float]] = {}
        self.last_tick = time.monotonic()           # the main loop's heartbeat (liveness)
        self.state = {"programs_attached": 0, "reloads_ok": 0, "reloads_failed": 0, "decode_errors": 0,
                      "ring_events": {"decision_events": 0, "flow_events": 0, "agent_events": 0, "capture_events": 0},
                      "model_calls": 0, "agent_events_resyncs": 0}
        self._agent_events_lost = 0                 # COUNTER_AGENT_EVENTS_LOST at the last cgroup resync
        self._reload = False
        self._stop = False
        self.config_watch: Optional[ConfigWatch] = None
        self._next_transition: Optional[datetime] = None
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()
        self._local_addrs: set[bytes] = set()
        self._addr_watch: Optional[AddressWatch] = None   # None: rescanned every second instead
        self._unlisted_seen = 0     # COUNTER_INGRESS_UNLISTED_* at the last look
        self._resolv_watch = ConfigWatch(RESOLV_CONF)
        self._dns_resolvers_logged: list[bytes] = []   # resolv.conf's nameservers are the resolvers `dns: allow` opens
        self.node = os.uname().nodename
        self.agent_id = opts.agent_id or self.node
        self.exporter = None
        self._udp_window = UdpWindow()
        self.denials = DenialAggregator(time.monotonic_ns())
        self._read_pos: dict[str, int] = {}      # per ring: read up to here, saved and released up to consumer_pos
        self._write_failures_seen = 0
        self._udp_last = time.monotonic_ns()
        self._decoder_cache: tuple = (None, {})
        self.capture = CaptureTracker(options=self._decoder_options)
        self.model_calls = ModelCallTally()
        self.call_sinks: Optional[CallSinks] = None
        self._comms = CommCache()
        self._drain_cut = False     # the last drain stopped at its budget or time limit: no sleep before the next
        self._dispatch = CallDispatch(lambda: self.identities, self._comms,
                                      lambda: self.call_sinks.sinks if self.call_sinks is not None else (),
                                      self._sink_failed, workload=self._caller_workload)
        self.tls_probes = None                      # agent/kernel/uprobes.TlsProbes once the datapath is in force
        self.tls_visibility = TlsVisibility()
        self.tls_not_visible = TlsNotVisibleTally()
        self.gateway = None                         # agent/gateway/node.GatewayNode when config.uses_gateway
        self._gateway_id = -1                       # the reserved `gateway` identity's number, once it runs

    # ---- signals only set flags; the loop acts ----
    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def run(self) -> int:
        preflight()
        from agent.kernel.datapath import limit_malloc_arenas
        limit_malloc_arenas()   # before any thread starts
        watch = self.opts.watch_config
        if watch is None:
            watch = kubelet_mounted(self.opts.config_path)
        if watch:   # before the first load: a change while starting is reloaded at the first turn of the loop
            self.config_watch = ConfigWatch(self.opts.config_path)
            log.info("watching %s for changes (reloaded like SIGHUP)", self.opts.config_path)
        config = load_config(self.opts.config_path)
        self.limits = self.opts.limits or limits_of(config)
        self.agent_id = self.opts.agent_id or config.collector.agent_id or self.node

        mount = cgroup2_mount()
        root = Path(self.opts.cgroup_root) if self.opts.cgroup_root else mount
        try:
            root.resolve().relative_to(mount)
        except ValueError:
            raise AgentError(f"--cgroup-root {root} is not inside the cgroup2 mount {mount}") from None
        if not root.is_dir():
            raise AgentError(f"--cgroup-root {root} does not exist")
        self.root = root

        self.pins = DatapathDir.for_root(cgroup_id(root), self.opts.pin_base) if self.opts.pin_base \
            else DatapathDir.for_root(cgroup_id(root))
        lock = RootLock(self.pins)
        try:
            lock.acquire()
            manifest = read_manifest(self.pins)
            if manifest is not None:
                check_format(self.pins, manifest)
        except PinError as e:
            lock.release()
            raise AgentError(str(e)) from None
        self._lock = lock
        try:
            return self._run_locked(config, manifest, mount, root)
        finally:
            lock.release()

    def _open_datapath(self, manifest: Optional[dict]):
        """Adopt the pinned build when it is the one these sources and limits make; else build it (loader child)."""
        from agent.kernel.datapath import Datapath
        from agent.kernel.loader import LoadError, build_digest, build_inputs, reap_stale, run_child
        stale = reap_stale(self.pins)   # a loader killed with its agent left these half-pinned
        if stale:
            log.warning("unpinned %d objects a killed loader left half-pinned in %s", len(stale), self.pins.progs)
        text, cflags = build_inputs(self.pins, self.limits, self.opts.bpf_root)
        digest = build_digest(text, cflags)
        build = (manifest or {}).get("build")
        if build and build.get("build") == digest and Path(build.get("progs", "")).is_dir():
            log.info("adopting the pinned datapath in %s (build %s)", self.pins.path, digest)
            self.loaded = False
        else:
            if build:
                log.info("pinned build %s differs from this agent's %s: loading the new programs", build.get("build"),
                         digest)
            loader_preflight()
            t0 = time.monotonic()
            try:
                build = run_child(self.pins, self.limits, self.opts.bpf_root, lock=self._lock)
            except LoadError as e:
                raise AgentError(str(e)) from None
            log.info("compiled and loaded the programs in %.1fs (build %s)", time.monotonic() - t0, build["build"])
            self.loaded = True
        self.build = build
        return Datapath(self.pins, self.limits, build["maps"])

    def manifest(self) -> dict:
        from agent import __version__
        return {"format": PIN_FORMAT, "aimesh_version": __version__, "cgroup_root": str(self.root),
                "build": self.build, "identities": self.numbering.to_state(),
                "config_generation": self.state["reloads_ok"] + 1, "config_path": str(self.opts.config_path),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "agent_pid": os.getpid()}

    def _run_locked(self, config: Config, manifest: Optional[dict], mount: Path, root: Path) -> int:
        try:
            self.numbering = IdentityNumbering.from_state((manifest or {}).get("identities"))
        except ValueError as e:
            raise AgentError(f"{self.pins.path}: {e}") from None
        self.flow_log = FlowLog(self.opts.flow_log, what="--flow-log")
        self.records_log = FlowLog(self.opts.records_log, what="--records-log")
        self.exporter = build_exporter(config, self.opts)
        flow_export = self.exporter.config if self.exporter is not None else None
        self.datapath = dp = self._open_datapath(manifest)
        self.flow_tally = FlowTally(lambda: self.exporter.stats() if self.exporter else None, self._flow_losses)
        self.sinks: list[RecordSink] = [self.flow_tally] + \
            ([RecordsLogSink(self.records_log)] if self.records_log.enabled else []) + \
            ([self.exporter] if self.exporter else [])
        dp.all_decisions = self.flow_log.enabled   # the flow log wants every decision; metrics read the kernel's counts
        self.model_calls = ModelCallTally()   # the kernel's capture counters are in AgentCollector
        try:
            self.call_sinks = build_call_sinks(config.telemetry, flow_export, node=self.node,
                                               mono_to_wall_ns=lambda: self._mono_to_wall,
                                               records_log=self.records_log, tally=self.model_calls,
                                               wall=lambda ts: wall_time(ts, self._mono_to_wall))
        except (ValueError, ConfigError, ChannelError) as e:
            dp.close()
            raise AgentError(f"model-call sinks: {e}") from None
        if config.uses_gateway and self.opts.gateway_process:
            self.gateway = GatewayNode(self.opts.state_dir or Path("/run/aimesh") / self.pins.path.name,
                                       dp.map_paths["gateway_origin"], root / GATEWAY_CGROUP, self._dispatch,
                                       mono_to_wall_ns=lambda: self._mono_to_wall)
            self.gateway.prepare()   # before identities are assigned: its cgroup gets the reserved `gateway`
        collector = AgentCollector(dp.counters, lambda: dp.decision_counts() if self.healthy else {},
                                   lambda: self.identities, self._metrics_state)
        compute = IdentityCompute(self._identity_cgroups, mount)
        try:
            self.k8s.mount = mount
            self.k8s.start(config)
            self._workloads = self.k8s.workload if self.k8s.active else None   # records name the pod where known
        except AgentError:
            dp.close()
            raise
        try:
            metrics = MetricsServer(self.opts.metrics_addr,
                                    build_registry(collector, [self.flow_tally, *self.call_sinks.collectors(),
                                                               self.tls_not_visible, compute,
                                                               *self.k8s.collectors(),
                                                               *([self.gateway] if self.gateway else [])]),
                                    lambda: self.healthy,
                                    health=lambda: (not self.degraded, sorted(self.degraded)),
                                    loop_age_s=lambda: time.monotonic() - self.last_tick if self.healthy else 0.0)
        except (OSError, ValueError) as e:
            dp.close()
            raise AgentError(str(e)) from None
        metrics.start()
        if self.exporter and self.exporter.config.durable:
            self._recover_checkpoint()
        if self.exporter:
            self.exporter.start()
        self.call_sinks.start()
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        self.assigner = IdentityAssigner(dp, self.numbering, mount, root, self._on_map_full, stats=self.k8s.stats)
        # what a previous agent left in the kernel, so the resync also clears what no longer matches
        self.assigner.cgroups = dp.identity_entries("cgroup_identity")
        self.assigner.inherit = dp.identity_entries("cgroup_inherit")
        self.assigner.processes = dp.identity_entries("process_identity")
        self._agent_events_lost = dp.counters()[abi.COUNTER_AGENT_EVENTS_LOST]   # earlier losses: the install resyncs
        try:
            self._install(config)
            self._watch_addresses()   # subscribed before the first scan: no change falls between the two
            self._refresh_local_addresses()
            dp.attach(root, Path(self.build["progs"]))
            write_manifest(self.pins, self.manifest())
            removed = prune_dir(self.pins.progs, {Path(self.build["progs"]).name}) + \
                prune_dir(self.pins.maps, set(self.build["maps"].values()))
            if removed:
                log.info("unpinned %d objects of the previous build", len(removed))
            self.state["programs_attached"] = dp.attached_count
            self._start_tls(root)
            self._drain()   # what the kernel queued while no agent ran
            if self.gateway is not None:
                self._gateway_id = self.numbering.id_of(GATEWAY)
                try:
                    self.gateway.start(config, self.numbering.to_state()["ids"])
                except (OSError, ValueError) as e:   # the state directory, the policy, the records socket
                    raise AgentError(f"gateway: {e}") from None
            self.healthy = True
            log.info("agent ready: %d identities, %d policies, governing %s, metrics on %s",
                     len(config.identities), len(config.policies), root, self.opts.metrics_addr)
            self._loop()
        finally:
            self.healthy = False
            try:
                if self.config is not None:   # started: what the kernel queued meanwhile
                    self._drain(final=True)
                    self._flush_denials(time.monotonic_ns())
                    self._drain_udp(final=True)
            except Exception:
                log.exception("final drain failed")
            if self.exporter:
                st = self.exporter.close()
                log.info("exporter closed: %d records sent, %d spooled batches kept, %d dropped",
                         st.sent_records, st.spool_batches, st.dropped)
            if self.tls_probes is not None:
                self.tls_probes.close()
            if self.gateway is not None:
                self._gateway_stop()
            self.k8s.stop()
            try:
                self.call_sinks.close()
            except Exception:  # noqa: BLE001 - stopping goes on: the datapath and logs are closed below
                log.exception("closing the model-call sinks failed")
            dp.close()
            if self.opts.ephemeral:
                from agent.kernel.install import uninstall
                removed = uninstall(self.pins, root)
                log.info("ephemeral: removed the datapath (%d pinned objects)", len(removed))
            else:
                log.info("the datapath stays in force in %s (aimesh uninstall removes it)", self.pins.path)
            metrics.stop()
            self.flow_log.close()
            self.records_log.close()
            log.info("agent stopped")
        return 0

    def _install(self, config: Config) -> None:
        """Compile config into the inactive generation, flip to it, and re-assign workload identities."""
        view = self.k8s.view()
        self._apply(config, self.k8s.resolve(config, view))
        self.assigner.view = view
        # children the kernel labelled at fork (bpf/watch.c) are not in assigner.processes: the resync judges them too
        self.assigner.processes = self.datapath.identity_entries("process_identity")
        self.assigner.resync(config)
        self.k8s.installed(self.assigner, view)

    def _apply(self, config: Config, resolved: tuple) -> None:
        """Compile config and the cluster's remote ends into the inactive generation and flip to it."""
        image = compile_image(config, self.numbering, self.datapath.next_gen(), datetime.now(timezone.utc), resolved)
        self.datapath.interim_ns = int(config.telemetry.interim_interval * 1e9)
        self.datapath.set_capture_budget(config.limits.capture_max_request_bytes,
                                         config.limits.capture_max_response_bytes)
        for w in image.warnings:
            log.warning("%s", w)
        # Both generations live in the maps during the flip: what is live plus the new image must fit. Checked before
        # anything is written, so a config that does not fit changes nothing.
        check_capacity(image, self.datapath.limits,
                       {name: used for name, (used, _cap) in self.datapath.map_usage().items()})
        if hasattr(self, "build"):
            write_manifest(self.pins, self.manifest())   # numbers first: the maps below may hold new ones
        self.datapath.apply(image)
        self._set_dns_resolvers(config)
        self._installed_wall = datetime.now(timezone.utc)
        self.identities = image.identities
        self.config = config
        self.resolved = resolved
        self._next_transition = image.next_transition

    def _set_dns_resolvers(self, config: Config) -> None:
        self._resolv_watch.seen_now()
        keys = dns_resolver_keys(config.dns_resolvers)
        self.datapath.set_dns_resolvers(keys)
        if self._dns_resolvers_logged != [bytes(k.addr) for k in keys]:
            self._dns_resolvers_logged = [bytes(k.addr) for k in keys]
            log.info("dns: %s: port 53 is open to %d resolvers (%s and dns_resolvers)", config.dns, len(keys),
                     RESOLV_CONF)

    def _reload_config(self) -> None:
        try:
            config = load_config(self.opts.config_path)
            if self.opts.limits is None and limits_of(config) != self.limits:
                raise ConfigError(f"{self.opts.config_path}: limits: the map capacities changed; they apply at the "
                                  "next agent start (the running maps cannot be resized), so this reload changes "
                                  "nothing: restart the agent")
            if self.config is not None and config.collector != self.config.collector:
                raise ConfigError(f"{self.opts.config_path}: collector: changed; the exporter is set up at start, so "
                                  "this reload changes nothing: restart the agent to apply it")
            refusal = self.k8s.reload_refusal(self.config, config) or reload_refusal(self.config, config)
            if refusal:
                raise ConfigError(f"{self.opts.config_path}: {refusal}")
            changed = self.config.telemetry.sinks_differ(config.telemetry) if self.config is not None else None
            if changed:
                raise ConfigError(f"{self.opts.config_path}: telemetry.{changed}: changed; the model-call sinks are "
                                  "set up at start, so this reload changes nothing: restart the agent to apply it")
            self._install(config)
            if self.gateway is not None:   # model policies apply live: the supervisor SIGHUPs the gateway
                self.gateway.reload(config, self.numbering.to_state()["ids"])
        except (ConfigError, AgentError, ValueError, OSError) as e:
            self.state["reloads_failed"] += 1
            log.error("config reload rejected, the previous policy stays in force: %s", e)
            return
        except Exception as e:  # noqa: BLE001 - a bug in a reload must not end enforcement or the agent
            self.state["reloads_failed"] += 1
            log.error("config reload failed (%s: %s), the previous policy stays in force", type(e).__name__, e)
            return
        self.state["reloads_ok"] += 1
        log.info("config reloaded: %d identities, %d policies", len(config.identities), len(config.policies))

    def _on_map_full(self, name: str, err: Exception) -> None:
        """The kernel refused an entry the agent had to write: count it, log it (rate-limited), degrade health, and
        for workload identities fail closed (a workload we could not label must not pass for an ungoverned one)."""
        full = self.state.setdefault("map_full", {})
        full[name] = full.get(name, 0) + 1
        now = time.monotonic()
        if now - self._full_logged.get(name, -FULL_LOG_EVERY_S) >= FULL_LOG_EVERY_S:
            self._full_logged[name] = now
            log.error("map %s is full (%s; %d refused so far): %s", name, err, full[name],
                      "unmanaged workloads are now treated as governed and enforced until it has room"
                      if name in ("cgroup_identity", "process_identity") else "raise limits: and restart the agent")
        self.degraded[f"map {name} full"] = str(err)
        if name in ("cgroup_identity", "process_identity"):
            self.datapath.set_fail_closed(True)

    def _check_kernel_full(self) -> None:
        """Entries the programs could not write (counted in the kernel): degraded while it keeps happening."""
        c = self.datapath.counters()
        now = time.monotonic()
        self._resync_after_lost_events(c[abi.COUNTER_AGENT_EVENTS_LOST])
        unlisted = c[abi.COUNTER_INGRESS_UNLISTED_EXACT] + c[abi.COUNTER_INGRESS_UNLISTED_JUDGED]
        if unlisted > self._unlisted_seen:   # packets from an address of this host the kernel does not list yet
            self._unlisted_seen = unlisted
            self._refresh_local_addresses()
        forks = c[abi.COUNTER_PROCESS_IDENTITY_FULL]   # the kernel set CFG_F_UNMANAGED_CLOSED itself at the fork
        if forks > self._kernel_full.get("process_identity", (0, 0.0))[0]:
            self._kernel_full["process_identity"] = (forks, now)
            self._on_map_full("process_identity", MapError(f"{forks} forked processes got no identity"))
        for name, slot in (("local_endpoint_identity", abi.COUNTER_LOCAL_ENDPOINTS_FULL),
                           ("udp_flows", abi.COUNTER_UDP_FLOWS_FULL)):
            last = self._kernel_full.get(name, (c[slot], 0.0))
            if c[slot] > last[0]:
                if now - self._full_logged.get(name, -FULL_LOG_EVERY_S) >= FULL_LOG_EVERY_S:
                    self._full_logged[name] = now
                    log.error("map %s is full: the kernel refused %d entries so far%s", name, c[slot],
                              " (binds by workloads with an identity fail with EPERM)"
                              if name == "local_endpoint_identity" else " (UDP counted as lost)")
                self.degraded[f"map {name} full"] = f"{c[slot]} entries refused"
                self._kernel_full[name] = (c[slot], now)
            else:
                self._kernel_full[name] = (c[slot], last[1])
                if now - last[1] > FULL_LOG_EVERY_S:
                    self.degraded.pop(f"map {name} full", None)

    def _resync_after_lost_events(self, lost: int) -> None:
        """agent_events was full (cgroup mkdir / exec events lost): nothing else would ever tell the agent about
        those cgroups, so it walks the tree again. The counter is read before the walk: a cgroup made after the walk
        has its event in the ring, or it was lost too and the next check resyncs again."""
        if lost <= self._agent_events_lost or self.config is None:
            return
        if not self.state["agent_events_resyncs"]:
            log.warning("agent_events ring full: %d cgroup/exec events lost in the kernel; re-reading every cgroup "
                        "(counted in aimesh_agent_events_resyncs_total, logged once)", lost - self._agent_events_lost)
        self._agent_events_lost = lost
        self.state["agent_events_resyncs"] += 1
        self.assigner.processes = self.datapath.identity_entries("process_identity")
        self.assigner.resync(self.config)

    def _check_root(self) -> None:
        if self.root.is_dir():
            self.degraded.pop("cgroup root gone", None)
            return
        if "cgroup root gone" not in self.degraded:
            log.error("the governed cgroup root %s is gone: nothing is enforced there any more", self.root)
        self.degraded["cgroup root gone"] = str(self.root)

    def _loop(self) -> None:
        last_housekeeping = time.monotonic()
        last_root_check = 0.0
        self._udp_last = time.monotonic_ns()
        self._installed_wall = datetime.now(timezone.utc)
        from agent.kernel.ringbuf import wait_readable
        while not self._stop:
            self.last_tick = time.monotonic()
            # agent events wake us; the rest is polled: after a drain that stopped at its budget or time limit (a
            # ring still holds records; capture records do not wake us) only look, do not sleep
            wait_readable([self.datapath.rings["agent_events"]], 0 if self._drain_cut else POLL_MS)
            if self._addr_watch is not None and self._addr_changed():
                self._refresh_local_addresses()
            self._drain()
            if self.gateway is not None:
                self._gateway_tick()
            now_ns = time.monotonic_ns()
            if self.denials.due(now_ns):
                self._flush_denials(now_ns)
            if not 0 <= time.monotonic() - last_root_check < 1.0:   # every second (a clock that went back too)
                last_root_check = time.monotonic()
                self._check_root()
                self._check_kernel_full()
                if self._addr_watch is None:
                    self._refresh_local_addresses()
                if datetime.now(timezone.utc) < self._installed_wall - timedelta(seconds=1):
                    log.warning("the clock stepped back: recompiling lifecycle rules for the time it says now")
                    self._next_transition = datetime.now(timezone.utc)
                if self._resolv_watch.changed() and self.config is not None:
                    log.info("%s changed: re-reading its nameservers", RESOLV_CONF)
                    self._set_dns_resolvers(self.config)
                if self.config_watch is not None and self.config_watch.changed():
                    log.info("config file %s changed: reloading", self.opts.config_path)
                    self._reload = True
            if time.monotonic_ns() - self._udp_last >= self.config.telemetry.udp_window * 1e9:
                self._drain_udp()
            if self._reload:
                self._reload = False
                if self.config_watch is not None:
                    self.config_watch.seen_now()
                self._reload_config()
            self.k8s.turn(self.config, self.resolved, self._apply)
            if self._next_transition and datetime.now(timezone.utc) >= self._next_transition:
                log.info("a sunset date passed: recompiling lifecycle rules")
                try:
                    self._install(self.config)
                except Exception as e:  # noqa: BLE001 - keep the live policy and try again at the next turn
                    log.error("recompiling at the sunset failed (%s: %s); retrying in %ds", type(e).__name__, e,
                              HOUSEKEEPING_S)
                    self._next_transition = datetime.now(timezone.utc) + timedelta(seconds=HOUSEKEEPING_S)
            now = time.monotonic()
            if now - last_housekeeping > HOUSEKEEPING_S:
                last_housekeeping = now
                self._mono_to_wall = time.time_ns() - time.monotonic_ns()
                self.assigner.prune_processes(lambda pid: os.path.exists(f"/proc/{pid}"))
                self.assigner.prune_pod_cgroups()
                self.k8s.housekeeping(lambda pid: os.path.exists(f"/proc/{pid}"))
                m = self.datapath.maps["local_endpoint_identity"]
                refs = self.datapath.maps["local_endpoint_refs"]
                seeded = {bytes(k): k for k, r in refs.items() if r.flags & abi.LocalEndpointRefFlag.SEEDED}
                # a port a live socket registered is the programs' to remove (at its release), not ours
                n = self.assigner.prune_local_endpoints(
                    [k for k in m.keys() if bytes(k) in seeded or refs.lookup(k) is None], m.delete)
                self.assigner.prune_local_endpoints(list(seeded.values()), refs.delete)
                if n:
                    log.info("forgot %d bound ports no socket holds any more", n)
                self._capture_housekeeping()

    # ---- kernel events ----
    def _recover_checkpoint(self) -> None:
        """A crash between saving a batch and releasing its ring records: release them now, never read them twice."""
        from agent.kernel.pins import Checkpoint
        self.checkpoint = Checkpoint(self.pins)
        for ring in ("decision_events", "flow_events"):
            seq, pos = self.checkpoint.read(ring)
            r = self.datapath.rings[ring]
            if seq and r.consumer_pos < pos <= r.producer_pos and self.exporter.has_spooled(seq):
                log.info("%s: records up to %d were saved in batch %d before the last agent stopped; moving on",
                         ring, pos, seq)
                r.commit(pos)

    def _drain(self, final: bool = False) -> int:
        """Read the rings in bounded batches (DRAIN_BUDGET records per ring, DRAIN_TIME_S per turn), handle them,
        and hand the space back to the kernel once they are safe.

        With a durable exporter, records are released only after the spool writer has them on disk (fsync'd): the
        loop reads ahead of what is released (self._read_pos) and never waits for the disk; records not yet saved
        stay in the pinned ring for the next agent. Without one, space is released as soon as they are handled."""
        handlers = (("agent_events", self._on_agent_event), ("decision_events", self._on_decision),
                    ("flow_events", self._on_flow), ("capture_events", self._on_capture))
        exp = self.exporter
        durable = exp is not None and exp.config.durable
        if durable and exp.write_failures != self._write_failures_seen:
            # a spool write failed: read again what it did not release (the collector deduplicates nothing here;
            # those records were never saved)
            self._write_failures_seen = exp.write_failures
            self._read_pos.clear()
            self.degraded["export spool failing"] = "a spool write failed; records are read again"
        step = exp.config.batch_max_records if durable else 1000
        # the final drain (at stop) reads what is there, for at most 2 s: a flood must not keep the agent from stopping
        deadline = time.monotonic() + (2.0 if final else DRAIN_TIME_S)
        total = 0
        cut = False
        while True:
            n = 0
            for name, fn in handlers:
                ring = self.datapath.rings[name]
                saved = durable and name not in ("agent_events", "capture_events")   # capture: decoded in memory
                left = DRAIN_BUDGET
                while True:
                    if left <= 0 or time.monotonic() >= deadline:
                        cut = True      # stopped with records possibly left: the loop comes back at once
                        break
                    if saved and exp.write_backlog() > MAX_WRITE_BACKLOG:
                        break   # the disk is behind: the ring holds the rest
                    start = self._read_pos.get(name, 0) if saved else 0
                    recs, pos = ring.read(min(step, left), start)
                    if pos <= max(start, ring.consumer_pos):   # nothing new (commits never pass what was read)
                        break
                    for r in recs:
                        try:
                            fn(r)
                        except Exception:  # a handler bug must not stop the drain or lose the ring position
                            self.state["decode_errors"] += 1
                            log.exception("%s: handling an event failed", name)
                    if saved:
                        self._read_pos[name] = pos
                        exp.persist(lambda seq, name=name, pos=pos: self.checkpoint.write(seq, name, pos),
                                    lambda ring=ring, pos=pos: ring.commit(pos))
                    else:
                        ring.commit(pos)
                    n += len(recs)
                    left -= max(len(recs), 1)
            total += n
            if self.call_sinks is not None:
                self.call_sinks.commit()   # the calls this turn decoded: one group-committed spool batch
            if not final or n == 0 or time.monotonic() >= deadline:
                self._drain_cut = cut
                return total

    def _decoded(self, ring: str, decode, data: bytes):
        """decode(data), counting the event; None (counted and logged) when it does not decode."""
        self.state["ring_events"][ring] += 1
        try:
            return decode(data)
        except DecodeError as e:
            self.state["decode_errors"] += 1
            log.warning("%s: %s", ring, e)
            return None

    def _on_decision(self, data: bytes) -> None:
        d = self._decoded("decision_events", decode_decision, data)
        if d is None:
            return
        if self.flow_log.enabled:
            self.flow_log.write(to_json(d, self.identities, self._mono_to_wall))
        if d.verdict == abi.Verdict.DENIED and self.denials.add(d):
            # no connection follows, so no connection record: the collector gets the decision itself — the first of
            # a quiet key at once, the rest aggregated per key and interval (one hostile loop cannot flood it)
            self._emit_record(decision_record(d, self.identities, self._mono_to_wall, self.agent_id, self.node,
                                              workloads=self._workloads), False)

    def _flush_denials(self, now_ns: int) -> None:
        aggs = self.denials.flush(now_ns)
        for agg in aggs:
            self._emit_record(denial_record(agg, self.identities, self._mono_to_wall, self.agent_id, self.node,
                                            self._workloads), False)
        if aggs and self.exporter is not None and self.exporter.config.durable:
            self.exporter.persist()

    def _on_flow(self, data: bytes) -> None:
        ev = self._decoded("flow_events", decode_flow_event, data)
        if ev is None:
            return
        rec = flow_record(ev, self.identities, self._mono_to_wall, self.agent_id, self.node, self._workloads)
        # metrics count a connection once: on its client's side, or on the server's when the client is remote
        self._emit_record(rec, ev.side == abi.Side.CLIENT or not self._is_local(bytes(ev.remote_addr)))

    # ---- this host's addresses ----
    def _watch_addresses(self) -> None:
        try:
            self._addr_watch = AddressWatch()
        except OSError as e:
            log.warning("cannot subscribe to address changes (%s): rescanning this host's addresses every second", e)
            self._addr_watch = None

    def _addr_changed(self) -> bool:
        try:
            return self._addr_watch.changed()
        except OSError as e:   # the subscription broke: fall back to the rescan every second
            log.warning("address change subscription failed (%s): rescanning this host's addresses every second", e)
            self._addr_watch.close()
            self._addr_watch = None
            return True

    def _refresh_local_addresses(self) -> None:
        """Give the kernel this host's addresses as they are now: an address added after start is this host (its
        servers judged as themselves, its connections as local), one removed is not any more."""
        keys = local_address_keys()
        now = {bytes(k.addr) for k in keys}
        if now == self._local_addrs:
            return
        try:
            self.datapath.set_local_addresses(keys)
        except (MapError, OSError) as e:   # more addresses than the map holds: the rest is judged as remote
            log.error("local_address: %s (%d addresses); connections to the rest are judged as remote", e, len(keys))
            self.degraded["local addresses incomplete"] = str(e)
            return
        self.degraded.pop("local addresses incomplete", None)
        if self._local_addrs:
            log.info("this host's addresses changed: %s",
                     " ".join([f"+{format_addr(a)}" for a in sorted(now - self._local_addrs)] +
                              [f"-{format_addr(a)}" for a in sorted(self._local_addrs - now)]))
        self._local_addrs = now

    def _is_local(self, addr16: bytes) -> bool:
        return addr16 in self._local_addrs or addr16 == LOOPBACK6 or addr16[:13] == LOOPBACK4_PREFIX

    def _emit_record(self, rec, counted: bool) -> None:
        for sink in self.sinks:
            sink.emit(rec, counted)

    def _drain_udp(self, final: bool = False) -> None:
        """Report UDP traffic since the last drain, per identity pair; forget sockets idle for three windows."""
        now = time.monotonic_ns()
        entries = list(self.datapath.maps["udp_flows"].items())
        records = udp_aggregate(entries, self._udp_window, self.identities, self._mono_to_wall, self._udp_last, now,
                                self.agent_id, self.node, self._workloads)
        for rec in records:
            self._emit_record(rec, True)
        idle = 3 * self.config.telemetry.udp_window * 1e9
        for key, uf in entries:
            if now - uf.last_ns > idle:
                self.datapath.maps["udp_flows"].delete(key)
        self._udp_last = now
        if records and self.exporter is not None and self.exporter.config.durable:
            self.exporter.persist()

    def _flow_losses(self) -> dict:
        c = self.datapath.counters() if self.healthy else [0] * abi.COUNTER_SLOTS
        return {"kernel_ring_full": c[abi.COUNTER_FLOW_EVENTS_LOST], "udp_table_full": c[abi.COUNTER_UDP_FLOWS_FULL]}

    def _on_agent_event(self, data: bytes) -> None:
        ev = self._decoded("agent_events", decode_agent_event, data)
        if ev is None:
            return
        if ev.kind == abi.AgentEventKind.CGROUP_MKDIR:
            self.assigner.on_cgroup_created(ev.path.decode(errors="replace"), ev.cgroup_id)
        elif ev.kind == abi.AgentEventKind.EXEC:
            self.assigner.on_exec(ev.pid)
            if self.tls_probes is not None:
                self.tls_probes.scan_pid(ev.pid)

    # ---- plaintext capture ----
    def _decoder_options(self, dst_id: int) -> DecoderOptions:
        """How calls to identity number dst_id are decoded, from the config in force (cached per config)."""
        config = self.config
        cache = self._decoder_cache
        if cache[0] is not config:
            cache = self._decoder_cache = (config, {})
        opts = cache[1].get(dst_id)
        if opts is None:
            meta = self.identities.get(dst_id)
            ident = config.identity(meta.name) if meta is not None and config is not None else None
            if ident is None or config is None:
                opts = DecoderOptions()
            else:
                llm = ident.llm_capture
                opts = DecoderOptions(capture_content=config.capture_content(ident),
                                      redact=tuple(compile_redaction(r) for r in config.llm.redact),
                                      content_cap=config.llm.content_max_chars,
                                      protocol=None if llm.protocol in ("auto", "off") else LlmProtocol(llm.protocol))
            if len(cache[1]) < 65536:
                cache[1][dst_id] = opts
        return opts

    def _on_capture(self, data: bytes) -> None:
        self.state["ring_events"]["capture_events"] += 1
        try:
            chunk = decode_capture_event(data)
        except CaptureDecodeError as e:
            self.state["decode_errors"] += 1
            log.warning("capture_events: %s", e)
            return
        if self.gateway is not None and chunk.src_id == self._gateway_id:
            # the gateway's own upstream connections: the gateway records those calls itself (gateway: true)
            if chunk.kind is not abi.CaptureKind.CLOSE:
                self.datapath.capture_skip(chunk.pid, chunk.fd)
            return
        if self._workloads is not None:
            self.k8s.note_pid(chunk.pid)   # the caller's cgroup while it surely runs (its call may end after it exits)
        self._model_calls(self.capture.on_chunk(chunk))
        for pid, fd in self.capture.take_skips():   # not HTTP/1: the kernel stops copying it
            self.datapath.capture_skip(pid, fd)
        if chunk.kind is abi.CaptureKind.TLS_HANDSHAKE:   # seen in the kernel, nothing of it copied
            self.tls_visibility.on_handshake(chunk.cookie, chunk.pid, chunk.src_id, chunk.ts_ns)
        self._tls_not_visible(self.tls_visibility.on_chunk(chunk))

    def _model_calls(self, calls) -> None:
        """Every decoded call to every model-call sink (self.call_sinks, built from the config at start)."""
        if calls:
            self.state["model_calls"] += len(calls)
            self._dispatch(calls)

    def _caller_workload(self, pid: int):
        """The caller's pod/container, when Kubernetes is on and the pid's cgroup is a known pod's."""
        return self.k8s.workload_of_pid(pid) if self._workloads is not None else None

    def _sink_failed(self, sink, _exc: Exception) -> None:
        self.state["decode_errors"] += 1
        log.exception("model-call sink %s failed", type(sink).__name__)

    def _identity_cgroups(self) -> dict[str, list[str]]:
        """{identity name: its cgroups (relative to the cgroup2 mount)}, for IdentityCompute at scrape time: the
        governed subtree walked, each cgroup named by what the assigner wrote for it."""
        assigner = getattr(self, "assigner", None)
        if assigner is None or not self.healthy:
            return {}
        assigned = dict(assigner.cgroups)
        names = {i: m.name for i, m in self.identities.items()}
        out: dict[str, list[str]] = {}
        for rel, cid in cgroup_walk(assigner.mount, self.root):
            name = names.get(assigned.get(cid, -1))
            if name is not None:
                out.setdefault(name, []).append(rel)
        return out

    def _capture_housekeeping(self) -> None:
        """Close decoders idle too long; drop capture_sockets entries of processes that exited (their fds were
        closed by the exit, with no close() the tracepoint saw)."""
        self._model_calls(self.capture.expire(time.monotonic_ns()))
        self._comms.prune(lambda pid: os.path.exists(f"/proc/{pid}"))
        self._tls_not_visible(self.tls_visibility.expire(time.monotonic_ns()))
        if self.tls_probes is not None:
            from agent.kernel.uprobes import governed_pids
            self.tls_probes.scan(governed_pids(self.root))   # libssl dlopen'ed after exec (CPython's import ssl)
        m = self.datapath.maps["capture_sockets"]
        gone = [k for k in list(m.keys()) if not os.path.exists(f"/proc/{k.tgid}")]
        if gone:
            m.delete_many(gone)

    # ---- TLS capture ----
    def _start_tls(self, root: Path) -> None:
        """Probe every libssl of the system and of the governed processes (agent/kernel/uprobes.py). A failure
        leaves TLS unseen (degraded), never the agent down."""
        from agent.kernel import bpfsys, uprobes
        try:
            self.tls_probes = uprobes.start(self.pins.links, Path(self.build["progs"]), root)
        except (bpfsys.BpfError, OSError) as e:
            log.error("TLS capture is off: %s", e)
            self.degraded["tls capture off"] = str(e)
            return
        st = self.tls_probes.stats
        log.info("TLS capture: %d libssl files probed (%d links created, %d kept)", st.libraries, st.links_created,
                 st.links_kept)

    def _tls_not_visible(self, reports: list[NotVisible]) -> None:
        for nv in reports:
            meta = self.identities.get(nv.src_id)
            source = meta.name if meta is not None else f"id:{nv.src_id}"
            self.tls_not_visible.add(source)
            if nv.first_of_process:
                log.warning("%s", describe_not_visible(nv, source))

    # ---- the node gateway (agent/gateway/node.py) ----
    def _gateway_tick(self) -> None:
        try:
            self.state["model_calls"] += self.gateway.tick()
        except Exception:  # noqa: BLE001 - a bad record must not stop the loop
            self.state["decode_errors"] += 1
            log.exception("gateway records: handling failed")
        down = self.gateway.health()
        if down is None:
            self.degraded.pop(GATEWAY_DOWN, None)
        else:
            if GATEWAY_DOWN not in self.degraded:
                log.error("%s", down)
            self.degraded[GATEWAY_DOWN] = down

    def _gateway_stop(self) -> None:
        try:
            self.gateway.stop()
        except Exception:  # noqa: BLE001 - stopping goes on
            log.exception("stopping the gateway failed")

    def _metrics_state(self) -> dict:
        st = dict(self.state)
        st["degraded"] = sorted(self.degraded)
        st["denials"] = self.denials.stats()
        st["maps"] = self.datapath.map_usage()
        st["maps"]["cgroup_identity"] = (len(self.assigner.cgroups), self.limits.max_cgroups)
        st["maps"]["process_identity"] = (len(self.assigner.processes), self.limits.max_processes)
        st["flow_log_records"] = self.flow_log.written
        st["capture_undecoded"] = dict(self.capture.undecoded)
        lim = self.limits
        st["ring_capacity"] = {"decision_events": lim.ringbuf_pages * 4096, "flow_events": lim.flow_ringbuf_pages * 4096,
                               "agent_events": 16 * 4096, "capture_events": lim.capture_ringbuf_pages * 4096}
        return st
