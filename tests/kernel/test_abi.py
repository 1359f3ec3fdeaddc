"""agent/kernel/abi.py mirrors bpf/include/abi.h exactly, and flow.proto numbers its enums the same.

In the style of Cilium's alignchecker: from the Python mirrors, generate one C translation unit of _Static_asserts
(every struct's size, every field's offset and size, every enum member, flag, limit, constant and counter slot), and
compile it against abi.h with bcc. A mismatch fails the compile; the test names the first assert that failed.
Then, parsing the header and the proto as text: every enum member and #define of abi.h has a Python mirror and back.
Each check is also fed a deliberately wrong mirror, to show it can fail.
"""
from __future__ import annotations

import ctypes as ct
import enum
import os
import re
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping

import pytest
from bcc import BPF

from agent.export.records import RecordKind
from agent.kernel import abi
from agent.kernel.source import bpf_dir

PROTO = Path(__file__).resolve().parents[2] / "proto" / "aimesh" / "v1" / "flow.proto"

# proto enum -> (prefix of its values, Python mirror); the proto's 0 is PREFIX_UNSPECIFIED, the mirror's NONE/UNSPECIFIED.
PROTO_ENUMS: dict[str, tuple[str, type[enum.IntEnum]]] = {
    "Verdict": ("VERDICT_", abi.Verdict),
    "Hook": ("HOOK_", abi.Hook),
    "Reason": ("REASON_", abi.Reason),
    "RecordKind": ("RECORD_KIND_", RecordKind),
}


@dataclass(frozen=True)
class Mirror:
    """Everything abi.py mirrors, as the checks take it (tests pass a wrong one to see them fail)."""
    structs: Mapping[str, type[ct.Structure]]
    enums: Mapping[str, tuple[str, type[enum.IntEnum]]]
    flags: Mapping[str, type[enum.IntFlag]]
    constants: Mapping[str, int]
    limits: Mapping[str, int]          # C name (MAX_CGROUPS) -> default
    unnamed_in_c: frozenset[str]


def real_mirror() -> Mirror:
    limits = abi.Limits()
    return Mirror(abi.MIRRORS, abi.ENUMS, abi.FLAGS, abi.CONSTANTS,
                  {f.name.upper(): getattr(limits, f.name) for f in fields(limits)}, abi.UNNAMED_IN_C)


# ---- the generated translation unit ----

def static_asserts(m: Mirror) -> str:
    """One _Static_assert per mirrored fact, its message naming the fact."""
    out: list[str] = []

    def check(expr: str, what: str) -> None:
        out.append(f'_Static_assert({expr}, "{what}");')

    for name, mirror in m.structs.items():
        check(f"sizeof(struct {name}) == {ct.sizeof(mirror)}", f"struct {name} size")
        for fname, _ in mirror._fields_:
            f = getattr(mirror, fname)
            check(f"__builtin_offsetof(struct {name}, {fname}) == {f.offset}", f"struct {name} field {fname} offset")
            check(f"sizeof(((struct {name} *)0)->{fname}) == {f.size}", f"struct {name} field {fname} size")
    for cname, (prefix, cls) in m.enums.items():
        for member in cls:
            if f"{cls.__name__}.{member.name}" not in m.unnamed_in_c:
                check(f"{prefix}{member.name} == {int(member)}", f"enum {cname} {prefix}{member.name}")
    for prefix, flag_cls in m.flags.items():
        for flag in flag_cls:
            check(f"{prefix}{flag.name} == {int(flag)}", f"#define {prefix}{flag.name}")
    for cname, value in {**m.constants, **m.limits}.items():
        check(f"{cname} == {value}", f"#define {cname}")
    hook_prefix, hook_cls = m.enums["aimesh_hook"]
    verdict_prefix, verdict_cls = m.enums["aimesh_verdict"]
    for hook in hook_cls:
        if hook >= abi.COUNTER_DECISION_HOOKS:   # HOOK_EGRESS: counted in COUNTER_RAW_*, no decision block
            continue
        for verdict in verdict_cls:
            check(f"COUNTER_DECISION({hook_prefix}{hook.name}, {verdict_prefix}{verdict.name}) == "
                  f"{abi.counter_decision(hook, verdict)}",
                  f"counter slot COUNTER_DECISION({hook_prefix}{hook.name}, {verdict_prefix}{verdict.name})")
    return "\n".join(out) + "\n"


# clang 14: "<file>:L:C: error: static_assert failed due to requirement '...' "<message>"" (newer: static assertion)
_ASSERT_FAILED = re.compile(r'error: static.assert(?:ion)? failed.*"([^"\n]*)"$', re.M)


def compile_failures(asserts: str) -> list[str]:
    """Compile abi.h plus the asserts with bcc; the messages of the asserts that failed, in source order."""
    text = assemble_probe(asserts)
    # bcc's clang writes its diagnostics to fd 2: catch them there.
    with tempfile.TemporaryFile(mode="w+b") as diag:
        saved = os.dup(2)
        os.dup2(diag.fileno(), 2)
        try:
            b = BPF(text=text.encode())
            b.cleanup()
            failed = False
        except Exception:   # bcc raises a bare Exception("Failed to compile BPF module ...")
            failed = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        diag.seek(0)
        log = diag.read().decode(errors="replace")
    found = _ASSERT_FAILED.findall(log)
    if failed and not found:
        raise AssertionError(f"the ABI check did not compile for another reason: {log.strip()[:2000]}")
    return found


def assert_compiles(m: Mirror) -> None:
    failures = compile_failures(static_asserts(m))
    assert not failures, f"abi.py differs from abi.h: {failures[0]} (and {len(failures) - 1} more)"


# ---- the header and the proto, as text ----

def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)


def header_mismatches(header: str, m: Mirror) -> list[str]:
    """Names that abi.h defines without a mirror in abi.py, or that abi.py mirrors without a definition in abi.h."""
    text = _strip_comments(header)
    problems: list[str] = []
    c_enums = {name: re.findall(r"^\s*(\w+)\s*=", body, re.M)
               for name, body in re.findall(r"^enum (\w+) \{(.*?)\};", text, re.M | re.S)}
    for cname in sorted(set(c_enums) - set(m.enums)):
        problems.append(f"enum {cname}: no mirror in abi.py ENUMS")
    for cname in sorted(set(m.enums) - set(c_enums)):
        problems.append(f"enum {cname}: in abi.py ENUMS, not in abi.h")
    for cname, (prefix, cls) in m.enums.items():
        members = c_enums.get(cname, [])
        for c_member in members:
            if c_member.endswith("__MAX"):
                if c_member not in m.constants:
                    problems.append(f"enum {cname} {c_member}: no mirror in abi.py CONSTANTS")
            elif not c_member.startswith(prefix) or c_member[len(prefix):] not in cls.__members__:
                problems.append(f"enum {cname} {c_member}: no mirror in abi.py {cls.__name__}")
        for member in cls:
            if f"{prefix}{member.name}" not in members and f"{cls.__name__}.{member.name}" not in m.unnamed_in_c:
                problems.append(f"abi.py {cls.__name__}.{member.name}: no {prefix}{member.name} in enum {cname}")
    # object-like #defines with a value (not the include guard, not COUNTER_DECISION(hook, verdict))
    defines = re.findall(r"^\s*#define\s+(\w+)[ \t]+\S", text, re.M)
    for name in defines:
        flag_prefix = next((p for p in m.flags if name.startswith(p)), None)
        if flag_prefix is not None:
            if name[len(flag_prefix):] not in m.flags[flag_prefix].__members__:
                problems.append(f"#define {name}: no mirror in abi.py {m.flags[flag_prefix].__name__}")
        elif name not in m.constants and name not in m.limits:
            problems.append(f"#define {name}: no mirror in abi.py (CONSTANTS or Limits)")
    enum_members = {x for members in c_enums.values() for x in members}
    for prefix, flag_cls in m.flags.items():
        for flag in flag_cls:
            if f"{prefix}{flag.name}" not in defines:
                problems.append(f"abi.py {flag_cls.__name__}.{flag.name}: no #define {prefix}{flag.name} in abi.h")
    for name in [*m.constants, *m.limits]:
        if name not in defines and name not in enum_members:
            problems.append(f"abi.py {name}: not defined in abi.h")
    c_structs = set(re.findall(r"^struct (\w+) \{", text, re.M))
    for name in sorted(c_structs ^ set(m.structs)):
        problems.append(f"struct {name}: " + ("no mirror in abi.py MIRRORS" if name in c_structs else "not in abi.h"))
    return problems


def proto_mismatches(proto: str, mirrors: Mapping[str, tuple[str, type[enum.IntEnum]]]) -> list[str]:
    """Proto enum values whose number differs from the Python mirror's, or that exist on one side only."""
    text = _strip_comments(proto)
    bodies = dict(re.findall(r"^enum (\w+) \{(.*?)\}", text, re.M | re.S))
    problems: list[str] = []
    for pname, (prefix, cls) in mirrors.items():
        if pname not in bodies:
            problems.append(f"proto enum {pname}: not in flow.proto")
            continue
        values = {}
        for vname, number in re.findall(r"^\s*(\w+)\s*=\s*(\d+)\s*;", bodies[pname], re.M):
            short = vname[len(prefix):] if vname.startswith(prefix) else vname
            values[short] = (vname, int(number))
        py = {m.name: int(m) for m in cls}
        zero = "NONE" if "NONE" in py else "UNSPECIFIED"
        if "UNSPECIFIED" in values:
            values[zero] = values.pop("UNSPECIFIED")
        for short, (vname, number) in values.items():
            if short not in py:
                problems.append(f"proto {pname}.{vname}: no mirror in {cls.__name__}")
            elif py[short] != number:
                problems.append(f"proto {pname}.{vname} = {number}, {cls.__name__}.{short} = {py[short]}")
        for short in py:
            if short not in values:
                problems.append(f"{cls.__name__}.{short}: no {prefix}{short} in proto enum {pname}")
    return problems


# ---- the checks ----

def test_mirrors_match_the_compiled_header():
    assert_compiles(real_mirror())


def test_every_header_name_has_a_mirror_and_back():
    assert header_mismatches((bpf_dir() / "include" / "abi.h").read_text(), real_mirror()) == []


def test_proto_enums_number_like_the_mirrors():
    assert proto_mismatches(PROTO.read_text(), PROTO_ENUMS) == []


def test_mirrors_match_compiled_sizes_and_field_order():
    """bcc's own view of each struct (the value type of an array map) has the mirror's size and field order."""
    probe = "".join(f"BPF_ARRAY(size_{name}, struct {name}, 1);\n" for name in sorted(abi.MIRRORS))
    b = BPF(text=assemble_probe(probe).encode())
    try:
        for name, mirror in abi.MIRRORS.items():
            leaf = b[f"size_{name}".encode()].Leaf
            assert ct.sizeof(leaf) == ct.sizeof(mirror), f"struct {name}: C {ct.sizeof(leaf)} != ctypes {ct.sizeof(mirror)}"
            c_fields = [f[0] for f in leaf._fields_ if not f[0].startswith("__pad")]
            py_fields = [f[0] for f in mirror._fields_]
            assert c_fields == py_fields, f"struct {name}: field order differs"
    finally:
        b.cleanup()


def assemble_probe(probe: str) -> str:
    return "#include <uapi/linux/bpf.h>\n" + (bpf_dir() / "include" / "abi.h").read_text() + probe


def test_the_loaded_program_uses_the_registry_map_layouts(tmp_path):
    """The maps the real program pinned (not a probe) have the type, key and value sizes, capacity and flags that
    agent/kernel/registry.py declares (and digests into their pin names)."""
    import os
    import uuid

    from agent.kernel import bpfsys, registry
    from agent.kernel.loader import load
    from agent.kernel.pins import DatapathDir, remove_tree
    limits = abi.Limits(max_policies=1024, max_endpoints=1024, max_cgroups=1024, max_processes=1024)
    d = DatapathDir(Path("/sys/fs/bpf") / f"aimesh-test-{uuid.uuid4().hex[:8]}")
    try:
        res = load(d, limits)
        assert set(res["maps"]) == {m.name for m in registry.MAPS}
        assert sorted(os.listdir(Path(res["progs"]))) == sorted([p.name for p in registry.PROGRAMS] +
                                                                list(registry.UPROBE_PROGRAMS))
        for name in registry.UPROBE_PROGRAMS:   # bpf/tls.c: uprobe programs (BPF_PROG_TYPE_KPROBE)
            fd = bpfsys.obj_get(str(Path(res["progs"]) / name))
            try:
                assert bpfsys.prog_info(fd).type == registry.KPROBE, name
            finally:
                os.close(fd)
        for spec in registry.MAPS:
            fd = bpfsys.obj_get(str(d.maps / res["maps"][spec.name]))
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            assert info.type == spec.map_type, spec.name
            assert info.max_entries == spec.capacity(limits), spec.name
            assert info.flags == spec.flags, spec.name
            if spec.key is not None:
                assert info.key_size == ct.sizeof(spec.key), spec.name
                assert info.value_size == ct.sizeof(spec.value), spec.name
    finally:
        remove_tree(d.path)


# ---- each check can fail ----

class _SwappedFlowEvent(ct.Structure):
    """flow_event with bytes_sent and bytes_received in each other's place: same size, wrong offsets."""
    _fields_ = [(n, t) for n, t in abi.FlowEvent._fields_[:3]] + [("bytes_received", ct.c_uint64),
                                                                  ("bytes_sent", ct.c_uint64)] + \
               [(n, t) for n, t in abi.FlowEvent._fields_[5:]]


class _NarrowPortKey(ct.Structure):
    """policy_key with a 1-byte proto widened to 2 bytes at the end: offsets fine up to proto, then the size."""
    _fields_ = [("src", ct.c_uint32), ("dst", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint16),
                ("gen", ct.c_uint8)]


class _WrongVerdict(enum.IntEnum):
    NONE = 0
    ALLOWED = 1
    DENIED = 6
    AUDIT = 3
    REDIRECTED = 4


class _WrongEventFlag(enum.IntFlag):
    DEPRECATED = 0x01
    LIFECYCLE = 0x08
    REDIRECTED = 0x04


class _WrongCaptureSockFlag(enum.IntFlag):
    """CAPTURE_SOCK_F_TLS where CAPTURE_SOCK_F_SKIP is: bpf/tls.c and the agent would read each other's flag."""
    TLS = 0x04
    SENT = 0x02
    SKIP = 0x01


def _with(m: Mirror, **kw) -> Mirror:
    return replace(m, **kw)


@pytest.mark.parametrize("change,first", [
    ({"structs": {"flow_event": _SwappedFlowEvent}}, "struct flow_event field bytes_received offset"),
    ({"structs": {"policy_key": _NarrowPortKey}}, "struct policy_key size"),
    ({"enums": {**abi.ENUMS, "aimesh_verdict": ("VERDICT_", _WrongVerdict)}}, "enum aimesh_verdict VERDICT_DENIED"),
    ({"flags": {**abi.FLAGS, "EV_F_": _WrongEventFlag}}, "#define EV_F_LIFECYCLE"),
    ({"flags": {**abi.FLAGS, "CAPTURE_SOCK_F_": _WrongCaptureSockFlag}}, "#define CAPTURE_SOCK_F_TLS"),
    ({"constants": {**abi.CONSTANTS, "COUNTER_FASTPATH_BYTES": 45}}, "#define COUNTER_FASTPATH_BYTES"),
    ({"limits": {**real_mirror().limits, "MAX_POLICIES": 1024}}, "#define MAX_POLICIES"),
])
def test_a_wrong_mirror_fails_the_compile_naming_it(change, first):
    wrong = _with(real_mirror(), **change)
    failures = compile_failures(static_asserts(wrong))
    assert failures and failures[0] == first, failures
    with pytest.raises(AssertionError, match=re.escape(first)):
        assert_compiles(wrong)


def test_a_wrong_decision_slot_fails_the_compile(monkeypatch):
    monkeypatch.setattr(abi, "counter_decision", lambda hook, verdict: hook * 5 + verdict)  # derived from a __MAX
    failures = compile_failures(static_asserts(real_mirror()))
    assert failures[0] == "counter slot COUNTER_DECISION(HOOK_CONNECT, VERDICT_NONE)", failures


def test_header_names_without_a_mirror_are_found():
    header = (bpf_dir() / "include" / "abi.h").read_text()
    m = real_mirror()
    extra = header.replace("#define CFG_F_FAST_PATH", "#define CFG_F_NEW_THING 0x08\n#define CFG_F_FAST_PATH") \
        .replace("\tREASON_REPLY ", "\tREASON_NEW = 10,\n\tREASON_REPLY ") \
        .replace("#define COUNTER_SLOTS ", "#define COUNTER_NEW 45\n#define COUNTER_SLOTS ")
    assert header_mismatches(extra, m) == ["enum aimesh_reason REASON_NEW: no mirror in abi.py Reason",
                                           "#define CFG_F_NEW_THING: no mirror in abi.py ConfigFlag",
                                           "#define COUNTER_NEW: no mirror in abi.py (CONSTANTS or Limits)"]
    missing = header.replace("#define ID_F_SUNSET", "#define ID_F_SUNSET_X").replace("\tHOOK_INGRESS", "\tHOOK_X")
    assert header_mismatches(missing, m) == [
        "enum aimesh_hook HOOK_X: no mirror in abi.py Hook",
        "abi.py Hook.INGRESS: no HOOK_INGRESS in enum aimesh_hook",
        "#define ID_F_SUNSET_X: no mirror in abi.py IdentityFlag",
        "abi.py IdentityFlag.SUNSET: no #define ID_F_SUNSET in abi.h"]
    assert header_mismatches(header, _with(m, constants={**m.constants, "COUNTER_GONE": 50})) == [
        "abi.py COUNTER_GONE: not defined in abi.h"]


def test_proto_numbers_that_differ_are_found():
    proto = PROTO.read_text().replace("REASON_REPLY = 9;", "REASON_REPLY = 10;").replace(
        "HOOK_EGRESS = 4;", "HOOK_EGRESS = 4;\n  HOOK_NEW = 5;")
    assert proto_mismatches(proto, PROTO_ENUMS) == ["proto Hook.HOOK_NEW: no mirror in Hook",
                                                   "proto Reason.REASON_REPLY = 10, Reason.REPLY = 9"]
