"""The proto contract: enum numbers mirror bpf/include/abi.h; build_proto generates importable code, idempotently."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.unit.collector_testlib import REPO, tmp_dir  # noqa: F401  (tmp_dir: a fixture)
from agent import build_proto
from agent._gen.aimesh.v1 import flow_pb2


def c_enum(text: str, name: str) -> dict[str, int]:
    body = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, re.S)
    assert body is not None, f"enum {name} not in abi.h"
    values = {}
    for m in re.finditer(r"^\s*([A-Z_0-9]+)\s*=\s*(\d+)\s*,", body.group(1), re.M):
        values[m.group(1)] = int(m.group(2))
    return values


@pytest.mark.parametrize(
    ("c_name", "proto_enum", "prefix"),
    [("aimesh_verdict", flow_pb2.Verdict, "VERDICT_"), ("aimesh_hook", flow_pb2.Hook, "HOOK_"),
     ("aimesh_reason", flow_pb2.Reason, "REASON_")],  # fmt: skip
)
def test_enums_mirror_the_c_header(c_name: str, proto_enum: object, prefix: str) -> None:
    header = (REPO / "bpf" / "include" / "abi.h").read_text()
    c_values = {k: v for k, v in c_enum(header, c_name).items() if not k.endswith("__MAX")}
    proto_values = {
        name.replace("_UNSPECIFIED", "_NONE"): number
        for name, number in proto_enum.items()  # type: ignore[attr-defined]
    }
    assert proto_values == c_values


def test_enum_numbers_are_the_documented_ones() -> None:
    assert dict(flow_pb2.Verdict.items()) == {
        "VERDICT_UNSPECIFIED": 0, "VERDICT_ALLOWED": 1, "VERDICT_DENIED": 2, "VERDICT_AUDIT": 3,
        "VERDICT_REDIRECTED": 4,
    }  # fmt: skip
    assert dict(flow_pb2.Hook.items()) == {
        "HOOK_UNSPECIFIED": 0, "HOOK_CONNECT": 1, "HOOK_SENDMSG": 2, "HOOK_INGRESS": 3, "HOOK_EGRESS": 4,
    }  # fmt: skip
    assert [v for _, v in flow_pb2.Reason.items()] == list(range(11))
    assert dict(flow_pb2.Protocol.items()) == {"PROTOCOL_UNSPECIFIED": 0, "PROTOCOL_TCP": 6, "PROTOCOL_UDP": 17}


def test_rewrite_imports_touches_only_generated_packages() -> None:
    src = (
        "import grpc\n"
        "from google.protobuf import descriptor as _descriptor\n"
        "from aimesh.v1 import flow_pb2 as aimesh_dot_v1_dot_flow__pb2\n"
        "from grpc.health.v1 import health_pb2 as h\n"
        "from aimesh.v1alpha import x\n"
    )
    out = build_proto.rewrite_imports(src, {"aimesh.v1", "grpc.health.v1"})
    assert out == (
        "import grpc\n"
        "from google.protobuf import descriptor as _descriptor\n"
        "from agent._gen.aimesh.v1 import flow_pb2 as aimesh_dot_v1_dot_flow__pb2\n"
        "from agent._gen.grpc.health.v1 import health_pb2 as h\n"
        "from aimesh.v1alpha import x\n"
    )
    assert build_proto.module_packages([Path("aimesh/v1/flow.proto"), Path("top.proto")]) == {"aimesh.v1"}


def test_generated_code_does_not_shadow_grpc() -> None:
    import grpc

    from agent._gen.grpc.health.v1 import health_pb2_grpc

    assert Path(grpc.__file__).parent.name == "grpc" and "_gen" not in grpc.__file__
    assert health_pb2_grpc.grpc is grpc


def test_build_is_idempotent_and_notices_changes(tmp_dir: Path) -> None:
    layout = build_proto.Layout(proto_root=tmp_dir / "proto", out_dir=tmp_dir / "agent" / "_gen")
    shutil.copytree(REPO / "proto", layout.proto_root)
    assert build_proto.build(layout) is True
    gen = layout.out_dir / "aimesh" / "v1" / "collector_pb2_grpc.py"
    assert "from agent._gen.aimesh.v1 import collector_pb2" in gen.read_text()
    for d in ("", "aimesh", "aimesh/v1", "grpc", "grpc/health", "grpc/health/v1"):
        assert (layout.out_dir / d / "__init__.py").exists()
    t0 = time.monotonic()
    assert build_proto.build(layout) is False  # up to date
    assert time.monotonic() - t0 < 0.5
    before = gen.stat().st_mtime_ns
    flow = layout.proto_root / "aimesh" / "v1" / "flow.proto"
    flow.write_text(flow.read_text() + "\n// a comment\n")
    assert build_proto.build(layout) is True
    assert gen.stat().st_mtime_ns >= before
    # A package that is no longer generated is removed.
    shutil.rmtree(layout.proto_root / "grpc")
    assert build_proto.build(layout) is True
    assert not (layout.out_dir / "grpc").exists() and (layout.out_dir / "aimesh").exists()
    assert not list(layout.out_dir.glob(".tmp*"))


def test_build_reports_protoc_errors(tmp_dir: Path) -> None:
    layout = build_proto.Layout(proto_root=tmp_dir / "proto", out_dir=tmp_dir / "gen")
    (layout.proto_root / "x").mkdir(parents=True)
    (layout.proto_root / "x" / "bad.proto").write_text('syntax = "proto3";\nmessage {')
    with pytest.raises(build_proto.BuildError, match="protoc failed"):
        build_proto.build(layout)
    assert not (layout.out_dir / ".stamp").exists()
    with pytest.raises(build_proto.BuildError, match="no proto directory"):
        build_proto.build(build_proto.Layout(proto_root=tmp_dir / "none", out_dir=tmp_dir / "gen2"))
