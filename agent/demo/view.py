"""The demo's live view, as pure functions: a flow-log line -> a record, records -> counts, a frame -> text.

Nothing here touches the terminal, the clock or a file: the runner reads the log, keeps a `FlowTable` (and a
`CallTable` of the model calls `aimesh calls -f -o json` prints from the collector), builds a `Frame` and writes what
`render_frame` returns.

The flow log is the agent's `--flow-log`: one JSON object per decision, e.g.
  {"time": "...Z", "verdict": "redirected", "hook": "connect", "reason": "policy", "protocol": "tcp", "family": "ipv4",
   "source": {"name": "chat-frontend", "kind": "service", "version": null, "pid": 123, "comm": "python3", ...},
   "destination": {"name": "llama", "kind": "model", "version": "3.1-8b", "address": "127.0.0.1", "port": 18001},
   "actual": {... where the connection landed ...}, "deprecated": false, "lifecycle_redirect": false, "rule": 0,
   "cookie": 123}
"""
from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from agent.collector.units import format_duration_ns

VERDICTS: tuple[str, ...] = ("allowed", "denied", "audit", "redirected")

# SGR codes per verdict; everything else is uncolored.
VERDICT_STYLE: Mapping[str, str] = {
    "allowed": "32",        # green
    "denied": "1;31",       # bold red
    "audit": "33",          # yellow
    "redirected": "36",     # cyan
}
BOLD = "1"
DIM = "2"

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Endpoint:
    """One end of a decision, as the agent names it."""

    name: str
    kind: str | None = None
    version: str | None = None
    address: str | None = None
    port: int | None = None
    pid: int | None = None
    comm: str | None = None


@dataclass(frozen=True)
class FlowRecord:
    """One connect/sendmsg/ingress decision from the flow log."""

    time: str
    verdict: str
    hook: str
    reason: str
    protocol: str
    source: Endpoint
    destination: Endpoint
    actual: Endpoint
    family: str = ""
    deprecated: bool = False
    lifecycle_redirect: bool = False
    rule: int | None = None
    cookie: int | None = None

    @property
    def landed_elsewhere(self) -> bool:
        """True when the connection landed on another address/port than the one dialed."""
        return (self.actual.address, self.actual.port) != (self.destination.address, self.destination.port)

    @property
    def rewritten(self) -> bool:
        """A redirect took it (even when the backend picked is the address dialed)."""
        return self.verdict == "redirected" or self.lifecycle_redirect or self.landed_elsewhere


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
    return str(value)


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    return value


def parse_endpoint(obj: Any, where: str) -> Endpoint:
    """An endpoint object of the flow log; `where` names it in errors."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty string")
    try:
        return Endpoint(
            name=name,
            kind=_opt_str(obj, "kind"),
            version=_opt_str(obj, "version"),
            address=_opt_str(obj, "address"),
            port=_opt_int(obj, "port"),
            pid=_opt_int(obj, "pid"),
            comm=_opt_str(obj, "comm"),
        )
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None


def parse_flow_line(line: str) -> FlowRecord:
    """One flow-log line -> a record; ValueError (naming the field) when the line is not a decision."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("time", "verdict", "hook", "reason"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{key}: expected a string")
    destination = parse_endpoint(obj.get("destination"), "destination")
    actual_obj = obj.get("actual")
    actual = destination if actual_obj is None else parse_endpoint(actual_obj, "actual")
    return FlowRecord(
        time=obj["time"],
        verdict=obj["verdict"],
        hook=obj["hook"],
        reason=obj["reason"],
        protocol=str(obj.get("protocol") or ""),
        family=str(obj.get("family") or ""),
        source=parse_endpoint(obj.get("source"), "source"),
        destination=destination,
        actual=actual,
        deprecated=bool(obj.get("deprecated", False)),
        lifecycle_redirect=bool(obj.get("lifecycle_redirect", False)),
        rule=_opt_int(obj, "rule"),
        cookie=_opt_int(obj, "cookie"),
    )


# ---- labels ----------------------------------------------------------------------------------------------------

def identity_label(ep: Endpoint) -> str:
    """`llama@3.1-8b`, or the bare name when there is no version."""
    return f"{ep.name}@{ep.version}" if ep.version else ep.name


def address_label(ep: Endpoint) -> str:
    """`127.0.0.1:18001`, `[::1]:18001`, or '' when the endpoint has no address."""
    if not ep.address:
        return f":{ep.port}" if ep.port is not None else ""
    host = f"[{ep.address}]" if ":" in ep.address else ep.address
    return f"{host}:{ep.port}" if ep.port is not None else host


def clock_label(time: str) -> str:
    """`2026-11-27T15:00:00.123456Z` -> `15:00:00.123`; anything else unchanged."""
    m = re.match(r"^\d{4}-\d{2}-\d{2}[T ](\d{2}:\d{2}:\d{2})(\.\d{1,3})?", time)
    if not m:
        return time
    return m.group(1) + (m.group(2) or "")


def landed_label(record: FlowRecord) -> str:
    """Where the connection landed: `llama-next@4.0 :18002` (the address only when it differs from the one dialed)."""
    actual = record.actual
    if actual.address and actual.address == record.destination.address and actual.port is not None:
        where = f":{actual.port}"
    else:
        where = address_label(actual)
    return f"{identity_label(actual)} {where}".strip()


def strip_log_prefix(line: str) -> str:
    """`2026-11-27 15:05:08,159 INFO aimesh.agent: ready` -> `INFO aimesh.agent: ready` (logging's asctime)."""
    return re.sub(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\s+", "", line)


def note_label(record: FlowRecord) -> str:
    """Why, in a few words: the reason unless it is the plain `policy`, and the lifecycle flags."""
    parts: list[str] = []
    if record.reason and record.reason != "policy":
        parts.append(record.reason)
    if record.verdict == "audit":
        parts.append("would deny")
    if record.deprecated:
        parts.append("deprecated")
    if record.lifecycle_redirect:
        parts.append("sunset -> successor")
    return ", ".join(parts)


# ---- counting --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class FlowKey:
    """What the flow table counts by: who, to whom, with what verdict, and (when redirected) where it landed."""

    source: str
    destination: str
    verdict: str
    landed: str = ""     # `llama-next@4.0 :18002` when a redirect took the connection, else ''


def flow_key(record: FlowRecord) -> FlowKey:
    landed = landed_label(record) if record.rewritten else ""
    return FlowKey(identity_label(record.source), identity_label(record.destination), record.verdict, landed)


@dataclass
class FlowStats:
    count: int = 0
    last_time: str = ""
    note: str = ""


@dataclass
class FlowTable:
    """Counts per flow key, verdict totals and the last few decisions."""

    recent_size: int = 12
    flows: dict[FlowKey, FlowStats] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    recent: deque[FlowRecord] = field(default_factory=deque)
    bad_lines: int = 0
    last_error: str = ""

    def add(self, record: FlowRecord) -> None:
        stats = self.flows.setdefault(flow_key(record), FlowStats())
        stats.count += 1
        stats.last_time = record.time
        stats.note = note_label(record)
        self.totals[record.verdict] = self.totals.get(record.verdict, 0) + 1
        self.recent.append(record)
        while len(self.recent) > self.recent_size:
            self.recent.popleft()

    def add_line(self, line: str) -> FlowRecord | None:
        """Parse and count one flow-log line; a bad line is counted, not raised."""
        if not line.strip():
            return None
        try:
            record = parse_flow_line(line)
        except ValueError as e:
            self.bad_lines += 1
            self.last_error = str(e)
            return None
        self.add(record)
        return record

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def tally(records: Iterable[FlowRecord], recent_size: int = 12) -> FlowTable:
    """A table holding all of `records`."""
    table = FlowTable(recent_size=recent_size)
    for r in records:
        table.add(r)
    return table


def sorted_flows(flows: Mapping[FlowKey, FlowStats]) -> list[tuple[FlowKey, FlowStats]]:
    """Stable display order: by source, destination, verdict, landing."""
    return sorted(flows.items(), key=lambda kv: kv[0])


def verdict_summary(totals: Mapping[str, int]) -> str:
    """`allowed=3 denied=2 audit=0 redirected=5`, the four verdicts always, others after them."""
    names = list(VERDICTS) + sorted(k for k in totals if k not in VERDICTS)
    return " ".join(f"{v}={totals.get(v, 0)}" for v in names)


# ---- model calls -----------------------------------------------------------------------------------------------
# A line of `aimesh calls -o json` (proto/aimesh/v1/model_call.proto ModelCall in the proto3 JSON mapping, field names
# as in the proto, enums lower case, the token and time counts as numbers, other 64-bit integers as strings), e.g.
#   {"agent_id": "demo", "cookie": "4097", "sequence": "1", "start_time_unix_nano": "1764..." ,
#    "source": {"name": "chat-frontend", "kind": "service"}, "destination": {"name": "llama", ...},
#    "actual_destination": {"name": "llama-next", ...}, "protocol": "openai", "operation": "chat",
#    "request_model": "llama-3.1-8b", "response_model": "llama-next-4.0", "stream": true, "status": 200,
#    "input_tokens": 19, "output_tokens": 7, "time_to_first_chunk_ns": 2100000, "duration_ns": 3400000, "tls": false}

CALL_WINDOW = 4096      # the p50s are over the last this-many calls of a row


@dataclass(frozen=True)
class CallRecord:
    """One model call as the collector stored it (only what the view shows)."""

    key: tuple[str, str, str]          # (agent_id, cookie, sequence): the same call read twice counts once
    time_ns: int
    source: str                        # identity label, `chat-frontend`
    destination: str                   # the identity dialed
    reached: str                       # the identity really reached (after a redirect)
    request_model: str | None
    response_model: str | None
    status: int | None                 # None: no response head seen
    error_type: str | None = None
    stream: bool = False
    tls: bool = False
    incomplete: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttfc_ns: int | None = None
    duration_ns: int | None = None
    confidence: float | None = None

    @property
    def is_error(self) -> bool:
        """No response, an HTTP error status, or an error the API named (the rule of `aimesh calls --summary`)."""
        return self.status is None or self.status >= 400 or self.error_type is not None


def _json_count(obj: Mapping[str, Any], key: str) -> int | None:
    """A count of the JSON mapping: a number, or a string of digits (64-bit integers); ValueError names the key."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}: expected a count, got {value!r}")
    return value


def _identity(obj: Any, where: str) -> str:
    if obj is None:
        return "-"
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    name = obj.get("name") or "-"
    version = obj.get("version")
    if not isinstance(name, str) or not (version is None or isinstance(version, str)):
        raise ValueError(f"{where}.name: expected a string")
    return f"{name}@{version}" if version else name


def call_from_json(obj: Any) -> CallRecord:
    """A decoded `aimesh calls -o json` object -> a record; ValueError naming the field when it is not a call."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "source" not in obj or ("request_model" not in obj and "response_model" not in obj and "status" not in obj
                               and "protocol" not in obj):
        raise ValueError("source: missing (not a model call)")
    texts: dict[str, str | None] = {}
    for key in ("request_model", "response_model", "error_type"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
        texts[key] = value
    confidence = obj.get("confidence_mean")
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))):
        raise ValueError(f"confidence_mean: expected a number, got {confidence!r}")
    source = _identity(obj.get("source"), "source")
    destination = _identity(obj.get("destination"), "destination")
    actual = obj.get("actual_destination")
    reached = _identity(actual, "actual_destination") if isinstance(actual, Mapping) and actual.get("name") \
        else destination
    status = _json_count(obj, "status")
    return CallRecord(
        key=(str(obj.get("agent_id", "")), str(obj.get("cookie", "0")), str(obj.get("sequence", "0"))),
        time_ns=_json_count(obj, "start_time_unix_nano") or 0,
        source=source, destination=destination, reached=reached,
        request_model=texts["request_model"], response_model=texts["response_model"],
        status=status, error_type=texts["error_type"],
        stream=bool(obj.get("stream", False)), tls=bool(obj.get("tls", False)),
        incomplete=bool(obj.get("incomplete", False)),
        input_tokens=_json_count(obj, "input_tokens"), output_tokens=_json_count(obj, "output_tokens"),
        ttfc_ns=_json_count(obj, "time_to_first_chunk_ns"), duration_ns=_json_count(obj, "duration_ns"),
        confidence=None if confidence is None else float(confidence),
    )


def parse_call_line(line: str) -> CallRecord:
    """One line of `aimesh calls -o json` -> a record; ValueError (naming the field) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at column {e.colno}") from None
    return call_from_json(obj)


@dataclass(frozen=True, order=True)
class CallKey:
    """What the model-call table counts by: who asked, for which model, and which model answered."""

    source: str
    requested: str          # `-` when the request named none
    served: str             # `-` when no response named one (errors, cut streams)


def call_key(record: CallRecord) -> CallKey:
    return CallKey(record.source, record.request_model or "-", record.response_model or "-")


@dataclass
class CallStats:
    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    tls: int = 0                         # of the calls, how many over TLS
    durations: deque[int] = field(default_factory=lambda: deque(maxlen=CALL_WINDOW))
    ttfcs: deque[int] = field(default_factory=lambda: deque(maxlen=CALL_WINDOW))

    @property
    def p50_duration_ns(self) -> int | None:
        return median(self.durations)

    @property
    def p50_ttfc_ns(self) -> int | None:
        return median(self.ttfcs)


def median(values: Iterable[int]) -> int | None:
    """Nearest-rank p50 (as `aimesh calls --summary`); None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(len(ordered) / 2)) - 1]


@dataclass
class CallTable:
    """Counts per (source, requested, served) of the model calls read, each call once."""

    stats: dict[CallKey, CallStats] = field(default_factory=dict)
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    bad_lines: int = 0
    last_error: str = ""

    def add(self, record: CallRecord) -> bool:
        """Count a call; False when it was counted already (a follower restarted and sent its backlog again)."""
        if record.key in self.seen:
            return False
        self.seen.add(record.key)
        stats = self.stats.setdefault(call_key(record), CallStats())
        stats.calls += 1
        stats.errors += record.is_error
        stats.input_tokens += record.input_tokens or 0
        stats.output_tokens += record.output_tokens or 0
        stats.tls += record.tls
        if record.duration_ns is not None:
            stats.durations.append(record.duration_ns)
        if record.ttfc_ns is not None:
            stats.ttfcs.append(record.ttfc_ns)
        return True

    def add_line(self, line: str) -> CallRecord | None:
        """Parse and count one line; a line that is not a call is counted (and kept as the last error), not raised;
        None also for a call counted before."""
        if not line.strip():
            return None
        try:
            record = parse_call_line(line)
        except ValueError as e:
            self.bad_lines += 1
            self.last_error = f"{e}: {line.strip()[:120]}" if not line.lstrip().startswith("{") else str(e)
            return None
        return record if self.add(record) else None

    @property
    def total(self) -> int:
        return sum(s.calls for s in self.stats.values())

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.stats.values())


def tally_calls(records: Iterable[CallRecord]) -> CallTable:
    """The model-call table of `records` (a call listed twice counts once)."""
    table = CallTable()
    for r in records:
        table.add(r)
    return table


def duration_label(ns: int | None) -> str:
    return "-" if ns is None else format_duration_ns(ns)


def call_line(record: CallRecord, clock: str = "") -> str:
    """Plain mode: one model call, `chat-frontend -> llama llama-3.1-8b => llama-next-4.0 200 19/7 tok ...`."""
    model = record.request_model or "-"
    if record.response_model and record.response_model != record.request_model:
        model += f" => {record.response_model}"
    where = record.destination if record.reached == record.destination else f"{record.destination} => {record.reached}"
    tokens = "-" if record.input_tokens is None and record.output_tokens is None else \
        f"{record.input_tokens if record.input_tokens is not None else '?'}/" \
        f"{record.output_tokens if record.output_tokens is not None else '?'}"
    flags = [f for f, on in (("stream", record.stream), ("tls", record.tls), ("incomplete", record.incomplete)) if on]
    if record.error_type:
        flags.append(f"error={record.error_type}")
    if record.confidence is not None:
        flags.append(f"conf={record.confidence:.2f}")
    status = str(record.status) if record.status is not None else "-"
    text = (f"model call {record.source} -> {where} {model} {status} tokens {tokens} "
            f"ttfc {duration_label(record.ttfc_ns)} took {duration_label(record.duration_ns)}")
    return " ".join(x for x in (clock, text, " ".join(flags)) if x)


CALL_HEAD = ("SOURCE", "REQUESTED", "SERVED", "CALLS", "TOKENS IN/OUT", "P50 LATENCY", "P50 TTFC", "ERRORS")


def call_rows(table: CallTable, color: bool, empty: str = "(no model calls yet)") -> list[str]:
    """The MODEL CALLS table: header and one row per (source -> requested model, served model), sorted."""
    rows = sorted(table.stats.items(), key=lambda kv: kv[0])
    sw = max([len(CALL_HEAD[0])] + [len(k.source) for k, _ in rows])
    rw = max([len(CALL_HEAD[1])] + [len(k.requested) for k, _ in rows])
    vw = max([len(CALL_HEAD[2])] + [len(k.served) for k, _ in rows])
    tokens = [f"{s.input_tokens}/{s.output_tokens}" for _, s in rows]
    tw = max([len(CALL_HEAD[4])] + [len(t) for t in tokens])
    head = (f"{CALL_HEAD[0]:<{sw}}    {CALL_HEAD[1]:<{rw}}  {CALL_HEAD[2]:<{vw}}  {CALL_HEAD[3]:>6}  "
            f"{CALL_HEAD[4]:>{tw}}  {CALL_HEAD[5]:>11}  {CALL_HEAD[6]:>9}  {CALL_HEAD[7]:>6}")
    out = [style(head, BOLD, color)]
    if not rows:
        out.append(style(empty, DIM, color))
    for (key, stats), tok in zip(rows, tokens):
        errors = style(f"{stats.errors:>6}", "1;31", color and stats.errors > 0)
        note = "  tls" if stats.tls else ""
        out.append(f"{key.source:<{sw}} -> {key.requested:<{rw}}  {key.served:<{vw}}  {stats.calls:>6}  {tok:>{tw}}  "
                   f"{duration_label(stats.p50_duration_ns):>11}  {duration_label(stats.p50_ttfc_ns):>9}  "
                   f"{errors}{note}")
    return out


# ---- text ------------------------------------------------------------------------------------------------------

def style(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def verdict_cell(verdict: str, width: int, color: bool) -> str:
    """The verdict padded to `width`, colored (padding outside the color so columns stay aligned)."""
    return style(verdict, VERDICT_STYLE.get(verdict, ""), color) + " " * max(0, width - len(verdict))


def visible_len(text: str) -> int:
    return len(_ANSI_RE.sub("", text))


def clip(text: str, width: int) -> str:
    """Cut `text` to `width` visible characters, keeping escape sequences whole and closing any open color."""
    if width <= 0:
        return ""
    if visible_len(text) <= width:
        return text
    out: list[str] = []
    shown = 0
    i = 0
    colored = False
    while i < len(text) and shown < width - 1:
        m = _ANSI_RE.match(text, i)
        if m:
            out.append(m.group(0))
            colored = m.group(0) != "\x1b[0m"
            i = m.end()
            continue
        out.append(text[i])
        shown += 1
        i += 1
    out.append("~")
    if colored:
        out.append("\x1b[0m")
    return "".join(out)


def decision_line(record: FlowRecord, color: bool) -> str:
    """One decision on one line: `15:00:00.123 redirected chat-frontend[12] -> llama@3.1-8b 127.0.0.1:18001 => ...`."""
    src = identity_label(record.source)
    if record.source.pid is not None:
        src += f"[{record.source.pid}]"
    dst = f"{identity_label(record.destination)} {address_label(record.destination)}".strip()
    text = f"{clock_label(record.time)} {verdict_cell(record.verdict, 10, color)} {src} -> {dst}"
    if record.rewritten:
        text += f" => {landed_label(record)}"
    note = note_label(record)
    tail = f"{record.hook}/{record.protocol}" if record.protocol else record.hook
    if note:
        tail += f" {note}"
    return f"{text}  {style(tail, DIM, color)}"


@dataclass(frozen=True)
class WorkloadStatus:
    """One process of the demo as the view shows it."""

    name: str
    role: str
    cgroup: str             # relative to the demo subtree, '' for the agent
    identity: str           # the identity the config gives its cgroup (`unmanaged` when none)
    pid: int | None
    state: str              # `running`, `exited 1`, `starting`, ...
    last_line: str = ""


@dataclass(frozen=True)
class Frame:
    """Everything one screen shows."""

    title: str
    subtitle: str
    elapsed_s: float
    table: FlowTable
    workloads: Sequence[WorkloadStatus]
    message: str = ""       # a status line (e.g. `stopping...`), shown under the title
    calls: CallTable = field(default_factory=CallTable)     # model calls read from the collector


def _elapsed(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60:02d}:{s % 60:02d}"


def flow_rows(table: FlowTable, color: bool) -> list[str]:
    """The flow table: header and one row per (source -> destination, verdict, landing)."""
    rows = sorted_flows(table.flows)
    srcs = [k.source for k, _ in rows]
    dsts = [k.destination for k, _ in rows]
    sw = max([len("SOURCE")] + [len(s) for s in srcs])
    dw = max([len("DESTINATION")] + [len(d) for d in dsts])
    head = f"{'SOURCE':<{sw}}    {'DESTINATION':<{dw}}  {'VERDICT':<10} {'COUNT':>6}  {'LAST':<8}  LANDED ON / NOTE"
    out = [style(head, BOLD, color)]
    if not rows:
        out.append(style("(no decisions yet)", DIM, color))
    for key, stats in rows:
        detail = " ".join(x for x in (key.landed and f"=> {key.landed}", stats.note) if x)
        out.append(
            f"{key.source:<{sw}} -> {key.destination:<{dw}}  {verdict_cell(key.verdict, 10, color)} "
            f"{stats.count:>6}  {clock_label(stats.last_time)[:8]:<8}  {detail}"
        )
    return out


def workload_rows(workloads: Sequence[WorkloadStatus], color: bool) -> list[str]:
    nw = max([len("WORKLOAD")] + [len(w.name) for w in workloads])
    cw = max([len("CGROUP")] + [len(w.cgroup) for w in workloads])
    iw = max([len("IDENTITY")] + [len(w.identity) for w in workloads])
    stw = max([len("STATE")] + [len(w.state) for w in workloads])
    head = f"{'WORKLOAD':<{nw}}  {'CGROUP':<{cw}}  {'IDENTITY':<{iw}}  {'PID':>7}  {'STATE':<{stw}}  LAST OUTPUT"
    out = [style(head, BOLD, color)]
    for w in workloads:
        pid = str(w.pid) if w.pid is not None else "-"
        state = style(f"{w.state:<{stw}}", "" if w.state == "running" else "1;31", color and w.state != "running")
        out.append(f"{w.name:<{nw}}  {w.cgroup:<{cw}}  {w.identity:<{iw}}  {pid:>7}  {state}  "
                   f"{strip_log_prefix(w.last_line)}")
    return out


def render_frame(frame: Frame, width: int = 120, height: int = 40, color: bool = True) -> list[str]:
    """The screen as lines, each at most `width` visible characters and at most `height` of them.

    The recent-decisions list comes last and gets whatever rows the other sections leave (at least 3 when there are any).
    """
    table = frame.table
    head = [
        style(frame.title, BOLD, color) + f"   up {_elapsed(frame.elapsed_s)}",
        frame.subtitle,
        f"decisions {table.total}: "
        + "  ".join(verdict_cell(v, 0, color) + f" {table.totals.get(v, 0)}" for v in VERDICTS)
        + (f"   bad log lines {table.bad_lines}" if table.bad_lines else ""),
    ]
    if frame.message:
        head.append(style(frame.message, "1;33", color))
    flows = [""] + flow_rows(table, color)
    calls = frame.calls
    calls_title = f"MODEL CALLS {calls.total} (errors {calls.errors}), from the collector"
    if calls.bad_lines:
        calls_title += f"   unreadable {calls.bad_lines}: {calls.last_error}"
    model_calls = ["", style(calls_title, BOLD, color)] + call_rows(calls, color)
    flows += model_calls
    works = [""] + workload_rows(frame.workloads, color)
    recent_all = [decision_line(r, color) for r in reversed(table.recent)]
    fixed = len(head) + len(flows) + len(works) + 2      # +2: blank line and title of the recent section
    room = max(3, height - fixed)
    recent = [""] + [style("RECENT DECISIONS (newest first)", BOLD, color)] + (
        recent_all[:room] if recent_all else [style("(none yet)", DIM, color)]
    )
    lines = head + flows + works + recent
    return [clip(line, width) for line in lines[:max(1, height)]]


def frame_text(lines: Sequence[str], first: bool) -> str:
    """The ANSI bytes that paint `lines` over the previous frame: home, each line cleared to its end, rest cleared."""
    prefix = "\x1b[2J\x1b[H" if first else "\x1b[H"
    return prefix + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"


def plain_workload_line(name: str, line: str) -> str:
    """Non-TTY mode: one workload output line."""
    return f"[{name}] {line}"
