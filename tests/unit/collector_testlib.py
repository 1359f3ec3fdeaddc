"""Helpers shared by the collector and exporter tests (test_collector_*.py, test_export_*.py).

Importing this module generates the protobuf code if needed (fast when up to date), so the tests run from a clean
checkout with `python -m pytest tests/unit`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import build_proto

build_proto.build()

import grpc  # noqa: E402

from agent._gen.aimesh.v1 import collector_pb2, collector_pb2_grpc, flow_pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A temporary directory removed after the test (pytest's tmp_path keeps the last runs' files)."""
    with tempfile.TemporaryDirectory(prefix="aimesh-test-") as d:
        yield Path(d)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def record(cookie: int, **fields: object) -> flow_pb2.FlowRecord:
    base: dict[str, object] = {
        "cookie": cookie,
        "kind": flow_pb2.RECORD_KIND_CONNECTION,
        "start_time_unix_nano": 1_700_000_000_000_000_000 + cookie * 1000,
        "end_time_unix_nano": 1_700_000_000_000_000_000 + cookie * 1000 + 500,
        "protocol": flow_pb2.PROTOCOL_TCP,
        "verdict": flow_pb2.VERDICT_ALLOWED,
    }
    base.update(fields)
    return flow_pb2.FlowRecord(**base)  # type: ignore[arg-type]


def batch(agent_id: str, sequence: int, records: list[flow_pb2.FlowRecord]) -> collector_pb2.FlowBatch:
    return collector_pb2.FlowBatch(agent_id=agent_id, sequence=sequence, records=records)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call of a channel (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._md = (("authorization", f"Bearer {token}"),)

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        md = tuple(d.metadata or ()) + self._md
        return _CallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)


def stub_for(address: str, credentials: grpc.ChannelCredentials | None = None,
             server_name: str | None = None, token: str | None = None,
             ) -> tuple[grpc.Channel, collector_pb2_grpc.FlowCollectorStub]:  # fmt: skip
    """A channel and stub; with a token, every call on the channel carries it."""
    if credentials is None:
        ch = grpc.insecure_channel(address)
    else:
        opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        ch = grpc.secure_channel(address, credentials, options=opts)
    if token is not None:
        ch = _ClosingChannel(grpc.intercept_channel(ch, BearerInterceptor(token)), ch)
    return ch, collector_pb2_grpc.FlowCollectorStub(ch)


class _ClosingChannel(grpc.Channel):  # type: ignore[misc]
    """An intercepted channel that closes the channel under it (and works as a context manager)."""

    def __init__(self, outer: grpc.Channel, inner: grpc.Channel) -> None:
        self._outer, self._inner = outer, inner

    def subscribe(self, callback, try_to_connect=False):  # type: ignore[no-untyped-def]
        self._outer.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):  # type: ignore[no-untyped-def]
        self._outer.unsubscribe(callback)

    def unary_unary(self, *a, **kw):  # type: ignore[no-untyped-def]
        return self._outer.unary_unary(*a, **kw)

    def unary_stream(self, *a, **kw):  # type: ignore[no-untyped-def]
        return self._outer.unary_stream(*a, **kw)

    def stream_unary(self, *a, **kw):  # type: ignore[no-untyped-def]
        return self._outer.stream_unary(*a, **kw)

    def stream_stream(self, *a, **kw):  # type: ignore[no-untyped-def]
        return self._outer.stream_stream(*a, **kw)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> _ClosingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_cookies(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[int]:
    ch, stub = stub_for(address)
    with ch:
        return [r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), metadata=metadata, timeout=30)]


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, not listening, held for the duration."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@dataclass
class CollectorProcess:
    """`python -m agent.collector collector ...` in a child process, its stderr in a file."""

    proc: subprocess.Popen[bytes]
    log: Path
    address: str

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


def start_collector_process(db: Path, log: Path, listen: str = "127.0.0.1:0", *extra: str,
                            auth: Sequence[str] = ("--no-auth",)) -> CollectorProcess:  # fmt: skip
    """auth: the authentication flags. --no-auth by default for the exporter tests, whose clients send no token;
    pass () for the collector's default (a token file <db>.token) or your own flags."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.collector", "collector", "--listen", listen, "--db", str(db), *auth,
             *extra],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 20
    address = None
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        address = _last_address(text)
        if address and (listen.endswith(":0") or address == listen):
            break
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited with {proc.returncode}: {text}")
        time.sleep(0.02)
    else:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"collector did not start: {log.read_text(errors='replace')}")
    assert address is not None
    return CollectorProcess(proc=proc, log=log, address=address)


def _last_address(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("aimesh collector: listening on ")]
    if not lines:
        return None
    return lines[-1].removeprefix("aimesh collector: listening on ").split(" ", 1)[0]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    other_client_cert: Path  # a client certificate from other_ca
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key.name, "-out", cert.name, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)  # fmt: skip
    return cert, key


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
             "-out", cert.name, "-days", "2", "-extfile", extfile.name, cwd=d)  # fmt: skip
    return cert, key


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a foreign CA and client."""
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(d, "test-ca")
    server_ext = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    server = _make_leaf(d, "server", ca, server_ext)
    # The agents this certificate may push for (mutual TLS: a push's agent_id must be its CN or a SAN).
    client = _make_leaf(d, "client", ca, "subjectAltName=DNS:a,DNS:node-tls\nextendedKeyUsage=clientAuth\n")
    other = _make_ca(d, "other-ca")
    other_client = _make_leaf(d, "other-client", other, "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
    )
