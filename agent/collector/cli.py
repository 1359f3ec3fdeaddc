"""The `collector` and `flows` commands. agent/cli.py registers them with add_commands(subparsers).

    aimesh collector --listen 127.0.0.1:4790 --db /var/lib/aimesh/flows.db --retention-age 7d --retention-bytes 1GiB
    aimesh flows --collector 127.0.0.1:4790 --from chat-ui --to llm@v2 --verdict denied --since 10m -o table
    aimesh flows --follow

Options are checked by pydantic models (errors name the flag); the server and client code is imported only when a
command runs, so `aimesh --help` works before the protobuf code is generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.collector.channel import ConfigError, parse_hostport
from agent.collector.units import (
    format_bytes,
    format_duration_ns,
    format_time_ns,
    parse_duration_ns,
    parse_size,
    parse_time_ns,
)

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from agent._gen.aimesh.v1 import collector_pb2, flow_pb2

DEFAULT_PORT = 4790
DEFAULT_COLLECTOR = f"127.0.0.1:{DEFAULT_PORT}"
VERDICTS = ("allowed", "denied", "audit", "redirected")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

M = TypeVar("M", bound=BaseModel)


# --- argument types -----------------------------------------------------------------------------------------------


def _duration_arg(text: str) -> int:
    try:
        return parse_duration_ns(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _verdicts_arg(text: str) -> list[str]:
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VERDICTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: verdicts are {', '.join(VERDICTS)} (comma-separated)")
    return names


def _add_token_options(p: argparse.ArgumentParser, *, server: bool = False) -> argparse._MutuallyExclusiveGroup:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", help="bearer token (visible in the process list: prefer --token-file)")
    g.add_argument("--token-file", type=Path, metavar="PATH",
                   help="file whose first line is the bearer token"
                   + (" (created 0600 with a random token if missing; default: <db>.token)" if server else ""))
    return g


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `collector` and `flows` on an argparse subparsers object; each sets func(args) -> exit code."""
    c = subparsers.add_parser(
        "collector",
        help="run the flow collector (gRPC service and store)",
        description="Receive flow records from agents over gRPC and keep them in a SQLite database.",
    )
    c.add_argument("--listen", default=DEFAULT_COLLECTOR, metavar="HOST:PORT", help=f"default {DEFAULT_COLLECTOR}")
    c.add_argument("--db", type=Path, required=True, metavar="PATH", help="SQLite database file (created if missing)")
    c.add_argument("--retention-age", type=_duration_arg, default="7d", metavar="DUR",
                   help="delete flows older than this (e.g. 12h, 7d; 0 = keep); default 7d")  # fmt: skip
    c.add_argument("--retention-bytes", type=_size_arg, default="1GiB", metavar="N",
                   help="delete the oldest flows past this much data (500MiB; 0 = no limit); default 1GiB")  # fmt: skip
    c.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (enables TLS)")
    c.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    c.add_argument("--tls-ca", type=Path, metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    auth = _add_token_options(c, server=True)
    auth.add_argument("--no-auth", action="store_true",
                      help="accept any caller (not recommended: anyone who can connect lists flows and pushes records)")
    c.add_argument("--agent-tokens", type=Path, metavar="PATH",
                   help="per-agent tokens, `AGENT_ID TOKEN` per line: each may push only for its agent_id")
    c.add_argument("--max-batch-records", type=int, default=10_000, metavar="N", help="default 10000")
    c.add_argument("--max-batch-bytes", type=_size_arg, default="8MiB", metavar="N", help="default 8MiB")
    c.add_argument("--max-followers", type=int, default=8, metavar="N", help="concurrent `flows --follow` streams")
    c.add_argument("--max-streams", type=int, default=8, metavar="N",
                   help="concurrent streams of any kind (follow, list, health watch); more are refused (default 8)")
    c.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP here")
    c.set_defaults(func=run_collector)

    f = subparsers.add_parser(
        "flows",
        help="list or follow flows stored by the collector",
        description="Show flow records from the collector, like `hubble observe`.",
    )
    f.add_argument("--from", dest="from_", metavar="ID", help="source identity: [KIND/]NAME[@VERSION]")
    f.add_argument("--to", metavar="ID", help="destination identity (dialed or reached): [KIND/]NAME[@VERSION]")
    f.add_argument("--verdict", type=_verdicts_arg, action="append", metavar="V",
                   help=f"only these verdicts ({', '.join(VERDICTS)}); repeat or comma-separate")  # fmt: skip
    f.add_argument("--since", metavar="DUR|TIME", help="flows after this long ago (5m) or this time (RFC 3339)")
    f.add_argument("--until", metavar="DUR|TIME", help="flows before this long ago or this time")
    f.add_argument("--limit", type=int, metavar="N",
                   help="the newest N flows (default 20; 0 = all); --follow: N of backlog (default: none)")  # fmt: skip
    f.add_argument("--follow", "-f", action="store_true", help="keep printing new flows as they arrive")
    f.add_argument("-o", "--output", choices=("table", "json"), default="table", help="default table")
    add_client_options(f)
    f.set_defaults(func=run_flows)

    from agent.collector.calls_cli import add_calls_command  # it imports this module

    add_calls_command(subparsers)


def add_client_options(p: argparse.ArgumentParser) -> None:
    """How a listing command reaches the collector: address, TLS, token, deadline."""
    p.add_argument("--collector", default=DEFAULT_COLLECTOR, metavar="HOST:PORT", help=f"default {DEFAULT_COLLECTOR}")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-ca/--tls-cert)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA bundle to verify the collector (default: system)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (mTLS)")
    p.add_argument("--tls-server-name", metavar="NAME", help="name to verify the collector's certificate against")
    _add_token_options(p)
    p.add_argument("--timeout", type=_duration_arg, default="30s", metavar="DUR", help="deadline of a listing")


# --- validated options --------------------------------------------------------------------------------------------


class CollectorOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    listen: str
    db: Path
    retention_age: int = Field(ge=0)  # ns
    retention_bytes: int = Field(ge=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    token: str | None = None
    token_file: Path | None = None
    no_auth: bool = False
    agent_tokens: Path | None = None
    max_batch_records: int = Field(ge=1)
    max_batch_bytes: int = Field(ge=1024)
    max_followers: int = Field(ge=0, le=64)
    max_streams: int = Field(default=8, ge=0, le=64)
    metrics: str | None = None

    @field_validator("listen", "metrics")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_hostport(v, what="address")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _tls(self) -> CollectorOptions:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.no_auth and self.agent_tokens is not None:
            raise ValueError("--no-auth cannot be combined with --agent-tokens")
        if self.max_followers > self.max_streams:
            raise ValueError(f"--max-followers ({self.max_followers}) cannot exceed --max-streams ({self.max_streams})")
        return self


class FlowsOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    collector: str
    from_: str | None = None
    to: str | None = None
    verdict: list[list[str]] | None = None
    since: str | None = None
    until: str | None = None
    limit: int | None = Field(default=None, ge=0)
    follow: bool = False
    output: Literal["table", "json"] = "table"
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = None
    token_file: Path | None = None
    timeout: int = Field(gt=0)  # ns

    @field_validator("collector")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            parse_hostport(v, what="address")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _tls(self) -> FlowsOptions:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None or self.tls_server_name is not None


def _flag(loc: Sequence[Any]) -> str:
    name = str(loc[0]) if loc else ""
    return "--" + name.rstrip("_").replace("_", "-") if name else ""


def parse_options(model: type[M], args: argparse.Namespace) -> M:
    """argparse result -> validated options; ConfigError with a one-line message naming the flag."""
    try:
        return model.model_validate(vars(args))
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        flag = _flag(err.get("loc", ()))
        raise ConfigError(f"{flag}: {msg}" if flag else msg) from None


# --- output -------------------------------------------------------------------------------------------------------


def parse_identity(text: str) -> tuple[str, str, str]:
    """"[KIND/]NAME[@VERSION]" -> (name, kind, version)."""
    kind, _, rest = text.strip().rpartition("/")
    name, _, version = rest.partition("@")
    if not (name or kind or version):
        raise ConfigError(f"identity {text!r}: expected [KIND/]NAME[@VERSION]")
    return name, kind, version


def _enum_name(value: int, name_of: Callable[[int], str], prefix: str) -> str:
    try:
        return name_of(value).removeprefix(prefix)
    except ValueError:
        return f"{prefix.rstrip('_')}({value})"


def endpoint_text(address: str, port: int = 0) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port else host


def identity_text(ident: flow_pb2.Identity, address: str = "", port: int = 0) -> str:
    """name(version), or the address when the identity has no name."""
    if ident.name:
        return f"{ident.name}({ident.version})" if ident.version else ident.name
    if address:
        return endpoint_text(address, port)
    return ident.kind or "-"


def printable(text: str) -> str:
    """Control characters (a comm set with prctl can hold terminal escapes) shown escaped, e.g. \\x1b."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def flow_cells(rec: flow_pb2.FlowRecord, tz: tzinfo | None = None) -> list[str]:
    """One table row: TIME, SOURCE, ->, DESTINATION, VERDICT, BYTES, DURATION, RTT, INFO."""
    from agent._gen.aimesh.v1 import flow_pb2 as pb

    when = rec.end_time_unix_nano or rec.start_time_unix_nano
    src = identity_text(rec.source, rec.source_address, 0)
    dialed = identity_text(rec.destination, rec.dialed_address or rec.destination_address,
                           rec.dialed_port or rec.destination_port)  # fmt: skip
    dst = dialed
    if rec.actual_destination.name and (
        rec.actual_destination.name != rec.destination.name or rec.actual_destination.version != rec.destination.version
    ):
        dst = f"{dialed} => {identity_text(rec.actual_destination)}"
    elif rec.redirected and rec.destination_address and rec.destination_address != rec.dialed_address:
        dst = f"{dialed} => {endpoint_text(rec.destination_address, rec.destination_port)}"
    verdict = _enum_name(rec.verdict, pb.Verdict.Name, "VERDICT_")
    traffic = rec.bytes_sent or rec.bytes_received
    nbytes = f"{format_bytes(rec.bytes_sent)}/{format_bytes(rec.bytes_received)}" if traffic else "-"
    duration = format_duration_ns(rec.duration_ns) if rec.duration_ns else "-"
    rtt = format_duration_ns(rec.srtt_us * 1000) if rec.srtt_us else "-"
    info: list[str] = []
    if rec.protocol == pb.PROTOCOL_UDP:
        info.append("udp")
    if rec.reason not in (pb.REASON_UNSPECIFIED, pb.REASON_POLICY):
        info.append(_enum_name(rec.reason, pb.Reason.Name, "REASON_").lower().replace("_", "-"))
    for flag, label in ((rec.deprecated, "deprecated"), (rec.lifecycle, "lifecycle"), (rec.interim, "interim")):
        if flag:
            info.append(label)
    if rec.retransmits:
        info.append(f"retrans={rec.retransmits}")
    if rec.count > 1:  # an aggregate: this many decisions (0 means 1)
        info.append(f"x{rec.count}")
    cells = [
        format_time_ns(when, tz) if when else "-",
        src,
        "->",
        dst,
        verdict,
        nbytes,
        duration,
        rtt,
        " ".join(info),
    ]
    return [printable(c) for c in cells]


HEADER = ["TIME", "SOURCE", "", "DESTINATION", "VERDICT", "BYTES(TX/RX)", "DURATION", "RTT", "INFO"]
_FOLLOW_WIDTHS = [19, 24, 2, 32, 10, 17, 9, 7, 0]


def format_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def table_widths(rows: Iterable[Sequence[str]], header: Sequence[str] = HEADER) -> list[int]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    return widths


class TablePrinter:
    """Prints flows (or, given cells/header/follow_widths, other records) as a table. The first `buffer` rows size
    the columns; later rows use those widths. buffer 0 (following): fixed widths, each row at once."""

    def __init__(self, out: TextIO, tz: tzinfo | None = None, buffer: int = 200, *,
                 cells: Callable[[Any, tzinfo | None], list[str]] | None = None, header: Sequence[str] = HEADER,
                 follow_widths: Sequence[int] = _FOLLOW_WIDTHS, empty: str = "no flows") -> None:  # fmt: skip
        self._out = out
        self._tz = tz
        self._buffer = buffer
        self._cells = cells if cells is not None else flow_cells
        self._header = list(header)
        self._empty = empty
        self._rows: list[list[str]] = []
        self._widths: list[int] | None = None if buffer > 0 else list(follow_widths)
        if self._widths is not None:
            self._emit(self._header)

    def _emit(self, cells: Sequence[str]) -> None:
        assert self._widths is not None
        self._out.write(format_line(cells, self._widths) + "\n")

    def add(self, rec: Any) -> None:
        cells = self._cells(rec, self._tz)
        if self._widths is not None:
            self._emit(cells)
            self._out.flush()
            return
        self._rows.append(cells)
        if len(self._rows) >= self._buffer:
            self._release()

    def _release(self) -> None:
        self._widths = table_widths(self._rows, self._header)
        self._emit(self._header)
        for row in self._rows:
            self._emit(row)
        self._rows.clear()
        self._out.flush()

    def finish(self) -> None:
        if self._widths is None:
            if self._rows:
                self._release()
            else:
                self._out.write(f"{self._empty}\n" if self._out.isatty() else "")
        self._out.flush()


def enum_prefix(enum_name: str) -> str:
    """The prefix protobuf style puts on an enum's values: RecordKind -> "RECORD_KIND_". Pure."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


def message_json(msg: Message, numbers: Iterable[str] = ()) -> dict[str, Any]:
    """The proto3 JSON mapping of msg with its field names (defaults omitted), except that enum values read as the
    flow log writes them, lower case without their prefix (`"verdict": "denied"`, `"kind": "decision"`,
    `"protocol": "tcp"`), like `hubble observe -o json`; a value this version does not know stays a number. The
    top-level fields in `numbers` are JSON numbers instead of the mapping's strings for 64-bit integers."""
    from google.protobuf import json_format

    obj = json_format.MessageToDict(msg, preserving_proto_field_name=True, use_integers_for_enums=True)
    _name_enums(msg, obj)
    for name in numbers:
        if name in obj:
            obj[name] = int(obj[name])
    return obj


def _name_enums(msg: Message, obj: dict[str, Any]) -> None:
    for fd in msg.DESCRIPTOR.fields:
        if fd.name not in obj:
            continue
        if fd.enum_type is not None:
            prefix = enum_prefix(fd.enum_type.name)

            def name(v: int, et: Any = fd.enum_type, prefix: str = prefix) -> str | int:
                value = et.values_by_number.get(v)
                return value.name.removeprefix(prefix).lower() if value is not None else v

            obj[fd.name] = [name(v) for v in obj[fd.name]] if isinstance(obj[fd.name], list) else name(obj[fd.name])
        elif fd.message_type is not None and isinstance(obj[fd.name], dict):
            _name_enums(getattr(msg, fd.name), obj[fd.name])


class JsonPrinter:
    """One JSON object per line: message_json of each record.

    `count` (decisions an aggregated flow record stands for) is a JSON number, not the mapping's string for 64-bit
    integers: it is the field people sum and compare, and it never comes near 2^53. `numbers` names such fields."""

    def __init__(self, out: TextIO, numbers: Iterable[str] = ("count",)) -> None:
        self._out = out
        self._numbers = tuple(numbers)

    def add(self, rec: Message) -> None:
        obj = message_json(rec, self._numbers)
        self._out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._out.flush()

    def finish(self) -> None:
        self._out.flush()


# --- commands -----------------------------------------------------------------------------------------------------


def _error(command: str, message: object) -> None:
    text = " ".join(str(message).split())  # one line
    print(f"aimesh {command}: error: {text}", file=sys.stderr)


def _generated_missing(command: str, e: ImportError) -> int:
    _error(command, f"generated protobuf code is missing ({e}); run `python -m agent.build_proto` or `make setup`")
    return EXIT_FAILURE


def build_query(opts: FlowsOptions, now_ns: int) -> collector_pb2.FlowQuery:
    from agent._gen.aimesh.v1 import collector_pb2 as cpb
    from agent._gen.aimesh.v1 import flow_pb2 as pb

    q = cpb.FlowQuery()
    for text, match in ((opts.from_, q.source), (opts.to, q.destination)):
        if text:
            match.name, match.kind, match.version = parse_identity(text)
    for group in opts.verdict or ():
        for v in group:
            q.verdicts.append(pb.Verdict.Value(f"VERDICT_{v.upper()}"))
    try:
        if opts.since:
            q.since_unix_nano = max(parse_time_ns(opts.since, now_ns), 0)
        if opts.until:
            q.until_unix_nano = max(parse_time_ns(opts.until, now_ns), 0)
    except ValueError as e:
        raise ConfigError(f"--since/--until: {e}") from None
    if opts.limit is not None:
        q.limit = opts.limit
    elif not opts.follow:
        q.limit = 20
    return q


class Printer:
    """What a listing command prints records with (TablePrinter, JsonPrinter, or a summary)."""

    def add(self, rec: Any) -> None: ...

    def finish(self) -> None: ...


# (options, stub, call metadata) -> (the response stream, what prints it)
Listing = Callable[[Any, Any, Sequence[tuple[str, str]]], tuple[Any, "Printer | TablePrinter | JsonPrinter"]]


def run_listing(command: str, options: type[FlowsOptions], args: argparse.Namespace, listing: Listing) -> int:
    """The body of a listing command (`flows`, `calls`): validate the options, open the channel, print what the
    stream sends; one-line errors, exit codes, ^C and a closed pipe handled alike."""
    try:
        import grpc

        from agent._gen.aimesh.v1 import collector_pb2_grpc
        from agent.collector.channel import ClientTls, call_metadata, open_channel, read_token
    except ImportError as e:
        return _generated_missing(command, e)
    stream = None
    channel = None
    try:
        opts = parse_options(options, args)
        token = read_token(opts.token, opts.token_file)
        tls = ClientTls(opts.tls_ca, opts.tls_cert, opts.tls_key, opts.tls_server_name) if opts.uses_tls else None
        channel = open_channel(opts.collector, tls)
        stub = collector_pb2_grpc.FlowCollectorStub(channel)
        stream, printer = listing(opts, stub, call_metadata(token))
        for rec in stream:
            printer.add(rec)
        printer.finish()
        return EXIT_OK
    except ConfigError as e:
        _error(command, e)
        return EXIT_USAGE
    except grpc.RpcError as e:
        _error(command, _rpc_message(e, args.collector))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if stream is not None:
            stream.cancel()
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `aimesh flows | head`: the reader left
        if stream is not None:
            stream.cancel()
        _silence_stdout()
        return EXIT_OK
    finally:
        if channel is not None:
            channel.close()


def run_flows(args: argparse.Namespace, out: TextIO | None = None, tz: tzinfo | None = None) -> int:
    """`aimesh flows`: print stored flows, or follow new ones."""
    stdout = out if out is not None else sys.stdout

    def listing(opts: FlowsOptions, stub: Any, metadata: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
        query = build_query(opts, time.time_ns())
        if opts.follow:
            stream = stub.Follow(query, metadata=metadata, wait_for_ready=False)
            printer: TablePrinter | JsonPrinter = (
                JsonPrinter(stdout) if opts.output == "json" else TablePrinter(stdout, tz, buffer=0)
            )
        else:
            stream = stub.ListFlows(query, metadata=metadata, timeout=opts.timeout / 1e9)
            printer = JsonPrinter(stdout) if opts.output == "json" else TablePrinter(stdout, tz)
        return stream, printer

    return run_listing("flows", FlowsOptions, args, listing)


def _rpc_message(e: Any, target: str) -> str:
    import grpc

    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the collector at {target}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the collector at {target} refused the credentials: {details} (see --token/--token-file)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the collector at {target} does not allow this: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the collector at {target} did not answer in time (see --timeout)"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_collector(args: argparse.Namespace) -> int:
    """`aimesh collector`: serve until SIGTERM/SIGINT."""
    try:
        from agent.collector.server import ServerError, ServerTls, serve
        from agent.collector.service import ServiceLimits
        from agent.collector.store import RetentionPolicy
    except ImportError as e:
        return _generated_missing("collector", e)
    try:
        opts = parse_options(CollectorOptions, args)
        tls = ServerTls(opts.tls_cert, opts.tls_key, opts.tls_ca) if opts.tls_cert and opts.tls_key else None
        mode = "plaintext" if tls is None else ("mutual TLS" if opts.tls_ca else "TLS")
        auth: list[str] = []
        _setup_logging()

        def ready(address: object) -> None:
            print(f"aimesh collector: listening on {address} ({mode}; {auth[0] if auth else '?'}), database {opts.db}",
                  file=sys.stderr, flush=True)  # fmt: skip

        serve(
            opts.listen,
            opts.db,
            retention=RetentionPolicy(max_age_ns=opts.retention_age, max_bytes=opts.retention_bytes),
            tls=tls,
            token=opts.token,
            token_file=opts.token_file,
            agent_tokens_file=opts.agent_tokens,
            no_auth=opts.no_auth,
            limits=ServiceLimits(
                max_batch_records=opts.max_batch_records,
                max_batch_bytes=opts.max_batch_bytes,
                max_followers=opts.max_followers,
                max_streams=opts.max_streams,
            ),
            max_workers=max(16, 2 * opts.max_streams),
            metrics_listen=opts.metrics,
            on_ready=ready,
            on_auth=auth.append,
        )
        return EXIT_OK
    except ConfigError as e:
        _error("collector", e)
        return EXIT_USAGE
    except ServerError as e:
        _error("collector", e)
        return EXIT_FAILURE
