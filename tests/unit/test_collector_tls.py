"""TLS and mutual TLS between the collector and its clients, with certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.collector_testlib import Pki, batch, make_pki, record, stub_for, tmp_dir  # noqa: F401 (fixture)
from agent._gen.aimesh.v1 import collector_pb2
from agent.collector.channel import ClientTls, ConfigError, open_channel
from agent.collector.server import CollectorConfig, CollectorServer, ServerTls
from agent._gen.aimesh.v1 import collector_pb2_grpc
from agent.export.collector_client import ExporterConfig, FlowExporter
from agent.export.records import FlowRecordData

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="aimesh-pki-") as d:
        yield make_pki(Path(d))


@pytest.fixture
def tls_server(pki: Pki, tmp_dir: Path) -> Iterator[CollectorServer]:
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db",
                                          tls=ServerTls(pki.server_cert, pki.server_key)))  # fmt: skip
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture
def mtls_server(pki: Pki, tmp_dir: Path) -> Iterator[CollectorServer]:
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    srv = CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db", token="tok", tls=tls))
    srv.start()
    yield srv
    srv.stop(0)


def push(channel: grpc.Channel, seq: int, metadata: tuple[tuple[str, str], ...] = ()) -> collector_pb2.PushReply:
    return collector_pb2_grpc.FlowCollectorStub(channel).Push(batch("a", seq, [record(seq)]), metadata=metadata,
                                                               timeout=5)  # fmt: skip


def test_tls_round_trip(tls_server: CollectorServer, pki: Pki) -> None:
    with open_channel(str(tls_server.address), ClientTls(ca=pki.ca)) as ch:
        assert push(ch, 1).accepted == 1
    # The name in the certificate is checked: localhost is in it, "example.test" is not.
    with open_channel(str(tls_server.address), ClientTls(ca=pki.ca, server_name="localhost")) as ch:
        assert push(ch, 2).accepted == 1
    with open_channel(str(tls_server.address), ClientTls(ca=pki.ca, server_name="example.test")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            push(ch, 3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_tls_refuses_untrusted_server_and_plaintext(tls_server: CollectorServer, pki: Pki) -> None:
    with open_channel(str(tls_server.address), ClientTls(ca=pki.other_ca)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            push(ch, 1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    ch, stub = stub_for(str(tls_server.address))  # plaintext to a TLS port
    with ch:
        with pytest.raises(grpc.RpcError) as err:
            stub.Push(batch("a", 1, [record(1)]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with open_channel(str(tls_server.address), ClientTls(ca=pki.ca)) as ch:  # and it still serves
        assert push(ch, 9).accepted == 1


def test_mtls_requires_a_client_certificate_from_the_ca(mtls_server: CollectorServer, pki: Pki) -> None:
    addr = str(mtls_server.address)
    auth = (("authorization", "Bearer tok"),)
    with open_channel(addr, ClientTls(ca=pki.ca)) as ch:  # no client certificate
        with pytest.raises(grpc.RpcError) as err:
            push(ch, 1, auth)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    foreign = ClientTls(ca=pki.ca, cert=pki.other_client_cert, key=pki.other_client_key)
    with open_channel(addr, foreign) as ch:
        with pytest.raises(grpc.RpcError) as err:
            push(ch, 1, auth)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    good = ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with open_channel(addr, good) as ch:
        with pytest.raises(grpc.RpcError) as err:  # the token is still required
            push(ch, 1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert push(ch, 1, auth).accepted == 1


def test_exporter_over_mtls(mtls_server: CollectorServer, pki: Pki, tmp_dir: Path) -> None:
    cfg = ExporterConfig(
        target=str(mtls_server.address),
        agent_id="node-tls",
        token="tok",
        tls=ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key),
        spool_dir=tmp_dir / "spool",
        flush_interval_s=0.05,
    )
    exporter = FlowExporter(cfg)
    exporter.start()
    try:
        assert exporter.submit_many(FlowRecordData(cookie=i) for i in range(50)) == 50
        assert exporter.flush(10)
    finally:
        stats = exporter.close()
    assert stats.sent_records == 50 and stats.export_errors == 0
    assert mtls_server.store.count() == 50


def test_missing_tls_files_are_clear_errors(pki: Pki, tmp_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read TLS certificate .*nope.pem"):
        CollectorServer(CollectorConfig(listen="127.0.0.1:0", db=tmp_dir / "f.db",
                                        tls=ServerTls(tmp_dir / "nope.pem", pki.server_key))).start()  # fmt: skip
    with pytest.raises(ConfigError, match="CA bundle"):
        FlowExporter(ExporterConfig(target="127.0.0.1:1", agent_id="a", tls=ClientTls(ca=tmp_dir / "missing")))
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        ClientTls(ca=pki.ca, cert=pki.client_cert).credentials()
    assert not (tmp_dir / "f.db").exists()  # nothing opened when the TLS files are bad
