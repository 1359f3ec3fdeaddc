"""Prometheus metrics: kernel counters read at scrape time, identity-labelled decisions aggregated from events.

Labels are identities (name, kind, version) and verdicts, never addresses or ports, so cardinality is bounded by
the config. The registry is built explicitly (no import-time global registry).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Mapping, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.kernel import abi
from agent.policy.identities import IdentityMeta

IDENTITY_LABELS = ["source", "source_kind", "source_version", "destination", "destination_kind",
                   "destination_version", "verdict"]


def decision_tally(counts: Mapping[tuple[int, int, int, int, bool], int]) -> tuple[dict, dict]:
    """The kernel's decision_counts ((src, dst, hook, verdict, deprecated) -> n) as the two series the metrics show:
    decisions per (src, dst, verdict), and decisions to a deprecated identity per (src, dst). Pure."""
    decisions: Counter = Counter()
    deprecated: Counter = Counter()
    for (src, dst, _hook, verdict, dep), n in counts.items():
        decisions[(src, dst, verdict)] += n
        if dep:
            deprecated[(src, dst)] += n
    return dict(decisions), dict(deprecated)


def _labels(meta: Mapping[int, IdentityMeta], iid: int) -> list[str]:
    m = meta.get(iid)
    return [m.name, m.kind, m.version or ""] if m else [f"id:{iid}", "unknown", ""]


class AgentCollector(Collector):
    def __init__(self, counters: Callable[[], list[int]],
                 decisions: Callable[[], Mapping[tuple[int, int, int, int, bool], int]],
                 identities: Callable[[], Mapping[int, IdentityMeta]], state: Callable[[], dict]) -> None:
        self._counters, self._decisions, self._identities, self._state = counters, decisions, identities, state

    def collect(self) -> Iterable:
        c = self._counters()
        st = self._state()
        dec = CounterMetricFamily("aimesh_kernel_decisions", "Decisions taken in the kernel, by hook and verdict",
                                  labels=["hook", "verdict"])
        for hook in (abi.Hook.CONNECT, abi.Hook.SENDMSG, abi.Hook.INGRESS):
            for verdict in (abi.Verdict.ALLOWED, abi.Verdict.DENIED, abi.Verdict.AUDIT, abi.Verdict.REDIRECTED):
                dec.add_metric([hook.name.lower(), verdict.name.lower()], c[abi.counter_decision(hook, verdict)])
        yield dec
        lost = CounterMetricFamily("aimesh_events_lost", "Events dropped in the kernel because a ring buffer was full",
                                   labels=["ring"])
        lost.add_metric(["decision_events"], c[abi.COUNTER_DECISION_EVENTS_LOST])
        lost.add_metric(["agent_events"], c[abi.COUNTER_AGENT_EVENTS_LOST])
        yield lost
        full = CounterMetricFamily("aimesh_map_full", "Kernel map updates refused because the map was full",
                                   labels=["map"])
        refused = {"local_endpoint_identity": c[abi.COUNTER_LOCAL_ENDPOINTS_FULL],   # by the programs ...
                   "udp_reverse_nat": c[abi.COUNTER_REVERSE_NAT_FULL], "udp_flows": c[abi.COUNTER_UDP_FLOWS_FULL]}
        for name, n in st.get("map_full", {}).items():                                 # ... and by the agent
            refused[name] = refused.get(name, 0) + n
        for name, n in sorted(refused.items()):
            full.add_metric([name], n)
        yield full
        deg = GaugeMetricFamily("aimesh_degraded", "1 while the agent is degraded, by reason (see /healthz)",
                                labels=["reason"])
        for reason in sorted(st.get("degraded", ())):
            deg.add_metric([reason], 1)
        yield deg
        yield CounterMetricFamily("aimesh_fastpath_sockets", "TCP sockets put on the same-node fast path",
                                  value=c[abi.COUNTER_FASTPATH_SOCKETS])
        fb = CounterMetricFamily("aimesh_fastpath_fallbacks", "TCP sockets that stayed on the normal path, by why",
                                 labels=["reason"])
        fb.add_metric(["remote_peer"], c[abi.COUNTER_FASTPATH_REMOTE])
        fb.add_metric(["peer_not_governed"], c[abi.COUNTER_FASTPATH_UNWATCHED])
        fb.add_metric(["map_full"], c[abi.COUNTER_FASTPATH_FULL])
        yield fb
        yield CounterMetricFamily("aimesh_fastpath_messages", "sendmsg calls handed straight to the peer socket",
                                  value=c[abi.COUNTER_FASTPATH_MESSAGES])
        yield CounterMetricFamily("aimesh_fastpath_bytes", "Bytes handed straight to the peer socket",
                                  value=c[abi.COUNTER_FASTPATH_BYTES])
        yield CounterMetricFamily("aimesh_flows_untracked", "TCP connections established with no connect-time origin",
                                  value=c[abi.COUNTER_FLOWS_UNTRACKED])
        raw = CounterMetricFamily("aimesh_raw_socket_packets",
                                  "Packets of raw sockets (SOCK_RAW) judged by the egress program, by outcome",
                                  labels=["outcome"])
        raw.add_metric(["dropped"], c[abi.COUNTER_RAW_DENIED])
        raw.add_metric(["passed"], c[abi.COUNTER_RAW_PASSED])
        yield raw
        unl = CounterMetricFamily("aimesh_ingress_unlisted_local",
                                  "Packets from this host at an address the agent had not listed yet, by what the "
                                  "kernel did (exact_bind: let in; judged_remote: judged as from world)",
                                  labels=["outcome"])
        unl.add_metric(["exact_bind"], c[abi.COUNTER_INGRESS_UNLISTED_EXACT])
        unl.add_metric(["judged_remote"], c[abi.COUNTER_INGRESS_UNLISTED_JUDGED])
        yield unl
        ports = CounterMetricFamily("aimesh_port_binds_refused",
                                    "Binds refused (EPERM) to an address:port live sockets hold, by why",
                                    labels=["reason"])
        ports.add_metric(["held_by_another_identity"], c[abi.COUNTER_PORT_COBIND_REFUSED])
        ports.add_metric(["release_race"], c[abi.COUNTER_PORT_BIND_RACE])
        yield ports
        yield from capture_metrics(c, st.get("capture_undecoded", {}))

        meta = self._identities()
        decisions, deprecated = decision_tally(self._decisions())   # counted in the kernel, read now
        conn = CounterMetricFamily("aimesh_connections",
                                   "Connection decisions (connect, first sendmsg, ingress) by identities and verdict",
                                   labels=IDENTITY_LABELS)
        for (src, dst, verdict), n in sorted(decisions.items()):
            conn.add_metric(_labels(meta, src) + _labels(meta, dst) + [abi.Verdict(verdict).name.lower()], n)
        yield conn
        dep = CounterMetricFamily("aimesh_deprecated_model_connections",
                                  "Connections to a deprecated identity", labels=IDENTITY_LABELS[:-1])
        for (src, dst), n in sorted(deprecated.items()):
            dep.add_metric(_labels(meta, src) + _labels(meta, dst), n)
        yield dep

        yield GaugeMetricFamily("aimesh_programs_attached", "BPF programs attached by this agent",
                                value=st.get("programs_attached", 0))
        reloads = CounterMetricFamily("aimesh_config_reloads", "Config reloads", labels=["result"])
        reloads.add_metric(["ok"], st.get("reloads_ok", 0))
        reloads.add_metric(["failed"], st.get("reloads_failed", 0))
        yield reloads
        entries = GaugeMetricFamily("aimesh_map_entries", "Entries the agent keeps in a kernel map", labels=["map"])
        capacity = GaugeMetricFamily("aimesh_map_capacity", "Capacity of a kernel map", labels=["map"])
        for name, (n, cap) in sorted(st.get("maps", {}).items()):
            entries.add_metric([name], n)
            capacity.add_metric([name], cap)
        yield entries
        yield capacity
        rings = CounterMetricFamily("aimesh_ring_events", "Events the agent read from each kernel ring buffer",
                                    labels=["ring"])
        cap = GaugeMetricFamily("aimesh_ring_capacity_bytes", "Size of each kernel ring buffer", labels=["ring"])
        for ring, n in sorted(st.get("ring_events", {}).items()):
            rings.add_metric([ring], n)
            cap.add_metric([ring], st.get("ring_capacity", {}).get(ring, 0))
        yield rings
        yield cap
        yield CounterMetricFamily("aimesh_flow_log_records", "Records written to the flow log",
                                  value=st.get("flow_log_records", 0))
        yield CounterMetricFamily("aimesh_agent_events_resyncs", "Cgroup resyncs after agent_events were lost",
                                  value=st.get("agent_events_resyncs", 0))
        yield CounterMetricFamily("aimesh_decode_errors", "Kernel events that could not be decoded",
                                  value=st.get("decode_errors", 0))
        den = st.get("denials")
        if den is not None:
            agg = CounterMetricFamily("aimesh_denied_decisions",
                                      "Denied decisions the agent read, by how they reached the collector: the first of "
                                      "a quiet key at once, the rest in per-key aggregates (count), or in the `other` "
                                      "bucket past the key cap", labels=["as"])
            agg.add_metric(["immediate"], den.immediate)
            agg.add_metric(["aggregated"], den.events - den.immediate)
            agg.add_metric(["overflow_bucket"], den.overflowed)
            yield agg


# kernel capture counter slot -> (metric name, HELP); each is a counter (exposed with _total)
CAPTURE_COUNTERS: tuple[tuple[int, str, str], ...] = (
    (abi.COUNTER_CAPTURE_CHUNKS, "aimesh_capture_chunks",
     "Chunks of captured socket bytes the kernel copied into the capture_events ring"),
    (abi.COUNTER_CAPTURE_TRUNCATED, "aimesh_capture_truncated_calls",
     "Sends/receives on captured sockets not copied whole (per-request byte budget, chunks per call, iovecs)"),
    (abi.COUNTER_CAPTURE_TRUNCATED_BYTES, "aimesh_capture_truncated_bytes",
     "Bytes of those sends/receives that were not copied"),
    (abi.COUNTER_CAPTURE_EVENTS_LOST, "aimesh_capture_ring_lost",
     "Capture records (chunks, gaps, closes) dropped because the capture_events ring was full"),
    (abi.COUNTER_CAPTURE_LOST_BYTES, "aimesh_capture_ring_lost_bytes",
     "Bytes of sends/receives whose chunks and gap record the full ring dropped (told in the socket's next record)"),
    (abi.COUNTER_CAPTURE_READ_FAILED, "aimesh_capture_read_failures",
     "Reads of a captured call's user memory that failed (the rest of that call was not copied)"),
    (abi.COUNTER_CAPTURE_SOCKETS_FULL, "aimesh_capture_sockets_full",
     "Connections to a captured identity not captured because the capture_sockets map was full"),
    (abi.COUNTER_CAPTURE_TLS_SOCKETS, "aimesh_capture_tls_sockets",
     "Captured sockets whose first send was a TLS handshake: their syscall bytes are not copied"),
    (abi.COUNTER_CAPTURE_NOT_CAPTURED, "aimesh_capture_not_captured_calls",
     "Sends/receives on captured sockets skipped: TLS, or the agent's decoder gave up on the connection"),
)


def capture_metrics(c: list[int], undecoded: Mapping[str, int]) -> Iterable:
    """The kernel's capture counters (read at scrape time) and the connections the agent's decoder gave up on."""
    for slot, name, help_text in CAPTURE_COUNTERS:
        yield CounterMetricFamily(name, help_text, value=c[slot])
    und = CounterMetricFamily("aimesh_capture_undecoded_connections",
                              "Captured connections the agent could not decode as HTTP/1 (the kernel stops copying "
                              "them), by reason", labels=["reason"])
    for reason, n in sorted(undecoded.items()):
        und.add_metric([reason], n)
    yield und


def build_registry(collector: Collector, extra: Optional[Iterable[Collector]] = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    for c in extra or ():
        reg.register(c)
    return reg
