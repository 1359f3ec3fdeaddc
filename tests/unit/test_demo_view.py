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
                     "batch-eval": "batch-eval"}
    servers = {s.name: expected_identity(demo.agent_config, f"/aimesh-demo-1/{s.cgroup}") for s in plan.servers}
    assert servers == {s: s for s in servers}     # llama's glob does not catch llama-next or llama-legacy


def test_the_shipped_demo_config_is_a_valid_agent_config():
    from agent.config import parse_config

    demo = split_config(yaml.safe_load((REPO / "deploy/examples/demo.yaml").read_text()))
    cfg = parse_config(yaml.safe_dump(demo.agent_config, sort_keys=False), "demo.yaml")
    assert cfg.identity("eval-corpus").mode == "audit"
    assert cfg.identity("llama-legacy").deprecated.successor == "llama-next"


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
