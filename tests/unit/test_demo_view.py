"""The demo's pure parts: flow-log parsing, counting, rendering, the demo config split, cgroup2 mount detection."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.demo import view
from agent.demo.cgroups import find_cgroup2_mount, relative_path
from agent.demo.plan import DemoConfigError, expected_identity, split_config
from agent.demo.procs import FileTail, split_lines

REPO = Path(__file__).resolve().parents[2]


def decision(verdict: str = "allowed", *, src: str = "chat-frontend", dst: str = "llama", dst_version: str | None = "3.1-8b",
             port: int = 18001, actual: tuple[str, str | None, int] | None = None, reason: str = "policy",
             deprecated: bool = False, lifecycle: bool = False, time: str = "2026-11-27T15:00:00.123456Z") -> dict:
    a_name, a_version, a_port = actual or (dst, dst_version, port)
    return {
        "time": time, "verdict": verdict, "hook": "connect", "reason": reason, "protocol": "tcp", "family": "ipv4",
        "source": {"name": src, "kind": "service", "version": None, "pid": 123, "comm": "python3", "cgroup_id": 456,
                   "address": None, "port": None},
        "destination": {"name": dst, "kind": "model", "version": dst_version, "address": "127.0.0.1", "port": port},
        "actual": {"name": a_name, "kind": "model", "version": a_version, "address": "127.0.0.1", "port": a_port},
        "deprecated": deprecated, "lifecycle_redirect": lifecycle, "rule": 0, "cookie": 99,
    }


def line(**kw) -> str:
    return json.dumps(decision(**kw))


# ---- parsing ---------------------------------------------------------------------------------------------------

def test_parse_the_documented_shape():
    r = view.parse_flow_line(line(verdict="redirected", actual=("llama-next", "4.0", 18002)))
    assert r.verdict == "redirected" and r.hook == "connect" and r.reason == "policy" and r.protocol == "tcp"
    assert r.source == view.Endpoint(name="chat-frontend", kind="service", pid=123, comm="python3")
    assert (r.destination.name, r.destination.version, r.destination.port) == ("llama", "3.1-8b", 18001)
    assert (r.actual.name, r.actual.version, r.actual.port) == ("llama-next", "4.0", 18002)
    assert r.landed_elsewhere and r.rule == 0 and r.cookie == 99 and r.family == "ipv4"


def test_parse_without_actual_means_the_destination():
    obj = decision()
    del obj["actual"]
    r = view.parse_flow_line(json.dumps(obj))
    assert r.actual == r.destination and not r.landed_elsewhere


@pytest.mark.parametrize("text, field", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({**decision(), "verdict": 3}), "verdict"),
    (json.dumps({**decision(), "source": None}), "source"),
    (json.dumps({**decision(), "destination": {"name": ""}}), "destination.name"),
    (json.dumps({**decision(), "destination": {**decision()["destination"], "port": "x"}}), "destination.port"),
])
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(ValueError, match=field):
        view.parse_flow_line(text)


def test_table_counts_bad_lines_instead_of_raising():
    t = view.FlowTable()
    assert t.add_line("garbage") is None
    assert t.add_line("   ") is None
    assert t.add_line(line()) is not None
    assert (t.bad_lines, t.total) == (1, 1) and "not JSON" in t.last_error


# ---- labels and counting ---------------------------------------------------------------------------------------

def test_labels():
    assert view.identity_label(view.Endpoint("llama", version="3.1-8b")) == "llama@3.1-8b"
    assert view.identity_label(view.Endpoint("unmanaged")) == "unmanaged"
    assert view.address_label(view.Endpoint("x", address="::1", port=80)) == "[::1]:80"
    assert view.address_label(view.Endpoint("x", address="127.0.0.1", port=80)) == "127.0.0.1:80"
    assert view.address_label(view.Endpoint("x")) == ""
    assert view.clock_label("2026-11-27T15:00:00.123456Z") == "15:00:00.123"
    assert view.clock_label("whenever") == "whenever"


def test_counts_per_flow_and_verdict_and_landing():
    records = [view.parse_flow_line(x) for x in (
        line(verdict="redirected"),
        line(verdict="redirected"),
        line(verdict="redirected", actual=("llama-next", "4.0", 18002)),
        line(verdict="denied", src="unmanaged", reason="no_policy_dst"),
        line(verdict="denied", src="unmanaged", reason="no_policy_dst"),
        line(verdict="audit", src="batch-eval", dst="eval-corpus", dst_version="2026-10", port=18004,
             reason="no_policy_dst"),
        line(verdict="allowed", src="legacy-app", dst="llama-legacy", dst_version="2.0", port=18003, deprecated=True),
    )]
    t = view.tally(records, recent_size=3)
    assert t.totals == {"redirected": 3, "denied": 2, "audit": 1, "allowed": 1} and t.total == 7
    assert len(t.recent) == 3 and t.recent[-1].source.name == "legacy-app"
    counts = {k: s.count for k, s in t.flows.items()}
    assert counts[view.FlowKey("chat-frontend", "llama@3.1-8b", "redirected", "llama@3.1-8b :18001")] == 2
    assert counts[view.FlowKey("chat-frontend", "llama@3.1-8b", "redirected", "llama-next@4.0 :18002")] == 1
    assert counts[view.FlowKey("unmanaged", "llama@3.1-8b", "denied")] == 2
    notes = {k.source: s.note for k, s in t.flows.items()}
    assert notes["legacy-app"] == "deprecated"
    assert notes["batch-eval"] == "no_policy_dst, would deny"
    assert notes["unmanaged"] == "no_policy_dst"
    assert view.verdict_summary(t.totals) == "allowed=1 denied=2 audit=1 redirected=3"


def test_lifecycle_redirect_is_its_own_row_and_noted():
    r = view.parse_flow_line(line(verdict="redirected", dst="llama-legacy", dst_version="2.0", port=18003,
                                  actual=("llama-next", "4.0", 18002), deprecated=True, lifecycle=True))
    key = view.flow_key(r)
    assert key.landed == "llama-next@4.0 :18002"
    assert view.note_label(r) == "deprecated, sunset -> successor"


# ---- rendering -------------------------------------------------------------------------------------------------

def sample_frame(n: int = 5) -> view.Frame:
    t = view.FlowTable(recent_size=20)
    for i in range(n):
        t.add_line(line(verdict="redirected", actual=("llama-next", "4.0", 18002) if i % 2 else None))
    t.add_line(line(verdict="denied", src="unmanaged", reason="no_policy_dst"))
    workloads = [
        view.WorkloadStatus("chat-frontend", "client", "chat", "chat-frontend", 4242, "running",
                            "#3 200 answered by llama-next-4.0 (2 ms)"),
        view.WorkloadStatus("rogue-scraper", "client", "rogue", "unmanaged", 4243, "exited 1",
                            "#2 connect 127.0.0.1:18001 failed: EPERM Operation not permitted"),
    ]
    return view.Frame(title="aimesh demo", subtitle="mode enforce", elapsed_s=75, table=t, workloads=workloads)


def test_render_plain_has_everything_and_no_escapes():
    lines = view.render_frame(sample_frame(), width=200, height=60, color=False)
    text = "\n".join(lines)
    assert "\x1b" not in text
    assert "up 01:15" in lines[0]
    assert "decisions 6" in text
    assert "chat-frontend -> llama@3.1-8b" in text
    assert "=> llama-next@4.0 :18002" in text
    assert "unmanaged" in text and "denied" in text and "no_policy_dst" in text
    assert "EPERM Operation not permitted" in text
    assert "RECENT DECISIONS" in text and "15:00:00.123" in text
    rows = [x for x in lines if x.startswith("chat-frontend ->")]
    assert [x.split()[3] for x in rows] == ["redirected", "redirected"]   # two landings, two rows


def test_render_colors_verdicts_and_keeps_columns_aligned():
    colored = view.render_frame(sample_frame(), width=200, height=60, color=True)
    plain = view.render_frame(sample_frame(), width=200, height=60, color=False)
    assert any("\x1b[1;31mdenied\x1b[0m" in x for x in colored)
    assert any("\x1b[36mredirected\x1b[0m" in x for x in colored)
    assert [view._ANSI_RE.sub("", x) for x in colored] == plain


def test_render_fits_width_and_height():
    lines = view.render_frame(sample_frame(40), width=50, height=20, color=True)
    assert len(lines) <= 20
    assert all(view.visible_len(x) <= 50 for x in lines)
    assert any("RECENT DECISIONS" in x for x in lines)


def test_render_with_no_decisions():
    f = view.Frame(title="t", subtitle="s", elapsed_s=0, table=view.FlowTable(), workloads=[], message="waiting")
    text = "\n".join(view.render_frame(f, color=False))
    assert "(no decisions yet)" in text and "waiting" in text and "(none yet)" in text


def test_clip_keeps_escapes_whole_and_closes_color():
    s = "\x1b[31m" + "x" * 20 + "\x1b[0m"
    out = view.clip(s, 5)
    assert view.visible_len(out) == 5 and out.startswith("\x1b[31m") and out.endswith("~\x1b[0m")
    assert view.clip("short", 10) == "short"
    assert view.clip("anything", 0) == ""


def test_frame_text_repaints_from_home():
    first = view.frame_text(["a", "b"], first=True)
    again = view.frame_text(["a", "b"], first=False)
    assert first.startswith("\x1b[2J\x1b[H") and again.startswith("\x1b[H") and "\x1b[2J" not in again
    assert again == "\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J"


def test_decision_line_plain():
    r = view.parse_flow_line(line(verdict="redirected", actual=("llama-next", "4.0", 18002)))
    text = view.decision_line(r, color=False)
    assert text.startswith("15:00:00.123 redirected chat-frontend[123] -> llama@3.1-8b 127.0.0.1:18001")
    assert "=> llama-next@4.0 :18002" in text and text.endswith("connect/tcp")


def test_landed_label_shows_the_address_only_when_it_changed():
    obj = decision(verdict="redirected", actual=("llama-next", "4.0", 18002))
    obj["actual"]["address"] = "10.0.0.7"
    assert view.landed_label(view.parse_flow_line(json.dumps(obj))) == "llama-next@4.0 10.0.0.7:18002"
    r = view.parse_flow_line(line(verdict="redirected", actual=("llama-next", "4.0", 18002)))
    assert view.landed_label(r) == "llama-next@4.0 :18002"


def test_strip_log_prefix():
    assert view.strip_log_prefix("2026-11-27 15:05:08,159 INFO aimesh.agent: ready") == "INFO aimesh.agent: ready"
    assert view.strip_log_prefix("#3 200 answered by llama") == "#3 200 answered by llama"


# ---- demo config, cgroups, line splitting ----------------------------------------------------------------------

def test_the_shipped_demo_config_splits_and_shows_all_four_verdicts():
    doc = yaml.safe_load((REPO / "deploy/examples/demo.yaml").read_text())
    demo = split_config(doc)
    assert "demo" not in demo.agent_config and demo.agent_config["mode"] == "enforce"
    plan = demo.plan
    assert {c.name for c in plan.clients} >= {"chat-frontend", "rogue-scraper", "legacy-app", "batch-eval"}
    assert all(18000 <= s.port <= 18010 for s in plan.servers)
    ident = {c.name: expected_identity(demo.agent_config, f"/aimesh-demo-4242/{c.cgroup}") for c in plan.clients}
    assert ident == {"chat-frontend": "chat-frontend", "rogue-scraper": "unmanaged", "legacy-app": "legacy-app",
                     "batch-eval": "batch-eval", "support-bot": "support-bot"}
    servers = {s.name: expected_identity(demo.agent_config, f"/aimesh-demo-1/{s.cgroup}") for s in plan.servers}
    assert servers == {s: s for s in servers}     # llama's glob does not catch llama-next or llama-legacy


def test_the_shipped_demo_config_is_a_valid_agent_config():
    from agent.config import parse_config

    demo = split_config(yaml.safe_load((REPO / "deploy/examples/demo.yaml").read_text()))
    cfg = parse_config(yaml.safe_dump(demo.agent_config, sort_keys=False), "demo.yaml")
    assert cfg.identity("eval-corpus").mode == "audit"
    assert cfg.identity("llama-legacy").deprecated.successor == "llama-next"
    models = [i for i in cfg.identities if i.kind == "model"]
    assert models and all(i.llm is not None and i.llm.protocol == "auto" for i in models)   # said, not defaulted
    assert not cfg.identity("eval-corpus").llm_capture.enabled
    tls = [s for s in demo.plan.servers if s.tls]
    assert [s.name for s in tls] == ["gpt-oss"]                         # one endpoint over TLS
    assert any(c.target == "gpt-oss" for c in demo.plan.clients)
    assert any(c.error_every for c in demo.plan.clients if not demo.plan.server(c.target).tls)   # errors in plaintext


@pytest.mark.parametrize("demo_section, message", [
    ({"servers": []}, "demo.servers"),
    ({"servers": [{"name": "a", "version": "1", "port": 18001, "cgroup": "a"}],
      "clients": [{"name": "c", "target": "nope", "cgroup": "c"}]}, "clients.0.target"),
    ({"servers": [{"name": "a", "version": "1", "port": 18001, "cgroup": "a"}],
      "clients": [{"name": "c", "target": "a", "cgroup": "c", "interval": 0.01}]}, "demo.clients.0.interval"),
    ({"servers": [{"name": "a", "version": "1", "port": 18001, "cgroup": "a"},
                  {"name": "b", "version": "1", "port": 18001, "cgroup": "b"}]}, "ports must be unique"),
    ({"servers": [{"name": "a", "version": "1", "port": 18001, "cgroup": "../x"}]}, "demo.servers.0.cgroup"),
    ({"servers": [{"name": "a", "version": "1", "port": 18001, "cgroup": "a", "extra": 1}]}, "demo.servers.0.extra"),
])
def test_demo_section_errors_name_the_field(demo_section, message):
    with pytest.raises(DemoConfigError, match=message.replace(".", r"\.")):
        split_config({"mode": "enforce", "demo": demo_section})


def test_demo_section_is_required():
    with pytest.raises(DemoConfigError, match="demo: missing"):
        split_config({"mode": "enforce"})
    with pytest.raises(DemoConfigError, match="mapping"):
        split_config(["x"])


def test_find_cgroup2_mount():
    hybrid = (
        "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"
    )
    assert find_cgroup2_mount(hybrid) == "/sys/fs/cgroup/unified"
    assert find_cgroup2_mount("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n") == "/sys/fs/cgroup"
    assert find_cgroup2_mount("none /my\\040cgroups cgroup2 rw 0 0\n") == "/my cgroups"
    assert find_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n") is None
    assert relative_path(Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/aimesh-demo-7/chat")) == "/aimesh-demo-7/chat"
    assert relative_path(Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup")) == "/"


def test_split_lines_keeps_the_unfinished_rest():
    assert split_lines(b"", b"a\nb\r\nc") == (["a", "b"], b"c")
    assert split_lines(b"c", b"d\n") == (["cd"], b"")
    assert split_lines(b"", b"\xff\n") == (["\ufffd"], b"")


def test_file_tail_follows_appends_and_truncation(tmp_path):
    p = tmp_path / "flows.jsonl"
    tail = FileTail(p)
    assert tail.read_lines() == []                 # not there yet
    p.write_text("old\n")
    tail.skip_existing()
    with p.open("a") as f:
        f.write("one\ntw")
    assert tail.read_lines() == ["one"]
    with p.open("a") as f:
        f.write("o\n")
    assert tail.read_lines() == ["two"]
    p.write_text("new\n")                          # truncated and rewritten
    assert tail.read_lines() == ["new"]


# ---- model calls -----------------------------------------------------------------------------------------------

def call(src: str = "chat-frontend", req: str | None = "llama-3.1-8b", served: str | None = "llama-3.1-8b",
         status: int | None = 200, cookie: int = 1, seq: int = 0, duration_ms: float | None = 10,
         ttfc_ms: float | None = 2, tokens: tuple[int, int] | None = (19, 7), **extra) -> dict:
    """A line of `aimesh calls -o json` (proto3 JSON mapping: 64-bit ids as strings, the counts as numbers)."""
    obj: dict = {"agent_id": "demo", "cookie": str(cookie), "start_time_unix_nano": "1764590000000000000",
                 "source": {"name": src, "kind": "service"},
                 "destination": {"name": "llama", "kind": "model", "version": "3.1-8b"},
                 "protocol": "openai", "operation": "chat", **extra}
    if seq:
        obj["sequence"] = str(seq)
    for key, value in (("request_model", req), ("response_model", served), ("status", status)):
        if value is not None:
            obj[key] = value
    if tokens is not None:
        obj["input_tokens"], obj["output_tokens"] = tokens
    if duration_ms is not None:
        obj["duration_ns"] = int(duration_ms * 1e6)
    if ttfc_ms is not None:
        obj["time_to_first_chunk_ns"] = int(ttfc_ms * 1e6)
    return obj


def test_parse_a_call_line():
    r = view.parse_call_line(json.dumps(call(served="llama-next-4.0", stream=True, tls=True, confidence_mean=0.8,
                                             actual_destination={"name": "llama-next", "version": "4.0"})))
    assert (r.source, r.destination, r.reached) == ("chat-frontend", "llama@3.1-8b", "llama-next@4.0")
    assert (r.request_model, r.response_model, r.status, r.input_tokens, r.output_tokens) == \
        ("llama-3.1-8b", "llama-next-4.0", 200, 19, 7)
    assert (r.duration_ns, r.ttfc_ns, r.stream, r.tls, r.confidence) == (10_000_000, 2_000_000, True, True, 0.8)
    assert r.key == ("demo", "1", "0") and r.time_ns == 1764590000000000000 and not r.is_error
    no_actual = view.parse_call_line(json.dumps(call()))
    assert no_actual.reached == no_actual.destination


@pytest.mark.parametrize("obj, field", [
    ({"source": {"name": "a"}, "status": "x"}, "status"),
    ({"source": {"name": "a"}, "status": 200, "input_tokens": -1}, "input_tokens"),
    ({"source": {"name": "a"}, "request_model": 3}, "request_model"),
    ({"source": "a", "status": 200}, "source"),
    ({"verdict": "allowed"}, "source"),
    ([1], "JSON object"),
])
def test_call_parse_errors_name_the_field(obj, field):
    with pytest.raises(ValueError, match=field):
        view.call_from_json(obj)


def test_is_error():
    assert view.call_from_json(call(status=404, served=None, error_type="not_found_error")).is_error
    assert view.call_from_json(call(status=None, served=None)).is_error          # no response at all
    assert view.call_from_json(call(status=200, error_type="overloaded")).is_error
    assert not view.call_from_json(call(status=200)).is_error


def test_call_table_is_a_pure_function_of_the_records():
    records = [view.call_from_json(c) for c in (
        call(cookie=1, duration_ms=10, ttfc_ms=2),
        call(cookie=2, duration_ms=30, ttfc_ms=6),
        call(cookie=3, duration_ms=20, ttfc_ms=None, tokens=None),       # a cut stream: no usage, no first chunk
        call(cookie=4, served="llama-next-4.0", duration_ms=40, ttfc_ms=8, tokens=(19, 9)),  # the canary answered
        call(cookie=5, req="error-404", served=None, status=404, error_type="not_found_error", tokens=None,
             duration_ms=1, ttfc_ms=1),
        call(src="support-bot", req="gpt-oss-20b", served="gpt-oss-20b", cookie=6, tls=True),
    )]
    t = view.tally_calls(records)
    assert t.total == 6 and t.errors == 1
    by_key = {(k.source, k.requested, k.served): s for k, s in t.stats.items()}
    plain = by_key[("chat-frontend", "llama-3.1-8b", "llama-3.1-8b")]
    assert (plain.calls, plain.errors, plain.input_tokens, plain.output_tokens) == (3, 0, 38, 14)
    assert plain.p50_duration_ns == 20_000_000 and plain.p50_ttfc_ns == 2_000_000      # nearest rank of [2, 6]
    assert by_key[("chat-frontend", "llama-3.1-8b", "llama-next-4.0")].output_tokens == 9
    assert by_key[("chat-frontend", "error-404", "-")].errors == 1
    assert by_key[("support-bot", "gpt-oss-20b", "gpt-oss-20b")].tls == 1
    assert view.tally_calls(records + records[:2]).total == 6          # a call listed again counts once
    assert view.call_rows(view.tally_calls(list(reversed(records))), False) == view.call_rows(t, False)   # any order


def test_median():
    assert view.median([]) is None
    assert view.median([5]) == 5 and view.median([3, 1, 2]) == 2 and view.median([4, 1, 3, 2]) == 2


def test_call_rows_render_source_models_counts_latency_errors():
    t = view.tally_calls([view.call_from_json(call(cookie=1)),
                          view.call_from_json(call(cookie=2, served="llama-next-4.0", duration_ms=40)),
                          view.call_from_json(call(cookie=3, req="error-404", served=None, status=404,
                                                   tokens=None, ttfc_ms=None, duration_ms=1))])
    lines = view.call_rows(t, color=False)
    assert lines[0].split() == ["SOURCE", "REQUESTED", "SERVED", "CALLS", "TOKENS", "IN/OUT", "P50", "LATENCY",
                                "P50", "TTFC", "ERRORS"]
    rows = [x.split() for x in lines[1:]]
    assert rows == [
        ["chat-frontend", "->", "error-404", "-", "1", "0/0", "1ms", "-", "1"],
        ["chat-frontend", "->", "llama-3.1-8b", "llama-3.1-8b", "1", "19/7", "10ms", "2ms", "0"],
        ["chat-frontend", "->", "llama-3.1-8b", "llama-next-4.0", "1", "19/7", "40ms", "2ms", "0"],
    ]
    widths = {len(x) for x in lines}
    assert len(widths) == 1                           # aligned columns
    colored = view.call_rows(t, color=True)
    assert [view._ANSI_RE.sub("", x) for x in colored] == lines and "\x1b[1;31m" in colored[1]
    assert view.call_rows(view.CallTable(), color=False)[1] == "(no model calls yet)"


def test_call_table_counts_bad_lines_and_skips_duplicates():
    t = view.CallTable()
    assert t.add_line(json.dumps(call())) is not None
    assert t.add_line(json.dumps(call())) is None                      # the same call again
    assert t.add_line("aimesh calls: error: collector 127.0.0.1:4790 unavailable") is None
    assert t.add_line("") is None
    assert t.total == 1 and t.bad_lines == 1 and "unavailable" in t.last_error


def test_call_line_plain():
    r = view.call_from_json(call(served="llama-next-4.0", stream=True,
                                 actual_destination={"name": "llama-next", "version": "4.0"}))
    assert view.call_line(r) == ("model call chat-frontend -> llama@3.1-8b => llama-next@4.0 llama-3.1-8b => "
                                 "llama-next-4.0 200 tokens 19/7 ttfc 2ms took 10ms stream")


def test_render_frame_has_the_model_calls_table():
    t = view.tally_calls([view.call_from_json(call(cookie=1)), view.call_from_json(call(cookie=2, status=500,
                                                                                         served=None))])
    f = view.Frame(title="t", subtitle="s", elapsed_s=0, table=view.FlowTable(), workloads=[], calls=t)
    text = "\n".join(view.render_frame(f, width=200, height=60, color=False))
    assert "MODEL CALLS 2 (errors 1), from the collector" in text
    assert "chat-frontend -> llama-3.1-8b  llama-3.1-8b" in text
    empty = view.Frame(title="t", subtitle="s", elapsed_s=0, table=view.FlowTable(), workloads=[])
    assert "(no model calls yet)" in "\n".join(view.render_frame(empty, color=False))
