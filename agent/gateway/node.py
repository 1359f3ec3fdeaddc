"""The agent's side of the node gateway (issue 10): one object the daemon starts, ticks and stops.

    node = GatewayNode(state_dir, origin_pin, cgroup_dir, dispatch, mono_to_wall_ns=...)
    node.start(config, numbers)      # policy file (0600), records socket bound, gateway process supervised
    node.tick()                      # each loop turn: records -> ModelCallRecords -> the model-call sinks
    node.reload(config, numbers)     # a reload: the policy file rewritten; the supervisor SIGHUPs the gateway
    node.health()                    # "gateway down" while the process is not alive (see below)
    node.stop()

What a gateway record becomes: a ModelCallRecord with gateway=True and the decision, the policy that made it, the
model as requested and as sent, handed to the sinks through the daemon's CallDispatch like a captured call (source
and destination are the identities the kernel recorded for the connection: names in the record, numbers here; the
gateway knows no pid). A request refused before its API path was known (malformed HTTP) is recorded as its
destination protocol's main operation (chat / messages).

While the process is not alive, connections the kernel redirects to the gateway address find nothing listening and
are refused (ECONNREFUSED): the node fails closed, never open (tests/kernel/test_gateway_e2e.py checks it).

Reloads: the gateway's own section (listen, redirect address, CA directory, mode) and whether a gateway runs at all
are set at start (`reload_refusal` says why a reload that changes them is refused); model policies apply live.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import agent
from agent.gateway.policy import GatewayPolicy
from agent.gateway.records import GatewayRecordReceiver
from agent.gateway.supervisor import GatewaySupervisor, gateway_argv
from agent.l7.capture import CapturedCall
from agent.l7.llm import Operation, Protocol
from agent.l7.record import ModelCallRecord

log = logging.getLogger("aimesh.gateway")

POLICY_FILE = "gateway-policy.json"
RECORDS_SOCKET = "gateway-records.sock"
DOWN = "gateway down"
_MAIN_OPERATION = {Protocol.OPENAI: Operation.CHAT, Protocol.ANTHROPIC: Operation.MESSAGES,
                   Protocol.OLLAMA: Operation.CHAT}


def reload_refusal(old: Any, new: Any) -> Optional[str]:
    """Why a reload from config `old` to `new` cannot apply live (one line, ends in "restart"), else None."""
    if old is None:
        return None
    if old.uses_gateway != new.uses_gateway:
        return ("gateway: whether the node runs the L7 gateway (some identity with llm.gateway: enforce) changed; "
                "it is set up at start, so this reload changes nothing: restart the agent to apply it")
    if new.uses_gateway and old.gateway != new.gateway:
        return ("gateway: changed (listen, redirect_address, ca_dir or mode); the gateway is set up at start, so "
                "this reload changes nothing: restart the agent to apply it")
    return None


def _int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _float(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def to_call(rec: Mapping[str, Any], numbers: Mapping[str, int], mono_to_wall_ns: int) -> Optional[CapturedCall]:
    """One gateway record (agent/gateway/server.py) -> a CapturedCall for the sinks; None when it names no source or
    destination. Pure."""
    source, dest = _str(rec.get("source")), _str(rec.get("destination"))
    if not source or not dest:
        return None
    try:
        protocol = Protocol(rec.get("protocol"))
    except ValueError:
        protocol = Protocol.OPENAI
    try:
        operation = Operation(rec.get("operation"))
    except ValueError:
        operation = _MAIN_OPERATION[protocol]
    start = _int(rec.get("start_ns"))
    if start is None:   # a refusal before the request was timed: its wall time on the kernel's clock
        ts = _float(rec.get("ts"))
        start = max(0, int(ts * 1e9) - mono_to_wall_ns) if ts is not None else 0
    reasons = rec.get("finish_reasons")
    call = ModelCallRecord(
        conn_key=_int(rec.get("cookie")) or 0, sequence=0, start_ns=start, protocol=protocol, operation=operation,
        request_model=_str(rec.get("request_model")), response_model=_str(rec.get("response_model")),
        stream=bool(rec.get("stream")), status=_int(rec.get("status")), error_type=_str(rec.get("error_type")),
        input_tokens=_int(rec.get("input_tokens")), output_tokens=_int(rec.get("output_tokens")),
        cached_tokens=_int(rec.get("cached_tokens")), time_to_first_chunk_ns=_int(rec.get("time_to_first_chunk_ns")),
        duration_ns=_int(rec.get("duration_ns")), time_per_output_chunk_ns=None,
        output_chunks=_int(rec.get("output_chunks")) or 0,
        finish_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
        request_bytes=_int(rec.get("request_bytes")) or 0, response_bytes=_int(rec.get("response_bytes")) or 0,
        tls=bool(rec.get("tls")), truncated=False, incomplete=bool(rec.get("incomplete")),
        confidence_mean=None, confidence_min=None, request_digest=_str(rec.get("request_digest")) or "",
        max_tokens=_int(rec.get("max_tokens")),
        temperature=_float(rec.get("temperature")),
        include_usage=rec.get("include_usage") if isinstance(rec.get("include_usage"), bool) else None,
        gateway=True, policy=_str(rec.get("policy")), sent_model=_str(rec.get("sent_model")),
        decision=_str(rec.get("decision")), reason=_str(rec.get("reason")),
        choice_count=_int(rec.get("choice_count")), response_id=_str(rec.get("response_id")))
    return CapturedCall(record=call, cookie=call.conn_key, pid=0, src_id=numbers.get(source, 0), dst_id=numbers.get(dest, 0),
                        actual_dst_id=0)


def write_policy(path: Path, config: Any, numbers: Mapping[str, int]) -> None:
    """The gateway's policy file, mode 0600, replaced atomically (the gateway never reads half of it)."""
    text = GatewayPolicy.from_config(config, identity_numbers=dict(numbers)).to_json()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class GatewayNode:
    def __init__(self, state_dir: Path, origin_pin: str, cgroup_dir: Path,
                 dispatch: Callable[[Iterable[CapturedCall]], None], *, mono_to_wall_ns: Callable[[], int],
                 python: str = sys.executable,
                 supervisor: Callable[..., GatewaySupervisor] = GatewaySupervisor) -> None:
        self.state_dir = Path(state_dir)
        self.policy_path = self.state_dir / POLICY_FILE
        self.records_path = self.state_dir / RECORDS_SOCKET
        self._origin_pin = origin_pin
        self.cgroup_dir = Path(cgroup_dir)
        self._dispatch = dispatch
        self._mono_to_wall = mono_to_wall_ns
        self._python = python
        self._make_supervisor = supervisor
        self._numbers: dict[str, int] = {}
        self.rx: Optional[GatewayRecordReceiver] = None
        self.sup: Optional[GatewaySupervisor] = None
        self.policy_writes = 0
        self.records = 0            # gateway records handed to the sinks

    def prepare(self) -> None:
        """The gateway cgroup, made before the agent assigns identities (so it gets the reserved `gateway`)."""
        self.cgroup_dir.mkdir(exist_ok=True)

    def start(self, config: Any, numbers: Mapping[str, int]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.prepare()
        self._numbers = dict(numbers)
        write_policy(self.policy_path, config, numbers)
        self.policy_writes += 1
        self.rx = GatewayRecordReceiver(self.records_path)   # bound before the gateway sends its first record
        gw = config.gateway
        argv = gateway_argv(self._python, self.policy_path, Path(self._origin_pin), gw.listen, self.records_path,
                            gw.ca_dir)
        env = dict(os.environ)
        pkg_root = str(Path(agent.__file__).resolve().parent.parent)   # `python -m agent.gateway` finds this agent
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.sup = self._make_supervisor(argv, self.policy_path, cgroup_dir=self.cgroup_dir, env=env)
        self.sup.start()
        log.info("node gateway on %s (policy %s, records %s, cgroup %s)", gw.listen, self.policy_path,
                 self.records_path, self.cgroup_dir)

    def reload(self, config: Any, numbers: Mapping[str, int]) -> None:
        """Rewrite the policy file; the supervisor sees it change and SIGHUPs the gateway (new requests only)."""
        self._numbers = dict(numbers)
        write_policy(self.policy_path, config, numbers)
        self.policy_writes += 1

    def tick(self) -> int:
        """Hand what the gateway sent since the last turn to the sinks; the number of records."""
        if self.rx is None:
            return 0
        recs = self.rx.drain()
        if not recs:
            return 0
        wall = self._mono_to_wall()
        calls = [c for c in (to_call(r, self._numbers, wall) for r in recs) if c is not None]
        self.records += len(calls)
        if calls:
            self._dispatch(calls)
        return len(recs)

    def alive(self) -> bool:
        return self.sup is not None and self.sup.alive()

    def health(self) -> Optional[str]:
        """None when the gateway runs; else what /healthz says under DOWN."""
        if self.sup is None:
            return None
        if self.sup.alive():
            return None
        return (f"the gateway process is not running (restarted {self.sup.counters.restarts} times): connections "
                "that need L7 policy are refused until it is back")

    def stop(self) -> None:
        if self.sup is not None:
            self.sup.close()
        if self.rx is not None:
            self.tick()   # what it sent before it stopped
            self.rx.close()
        for rm in (self.cgroup_dir.rmdir,   # empty once the process is gone; kept (EBUSY) otherwise
                   self.policy_path.unlink, self.state_dir.rmdir):   # written again at the next start
            try:
                rm()
            except OSError:
                pass

    # -- Prometheus (read at scrape time) --------------------------------------------------------------------------
    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        up = GaugeMetricFamily("aimesh_gateway_up", "1 while the node gateway process is alive")
        up.add_metric([], 1.0 if self.alive() else 0.0)
        yield up
        c = self.sup.counters if self.sup is not None else None
        for name, doc, v in (
                ("aimesh_gateway_starts", "Gateway process starts", c.starts if c else 0),
                ("aimesh_gateway_restarts", "Gateway process exits followed by a restart", c.restarts if c else 0),
                ("aimesh_gateway_reloads", "Policy reloads signalled to the gateway (SIGHUP)", c.reloads if c else 0),
                ("aimesh_gateway_records_received", "Gateway model-call records received by the agent",
                 self.rx.received if self.rx else 0),
                ("aimesh_gateway_records_dropped", "Gateway records lost on the way to the agent (sequence gaps, "
                 "malformed)", self.rx.dropped if self.rx else 0)):
            f = CounterMetricFamily(name, doc)
            f.add_metric([], v)
            yield f


__all__ = ["DOWN", "GatewayNode", "reload_refusal", "to_call", "write_policy"]
