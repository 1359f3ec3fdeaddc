"""Fuzzing the config loader: whatever the file holds, load_config returns a Config that compiles and fits its maps, or
raises ConfigError with one short line. Never another exception, never a hang.

The documents are valid configs with random mutations (wrong types, huge or odd strings, unicode, newlines, duplicate
keys, aliases, nesting, extra documents, cut text, bad bytes) and raw bytes or text. The default run tries 1000; the
long run (20000, `AIMESH_FUZZ=1 pytest -m fuzz tests/unit/test_config_fuzz.py`) is skipped unless AIMESH_FUZZ=1.
"""
from __future__ import annotations

import os
import signal
import string
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config, ConfigError, limits_of, load_config
from agent.policy.capacity import check_capacity
from agent.policy.compile import compile_image
from agent.policy.identities import IdentityNumbering

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
PER_EXAMPLE_S = 10   # far above any real load; only a hang gets near it
LONG_EXAMPLES = int(os.environ.get("AIMESH_FUZZ_EXAMPLES", "20000"))

NAME = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,10}\Z").filter(lambda n: n not in ("unmanaged", "world"))
KINDS = st.sampled_from(["model", "dataset", "service", "external"])
VERSION = st.text(alphabet=string.ascii_letters + string.digits + ".-+", min_size=1, max_size=12)
GLOB = st.text(alphabet=string.ascii_lowercase + "*?/-", max_size=12).map(lambda s: "/" + s)
PORT = st.integers(1, 65535)
ODD_CHARS = "\n\r\t\x00\x07\x1b\x85\u2028\u2029\ufeff\u200b\uff10\uff18\u0660\U0001f600\"'\\:#&*!|>%@`{}[],-?"

HOSTILE: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.integers(-2, 70000),
    st.floats(), st.sampled_from([3.10, 1e308, -0.0, float("inf")]),
    st.text(max_size=40), st.text(alphabet=ODD_CHARS + "ab09", max_size=40),
    st.integers(60, 20_000).map(lambda n: "x" * n),
    st.sampled_from(["\uff18\uff10", "\u0668\u0660", "10.0.0.1:\uff18\uff10", "[::1]", "::1:80", "10.0.0.0/33:80",
                     "10.0.0.1:0", "10.0.0.1:99999", "[fe80::1%eth0]:80", "host:4317", "[::1]:4317", "a\n",
                     "2026-13-45",
                     "2026-02-30T00:00:00Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "unmanaged",
                     "world", "", " ", "\n"]),
    st.datetimes(timezones=st.just(timezone.utc)),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(1, 200).map(lambda d: _nest(d)),
)


def _nest(depth: int) -> Any:
    v: Any = "x"
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


@st.composite
def valid_config(draw) -> dict:
    names = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    identities = []
    for i, name in enumerate(names):
        ident: dict[str, Any] = {"name": name, "kind": draw(KINDS)}
        if draw(st.booleans()):
            ident["version"] = draw(VERSION)
        if draw(st.booleans()):
            ident["mode"] = draw(st.sampled_from(["enforce", "audit"]))
        if draw(st.booleans()):
            ident["select"] = {"cgroups": draw(st.lists(GLOB, max_size=2))}
        if draw(st.booleans()):
            ident["endpoints"] = [f"10.{i}.{j}.0/24:{p}" for j, p in enumerate(draw(st.lists(PORT, max_size=3)))]
        later = names[i + 1:]
        if later and draw(st.booleans()):   # successors only point forward: no cycles
            ident["deprecated"] = {"sunset": draw(st.sampled_from(["2020-01-01T00:00:00Z", "2099-01-01T00:00:00Z"])),
                                   "successor": draw(st.sampled_from(later))}
        identities.append(ident)
    refs = names + ["world", "unmanaged"]
    policies = [{"from": draw(st.lists(st.sampled_from(refs), min_size=1, max_size=3)),
                 "to": draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)),
                 "ports": draw(st.lists(PORT, max_size=3)),
                 "protocol": draw(st.sampled_from(["tcp", "udp", "any"]))}
                for _ in range(draw(st.integers(0, 4)))]
    redirects, keys = [], set()
    for _ in range(draw(st.integers(0, 3))):
        to = draw(st.sampled_from(names))
        srcs = [s for s in draw(st.lists(st.sampled_from(refs), max_size=2, unique=True)) if (s, to) not in keys]
        if (None, to) in keys and not srcs:
            continue
        keys.update((s, to) for s in srcs or [None])
        backends = [{"address": f"127.0.0.1:{p}", "weight": draw(st.integers(1, 100))}
                    for p in draw(st.lists(PORT, min_size=1, max_size=4))]
        redirects.append({"from": srcs, "to": to, "backends": backends})
    doc: dict[str, Any] = {"mode": draw(st.sampled_from(["enforce", "audit"])), "identities": identities,
                           "policies": policies, "redirects": redirects}
    if draw(st.booleans()):
        doc["collector"] = {"address": draw(st.sampled_from(["collector:4317", "[::1]:4317", "10.0.0.1:1"])),
                            "batch_size": draw(st.integers(1, 100_000))}
    if draw(st.booleans()):   # room for two generations, as the loader demands
        entries = sum(len(p["from"]) * len(p["to"]) * max(1, len(p["ports"])) * 2 for p in policies)
        doc["limits"] = {"max_policies": draw(st.integers(max(1, 2 * entries), 4096)),
                         "max_identities": draw(st.integers(2 * (len(names) + 2), 64))}
    return doc


def _slots(doc: Any, out: list) -> list:
    """Every (container, key) whose value a mutation can replace or drop."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            _slots(v, out)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            _slots(v, out)
    return out


def _dump(doc: Any, unicode: bool) -> str:
    try:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=unicode, width=80)
    except (yaml.YAMLError, ValueError, RecursionError):
        return "mode: enforce\n"


TEXT_EDITS = st.sampled_from(["dup_line", "anchor", "alias", "second_doc", "insert", "truncate", "tab", "comment_only",
                              "deep", "tag", "merge", "key_int"])


@st.composite
def edited_text(draw, text: str) -> str:
    lines = text.splitlines(keepends=True) or ["\n"]
    edit = draw(TEXT_EDITS)
    at = draw(st.integers(0, len(lines) - 1))
    pos = draw(st.integers(0, len(text)))
    if edit == "dup_line":
        lines.insert(at, lines[at])
    elif edit == "anchor":
        lines[at] = lines[at].replace(": ", ": &a ", 1)
    elif edit == "alias":
        lines.insert(0, "x: &a [1, 2]\n")
        lines[at] = lines[at].replace(": ", ": *a #", 1)
    elif edit == "second_doc":
        lines.append("\n---\nmode: audit\n")
    elif edit == "insert":
        return text[:pos] + draw(st.text(alphabet=ODD_CHARS, min_size=1, max_size=4)) + text[pos:]
    elif edit == "truncate":
        return text[:pos]
    elif edit == "tab":
        lines[at] = "\t" + lines[at]
    elif edit == "comment_only":
        return "# " + text.replace("\n", "\n# ")
    elif edit == "deep":
        return "mode: " + "[" * draw(st.integers(60, 5000))
    elif edit == "tag":
        lines[at] = lines[at].replace(": ", ": !!binary ", 1)
    elif edit == "merge":
        lines.insert(at, "<<: {mode: audit}\n")
    elif edit == "key_int":
        lines.insert(at, "123: x\n")
    return "".join(lines)


@st.composite
def config_bytes(draw) -> bytes:
    """A config file's bytes: mostly mutated valid configs, some raw text and bytes."""
    kind = draw(st.sampled_from(["valid", "value", "value", "text", "text", "raw_text", "raw_bytes", "bytes_edit"]))
    if kind == "raw_bytes":
        return draw(st.binary(max_size=500))
    if kind == "raw_text":
        return draw(st.text(max_size=500)).encode("utf-8", "surrogatepass")
    doc = draw(valid_config())
    if kind == "value":
        for _ in range(draw(st.integers(1, 3))):
            slots = _slots(doc, [])
            container, key = draw(st.sampled_from(slots))
            if draw(st.integers(0, 5)) == 0:
                del container[key]
            else:
                container[key] = draw(HOSTILE)
    text = _dump(doc, draw(st.booleans()))
    if kind == "text":
        text = draw(edited_text(text))
    data = text.encode("utf-8", "surrogatepass")
    if kind == "bytes_edit" and data:
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=3)) + data[pos + 1:]
    return data


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(*_):
        raise TimeoutError(f"load_config took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_one(path: Path, data: bytes) -> None:
    """The property: a usable Config, or ConfigError with one short line; nothing else."""
    path.write_bytes(data)
    with time_limit(PER_EXAMPLE_S):
        try:
            cfg = load_config(path, now=NOW)
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith(f"{path}: "), msg
            assert "\n" not in msg and "\r" not in msg and len(msg) < 500, msg
            assert len(msg.splitlines()) == 1, msg
            assert "cannot parse:" not in msg, f"an exception slipped past the loader's checks: {msg}"
            return
    assert isinstance(cfg, Config)
    image = compile_image(cfg, IdentityNumbering(), 1, NOW)
    check_capacity(image, limits_of(cfg))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example, HealthCheck.filter_too_much])


@settings(max_examples=1000, **FUZZ_SETTINGS)
@given(data=config_bytes())
def test_loader_never_lets_a_bad_file_through(fuzz_dir: Path, data: bytes) -> None:
    check_one(fuzz_dir / "cfg.yaml", data)


@pytest.mark.fuzz
@pytest.mark.skipif(os.environ.get("AIMESH_FUZZ") != "1", reason="long fuzz run: set AIMESH_FUZZ=1")
@settings(max_examples=LONG_EXAMPLES, **FUZZ_SETTINGS)
@given(data=config_bytes())
def test_loader_long_fuzz(fuzz_dir: Path, data: bytes) -> None:
    check_one(fuzz_dir / "cfg.yaml", data)


def test_the_strategy_reaches_both_outcomes(fuzz_dir: Path) -> None:
    """The generator is worth running only if it makes loadable configs as well as broken ones."""
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=200, **FUZZ_SETTINGS)
    @given(doc=valid_config(), unicode=st.booleans())
    def run(doc: dict, unicode: bool) -> None:
        path = fuzz_dir / "valid.yaml"
        path.write_text(_dump(doc, unicode))
        load_config(path, now=NOW)   # an unmutated valid config must load
        outcomes["ok"] += 1

    run()
    assert outcomes["ok"] > 0
    with pytest.raises(ConfigError):
        check_path = fuzz_dir / "broken.yaml"
        check_path.write_text("mode: [")
        load_config(check_path)
