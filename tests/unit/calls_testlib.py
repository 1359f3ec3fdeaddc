"""Helpers shared by the model-call tests (test_calls_*.py): a real in-process collector and call builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.collector_testlib import tmp_dir  # noqa: F401  (fixture; importing it also builds the protobuf code)
from agent._gen.aimesh.v1 import collector_pb2, flow_pb2, model_call_pb2
from agent.collector.server import CollectorConfig, CollectorServer

TOKEN = "t0ken-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
T0 = 1_764_000_000_000_000_000  # 2025-11-24, in Unix nanoseconds
DIGEST = "ab" * 32

StartFn = Callable[..., CollectorServer]


@pytest.fixture
def start(tmp_dir: Path) -> Iterator[StartFn]:  # noqa: F811
    servers: list[CollectorServer] = []

    def _start(**overrides: object) -> CollectorServer:
        fields: dict[str, object] = {"listen": "127.0.0.1:0", "db": tmp_dir / "flows.db", "grace_s": 0.5,
                                     "token": TOKEN}
        fields.update(overrides)
        srv = CollectorServer(CollectorConfig(**fields))  # type: ignore[arg-type]
        srv.start()
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop(0)


def ident(name: str, kind: str = "", version: str = "") -> flow_pb2.Identity:
    return flow_pb2.Identity(name=name, kind=kind, version=version)


def call(cookie: int, **fields: object) -> model_call_pb2.ModelCall:
    base: dict[str, object] = {
        "cookie": cookie,
        "start_time_unix_nano": T0 + cookie * 10**9,
        "source": ident("chat-ui", "agent"),
        "destination": ident("llm", "model", "v1"),
        "protocol": model_call_pb2.LLM_PROTOCOL_OPENAI,
        "operation": model_call_pb2.LLM_OPERATION_CHAT,
        "request_model": "gpt-4o",
        "status": 200,
        "input_tokens": 10,
        "output_tokens": 5,
        "duration_ns": 200_000_000,
        "time_to_first_chunk_ns": 50_000_000,
        "request_digest": DIGEST,
    }
    base.update(fields)
    return model_call_pb2.ModelCall(**base)  # type: ignore[arg-type]


def call_batch(agent_id: str, sequence: int, calls: list[model_call_pb2.ModelCall]) -> collector_pb2.ModelCallBatch:
    return collector_pb2.ModelCallBatch(agent_id=agent_id, sequence=sequence, calls=calls)
