"""Authentication: on by default, token files, per-agent tokens and certificates, health probes, forged agent ids."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.collector_testlib import Pki, batch, make_pki, record, stub_for, tmp_dir  # noqa: F401 (fixture)
from agent._gen.aimesh.v1 import collector_pb2
from agent._gen.grpc.health.v1 import health_pb2, health_pb2_grpc
from agent.collector.auth import (
    Authenticator,
    Principal,
    Role,
    is_loopback_peer,
    load_or_create_token,
    parse_agent_tokens,
)
from agent.collector.channel import ClientTls, ConfigError, open_channel
from agent.collector.server import CollectorConfig, CollectorServer, ServerTls, resolve_auth

SHARED = "shared-token-for-tests"
AGENT_A = "token-of-agent-a-0001"
AGENT_B = "token-of-agent-b-0002"


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value  # type: ignore[return-value]


def rejected(srv: CollectorServer, reason: str) -> float:
    return srv.registry.get_sample_value("aimesh_collector_rejected_requests_total", {"reason": reason}) or 0.0


@pytest.fixture
def server(tmp_dir: Path) -> Iterator[CollectorServer]:
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token=SHARED, grace_s=0.2,
                                          agent_tokens={AGENT_A: "a", AGENT_B: "b"}))  # fmt: skip
    srv.start()
    yield srv
    srv.stop(0)


# --- token files and options --------------------------------------------------------------------------------------


def test_token_file_is_created_private_and_then_reused(tmp_dir: Path) -> None:
    path = tmp_dir / "sub" / "collector.token"
    token, created = load_or_create_token(path)
    assert created and len(token) >= 40 and path.read_text() == token + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == (token, False)
    other = tmp_dir / "other.token"
    assert load_or_create_token(other)[0] != token  # random, not derived from anything


def test_world_readable_token_file_is_used_with_a_warning(tmp_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_dir / "t"
    path.write_text("abc-token\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_or_create_token(path) == ("abc-token", False)
    assert "chmod 600" in caplog.text


def test_resolve_auth_defaults_to_a_token_beside_the_database(tmp_dir: Path) -> None:
    db = tmp_dir / "flows.db"
    auth = resolve_auth(db=db)
    assert auth.created == tmp_dir / "flows.db.token" and auth.token == auth.created.read_text().strip()
    assert auth.created.stat().st_mode & 0o777 == 0o600
    again = resolve_auth(db=db)
    assert again.token == auth.token and again.created is None
    # Client certificates are authentication enough: no token file.
    assert resolve_auth(db=tmp_dir / "m.db", mtls=True).token is None and not (tmp_dir / "m.db.token").exists()
    # A named token file is created the same way.
    named = resolve_auth(db=db, token_file=tmp_dir / "named.token")
    assert named.created == tmp_dir / "named.token" and named.token != auth.token


def test_resolve_auth_no_auth_is_explicit_and_warned(tmp_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        auth = resolve_auth(db=tmp_dir / "f.db", no_auth=True)
    assert auth.token is None and not auth.agent_tokens and "--no-auth" in caplog.text
    assert not (tmp_dir / "f.db.token").exists()
    with pytest.raises(ConfigError, match="--no-auth cannot be combined with --token-file"):
        resolve_auth(db=tmp_dir / "f.db", no_auth=True, token_file=tmp_dir / "t")
    with pytest.raises(ConfigError, match="--token or --token-file"):
        resolve_auth(db=tmp_dir / "f.db", token="abc", token_file=tmp_dir / "t")


def test_agent_tokens_file_parsing(tmp_dir: Path) -> None:
    text = f"# agent_id token\nnode-a {AGENT_A}\n\nnode-b {AGENT_B}  # second node\n"
    assert parse_agent_tokens(text, "f") == {AGENT_A: "node-a", AGENT_B: "node-b"}
    for bad, why in (
        (f"node-a {AGENT_A} extra", "line 1: expected `AGENT_ID TOKEN`"),
        ("node-a short", "shorter than 16"),
        (f"node-a {AGENT_A}\nnode-b {AGENT_A}", "line 2: the token of node-b is also the token of node-a"),
        (f"node-a {AGENT_A}\nnode-a {AGENT_B}", "line 2: agent_id node-a appears twice"),
        ("# nothing\n", "no `AGENT_ID TOKEN` lines"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_agent_tokens(bad, "f")
    with pytest.raises(ConfigError, match="shared token is also an agent's token"):
        Authenticator(token=AGENT_A, agent_tokens={AGENT_A: "a"})
    path = tmp_dir / "agents"
    path.write_text(f"node-a {AGENT_A}\n")
    assert resolve_auth(db=tmp_dir / "f.db", agent_tokens_file=path).agent_tokens == {AGENT_A: "node-a"}


@pytest.mark.parametrize("peer, loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.9.9.9:1", True), ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5", True), ("unix:/run/x.sock", True), ("ipv4:10.0.0.1:5000", False),
    ("ipv6:[2001:db8::1]:5000", False), ("ipv4:nonsense", False), ("", False),
])  # fmt: skip
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_authorize_is_pure() -> None:
    auth = Authenticator(token=SHARED, agent_tokens={AGENT_A: "a"})
    push, listing = "/aimesh.v1.FlowCollector/Push", "/aimesh.v1.FlowCollector/ListFlows"
    md = [("authorization", f"Bearer {AGENT_A}")]
    who = auth.authenticate(push, md, "ipv4:10.0.0.1:1", {})
    assert who == Principal(Role.AGENT, frozenset({"a"}))
    assert auth.authorize(who, push, "a") is None
    assert auth.authorize(who, push, "b").code == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[union-attr]
    assert auth.authorize(who, listing).code == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[union-attr]
    probe = auth.authenticate("/grpc.health.v1.Health/Check", [], "ipv4:127.0.0.1:1", {})
    assert probe == Principal(Role.PROBE, frozenset())
    remote = auth.authenticate("/grpc.health.v1.Health/Check", [], "ipv4:10.0.0.1:1", {})
    assert not isinstance(remote, Principal) and remote.code == grpc.StatusCode.UNAUTHENTICATED
    watch = auth.authenticate("/grpc.health.v1.Health/Watch", [], "ipv4:127.0.0.1:1", {})
    assert not isinstance(watch, Principal) and watch.code == grpc.StatusCode.UNAUTHENTICATED


# --- over gRPC ----------------------------------------------------------------------------------------------------


def test_health_watch_needs_a_token_check_is_open_on_loopback(server: CollectorServer) -> None:
    ch, _ = stub_for(str(server.address))
    with ch:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving  # a probe, from 127.0.0.1
        err = rpc_error(lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer wrong"),)
        err = rpc_error(lambda: next(health.Watch(health_pb2.HealthCheckRequest(), metadata=wrong, timeout=5)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    ch, _ = stub_for(str(server.address), token=SHARED)
    with ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    assert rejected(server, "unauthenticated") == 2


def test_agent_tokens_push_only_for_their_own_agent(server: CollectorServer) -> None:
    addr = str(server.address)
    ch, stub = stub_for(addr, token=AGENT_A)
    with ch:
        assert stub.Push(batch("a", 1, [record(1)]), timeout=5).accepted == 1
        err = rpc_error(lambda: stub.Push(batch("b", 1, [record(2)]), timeout=5))  # forged: b's id with a's token
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "may not push for agent_id 'b'" in err.details()
        err = rpc_error(lambda: list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "may only push" in err.details()
        err = rpc_error(lambda: next(stub.Follow(collector_pb2.FlowQuery(), timeout=5)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    ch, stub = stub_for(addr, token=SHARED)  # the operator's shared token lists everything
    with ch:
        got = list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5))
    assert [(r.agent_id, r.cookie) for r in got] == [("a", 1)]  # nothing of the forged batch
    assert rejected(server, "forbidden") == 3


def test_record_agent_id_must_match_the_batch(server: CollectorServer) -> None:
    ch, stub = stub_for(str(server.address), token=SHARED)
    with ch:
        forged = batch("a", 1, [record(1), record(2, agent_id="b")])
        err = rpc_error(lambda: stub.Push(forged, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "records[1].agent_id 'b' is not the batch's agent_id 'a'" in err.details()
        assert list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)) == []
        assert stub.Push(batch("a", 1, [record(1, agent_id="a")]), timeout=5).accepted == 1
    assert rejected(server, "agent_mismatch") == 1


def test_collector_without_credentials_refuses_everything_but_probes(tmp_dir: Path) -> None:
    auth = resolve_auth(db=tmp_dir / "f.db")  # what `aimesh collector` does with no auth option
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token=auth.token, grace_s=0.2))
    srv.start()
    try:
        ch, stub = stub_for(str(srv.address))
        with ch:
            for call in (lambda: stub.Push(batch("a", 1, [record(1)]), timeout=5),
                         lambda: list(stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)),
                         lambda: next(stub.Follow(collector_pb2.FlowQuery(), timeout=5))):  # fmt: skip
                assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED
        assert srv.store.count() == 0
    finally:
        srv.stop(0)


# --- mutual TLS: the certificate names the agent ------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="aimesh-pki-") as d:
        yield make_pki(Path(d))


@needs_openssl
def test_mtls_agent_id_must_be_in_the_certificate(pki: Pki, tmp_dir: Path) -> None:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", tls=tls, grace_s=0.2))
    srv.start()
    try:
        with open_channel(str(srv.address), ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) as ch:
            stub = collector_pb2_grpc_stub(ch)
            assert stub.Push(batch("node-tls", 1, [record(1)]), timeout=5).accepted == 1  # a SAN of the cert
            assert stub.Push(batch("client", 1, [record(2)]), timeout=5).accepted == 1  # its CN
            err = rpc_error(lambda: stub.Push(batch("node-other", 1, [record(3)]), timeout=5))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "node-other" in err.details()
            assert sorted(r.cookie for r in stub.ListFlows(collector_pb2.FlowQuery(), timeout=5)) == [1, 2]
    finally:
        srv.stop(0)


def collector_pb2_grpc_stub(ch: grpc.Channel) -> object:
    from agent._gen.aimesh.v1 import collector_pb2_grpc

    return collector_pb2_grpc.FlowCollectorStub(ch)
