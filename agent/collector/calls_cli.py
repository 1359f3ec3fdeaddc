"""The `calls` command: model calls stored by the collector, listed, followed or summarized.

    aimesh calls --collector 127.0.0.1:4790 --from chat-ui --model gpt-4o --status error --since 1h
    aimesh calls -f -o json
    aimesh calls --summary --since 1d

Registered by agent/collector/cli.py add_commands; the listing skeleton (channel, token, errors) is cli.run_listing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import model_validator

from agent.collector.channel import ConfigError
from agent.collector.cli import (
    FlowsOptions,
    JsonPrinter,
    TablePrinter,
    add_client_options,
    format_line,
    identity_text,
    parse_identity,
    printable,
    run_listing,
    table_widths,
)
from agent.collector.units import format_duration_ns, format_time_ns, parse_time_ns

if TYPE_CHECKING:
    from agent._gen.aimesh.v1 import collector_pb2, model_call_pb2

# --status words -> inclusive HTTP status ranges; (0, 0) is "no response"
STATUS_WORDS: dict[str, tuple[tuple[int, int], ...]] = {
    "ok": ((100, 399),),
    "error": ((400, 599), (0, 0)),
    "none": ((0, 0),),
}
# Fields of ModelCall that JSON prints as numbers (the proto3 mapping makes 64-bit integers strings): the ones
# people sum and compare, all far below 2^53.
CALL_NUMBERS = ("input_tokens", "output_tokens", "cached_tokens", "time_to_first_chunk_ns", "duration_ns",
                "time_per_output_chunk_ns", "request_bytes", "response_bytes")  # fmt: skip
CALL_HEADER = ["TIME", "SOURCE", "", "DESTINATION", "MODEL(REQ->RESP)", "STATUS", "TOKENS(IN/OUT)", "TTFC",
               "DURATION", "INFO"]  # fmt: skip
_CALL_FOLLOW_WIDTHS = [19, 24, 2, 24, 28, 6, 14, 8, 9, 0]
SUMMARY_HEADER = ["SOURCE", "", "MODEL", "CALLS", "ERRORS", "TOKENS(IN/OUT)", "DURATION(P50/P99)", "TTFC(P50/P99)"]


def parse_statuses(text: str) -> tuple[tuple[int, int], ...]:
    """"200", "4xx", "ok", "error", "none", comma-separated -> inclusive status ranges. Raises ConfigError."""
    out: list[tuple[int, int]] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in STATUS_WORDS:
            out += STATUS_WORDS[part]
        elif len(part) == 3 and part[0] in "12345" and part[1:] == "xx":
            out.append((int(part[0]) * 100, int(part[0]) * 100 + 99))
        elif part.isdigit() and 100 <= int(part) <= 599:
            out.append((int(part), int(part)))
        else:
            raise ConfigError(f"--status {text!r}: give HTTP statuses (429), classes (5xx), ok, error or none,"
                              " comma-separated")  # fmt: skip
    return tuple(out)


def add_calls_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser(
        "calls",
        help="list, follow or summarize model calls stored by the collector",
        description="Show the LLM API calls the agents recorded (model, tokens, latency, outcome).",
    )
    c.add_argument("--from", dest="from_", metavar="ID", help="source identity: [KIND/]NAME[@VERSION]")
    c.add_argument("--to", metavar="ID", help="destination identity (dialed or reached): [KIND/]NAME[@VERSION]")
    c.add_argument("--model", metavar="M", help="the request or response model")
    c.add_argument("--status", metavar="S", help="HTTP status (429), class (5xx), ok, error (>= 400 or none), none")
    c.add_argument("--since", metavar="DUR|TIME", help="calls after this long ago (5m) or this time (RFC 3339)")
    c.add_argument("--until", metavar="DUR|TIME", help="calls before this long ago or this time")
    c.add_argument("--limit", type=int, metavar="N",
                   help="the newest N calls (default 20, --summary all; 0 = all); --follow: N of backlog")  # fmt: skip
    c.add_argument("--follow", "-f", action="store_true", help="keep printing new calls as they arrive")
    c.add_argument("--summary", action="store_true",
                   help="per source -> model: calls, errors, tokens, p50/p99 duration and time to first chunk")
    c.add_argument("-o", "--output", choices=("table", "json"), default="table", help="default table")
    add_client_options(c)
    c.set_defaults(func=run_calls)


class CallsOptions(FlowsOptions):
    model: str | None = None
    status: str | None = None
    summary: bool = False

    @model_validator(mode="after")
    def _summary(self) -> CallsOptions:
        if self.summary and self.follow:
            raise ValueError("--summary cannot be combined with --follow")
        return self


def build_call_query(opts: CallsOptions, now_ns: int) -> collector_pb2.CallQuery:
    from agent._gen.aimesh.v1 import collector_pb2 as cpb

    q = cpb.CallQuery()
    for text, match in ((opts.from_, q.source), (opts.to, q.destination)):
        if text:
            match.name, match.kind, match.version = parse_identity(text)
    if opts.model:
        q.model = opts.model
    if opts.status:
        for lo, hi in parse_statuses(opts.status):
            q.statuses.add(min=lo, max=hi)
    try:
        if opts.since:
            q.since_unix_nano = max(parse_time_ns(opts.since, now_ns), 0)
        if opts.until:
            q.until_unix_nano = max(parse_time_ns(opts.until, now_ns), 0)
    except ValueError as e:
        raise ConfigError(f"--since/--until: {e}") from None
    if opts.limit is not None:
        q.limit = opts.limit
    elif not (opts.follow or opts.summary):
        q.limit = 20
    return q


# --- table -------------------------------------------------------------------------------------------------------


def model_text(call: model_call_pb2.ModelCall) -> str:
    """req, req->resp when the server answered with another name, ?->resp when the request named none."""
    req = call.request_model if call.HasField("request_model") else ""
    resp = call.response_model if call.HasField("response_model") else ""
    if req and resp and resp != req:
        return f"{req}->{resp}"
    if req or resp:
        return req or f"?->{resp}"
    return "-"


def _tokens(call: model_call_pb2.ModelCall) -> str:
    have_in, have_out = call.HasField("input_tokens"), call.HasField("output_tokens")
    if not (have_in or have_out):
        return "-"
    return f"{call.input_tokens if have_in else '?'}/{call.output_tokens if have_out else '?'}"


def _opt_duration(call: model_call_pb2.ModelCall, name: str) -> str:
    return format_duration_ns(getattr(call, name)) if call.HasField(name) else "-"


def _enum_word(call: model_call_pb2.ModelCall, name: str, prefix: str) -> str:
    fd = call.DESCRIPTOR.fields_by_name[name]
    value = fd.enum_type.values_by_number.get(getattr(call, name))
    return value.name.removeprefix(prefix).lower() if value is not None else str(getattr(call, name))


def call_cells(call: model_call_pb2.ModelCall, tz: tzinfo | None = None) -> list[str]:
    """One table row: TIME, SOURCE, ->, DESTINATION, MODEL, STATUS, TOKENS, TTFC, DURATION, INFO."""
    dst = identity_text(call.destination)
    if call.actual_destination.name and (call.actual_destination.name != call.destination.name
                                         or call.actual_destination.version != call.destination.version):  # fmt: skip
        dst = f"{dst} => {identity_text(call.actual_destination)}"
    info = [f"{_enum_word(call, 'protocol', 'LLM_PROTOCOL_')}/{_enum_word(call, 'operation', 'LLM_OPERATION_')}"]
    for flag, label in ((call.stream, "stream"), (call.tls, "tls"), (call.incomplete, "incomplete"),
                        (call.truncated, "truncated")):  # fmt: skip
        if flag:
            info.append(label)
    if call.HasField("error_type"):
        info.append(f"error={call.error_type}")
    if call.gateway:   # the node gateway's judgement: gateway=served|refused|would_deny, the policy, a rewrite
        info.append(f"gateway={call.decision or '?'}")
        if call.HasField("policy"):
            info.append(f"policy={call.policy}")
        if call.HasField("sent_model") and call.sent_model != call.request_model:
            info.append(f"sent={call.sent_model}")
    if call.finish_reasons:
        info.append(f"finish={','.join(call.finish_reasons)}")
    if call.HasField("cached_tokens") and call.cached_tokens:
        info.append(f"cached={call.cached_tokens}")
    if call.HasField("confidence_mean"):
        info.append(f"conf={call.confidence_mean:.2f}")
    cells = [
        format_time_ns(call.start_time_unix_nano, tz) if call.start_time_unix_nano else "-",
        identity_text(call.source),
        "->",
        dst,
        model_text(call),
        str(call.status) if call.HasField("status") else "-",
        _tokens(call),
        _opt_duration(call, "time_to_first_chunk_ns"),
        _opt_duration(call, "duration_ns"),
        " ".join(info),
    ]
    return [printable(c) for c in cells]


# --- summary -----------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    """Nearest-rank percentile of sorted values (None when empty). Pure."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def is_error(call: model_call_pb2.ModelCall) -> bool:
    """No response, an HTTP error status, or an error the API named."""
    return not call.HasField("status") or call.status >= 400 or call.HasField("error_type")


@dataclass
class SummaryRow:
    source: str
    model: str
    calls: int = 0
    errors: int = 0
    refused: int = 0          # refused by the node gateway's model policy (decision: refused)
    input_tokens: int = 0
    output_tokens: int = 0
    durations: list[int] = field(default_factory=list)
    ttfcs: list[int] = field(default_factory=list)

    def cells(self) -> list[str]:
        def pair(values: list[int]) -> str:
            values.sort()
            lo, hi = percentile(values, 50), percentile(values, 99)
            return "-" if lo is None or hi is None else f"{format_duration_ns(lo)}/{format_duration_ns(hi)}"

        return [printable(self.source), "->", printable(self.model), str(self.calls), str(self.errors),
                f"{self.input_tokens}/{self.output_tokens}", pair(self.durations), pair(self.ttfcs)]  # fmt: skip


def summarize(calls: Iterable[model_call_pb2.ModelCall]) -> list[SummaryRow]:
    """Per (source, model) — the request model, else the response model: counts, token sums (of the calls that
    reported them), durations and times to first chunk. Sorted by calls, most first. Pure."""
    rows: dict[tuple[str, str], SummaryRow] = {}
    for call in calls:
        key = (identity_text(call.source), call.request_model or call.response_model or "-")
        row = rows.setdefault(key, SummaryRow(*key))
        row.calls += 1
        row.errors += is_error(call)
        row.refused += call.decision == "refused"
        row.input_tokens += call.input_tokens
        row.output_tokens += call.output_tokens
        if call.HasField("duration_ns"):
            row.durations.append(call.duration_ns)
        if call.HasField("time_to_first_chunk_ns"):
            row.ttfcs.append(call.time_to_first_chunk_ns)
    return sorted(rows.values(), key=lambda r: (-r.calls, r.source, r.model))


class SummaryPrinter:
    """Collects every call, then prints the summary table (or one JSON object per row)."""

    def __init__(self, out: TextIO, json_output: bool = False) -> None:
        self._out = out
        self._json = json_output
        self._calls: list[model_call_pb2.ModelCall] = []

    def add(self, call: model_call_pb2.ModelCall) -> None:
        self._calls.append(call)

    def finish(self) -> None:
        rows = summarize(self._calls)
        refusals = any(r.refused for r in rows)   # the REFUSED column/key when the node gateway refused something
        if self._json:
            import json

            for r in rows:
                r.durations.sort()
                r.ttfcs.sort()
                obj = {"source": r.source, "model": r.model, "calls": r.calls, "errors": r.errors,
                       "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                       "duration_p50_ns": percentile(r.durations, 50), "duration_p99_ns": percentile(r.durations, 99),
                       "ttfc_p50_ns": percentile(r.ttfcs, 50), "ttfc_p99_ns": percentile(r.ttfcs, 99)}  # fmt: skip
                if refusals:
                    obj["refused"] = r.refused
                self._out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        elif rows:
            header = SUMMARY_HEADER + (["REFUSED"] if refusals else [])
            cells = [r.cells() + ([str(r.refused)] if refusals else []) for r in rows]
            widths = table_widths(cells, header)
            for line in [header, *cells]:
                self._out.write(format_line(line, widths) + "\n")
        elif self._out.isatty():
            self._out.write("no model calls\n")
        self._out.flush()


# --- command -----------------------------------------------------------------------------------------------------


def run_calls(args: argparse.Namespace, out: TextIO | None = None, tz: tzinfo | None = None) -> int:
    """`aimesh calls`: print stored model calls, follow new ones, or summarize them."""
    stdout = out if out is not None else sys.stdout

    def listing(opts: CallsOptions, stub: Any, metadata: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
        query = build_call_query(opts, time.time_ns())
        if opts.follow:
            stream = stub.FollowCalls(query, metadata=metadata, wait_for_ready=False)
        else:
            stream = stub.ListCalls(query, metadata=metadata, timeout=opts.timeout / 1e9)
        printer: Any
        if opts.summary:
            printer = SummaryPrinter(stdout, json_output=opts.output == "json")
        elif opts.output == "json":
            printer = JsonPrinter(stdout, CALL_NUMBERS)
        else:
            printer = TablePrinter(stdout, tz, buffer=0 if opts.follow else 200, cells=call_cells,
                                   header=CALL_HEADER, follow_widths=_CALL_FOLLOW_WIDTHS,
                                   empty="no model calls")  # fmt: skip
        return stream, printer

    return run_listing("calls", CallsOptions, args, listing)
