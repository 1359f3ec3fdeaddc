"""The node CA: created once (key 0600), the same across restarts, leaves that verify for names and IPs, and
`aimesh ca export`."""
from __future__ import annotations

import socket
import ssl
import stat
import threading

from agent.cli import main
from agent.gateway.ca import NodeCA


def test_ca_is_kept_across_restarts_with_a_private_key(tmp_path):
    a = NodeCA(tmp_path / "ca")
    b = NodeCA(tmp_path / "ca")
    assert a.cert_pem() == b.cert_pem()
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600


def _handshake(ca: NodeCA, client_name: str | None, expect: str) -> str | None:
    srv_ctx = ca.server_context("127.0.0.1")
    cli = ssl.create_default_context(cafile=str(ca.dir / "ca.pem"))
    if client_name is None:
        cli.check_hostname = False        # no SNI: the client checks the IP itself below
    a, b = socket.socketpair()
    out: dict[str, str | None] = {}

    def serve() -> None:
        with srv_ctx.wrap_socket(a, server_side=True) as s:
            out["name"] = ca.name_of(s.context)
            s.recv(1)
    t = threading.Thread(target=serve)
    t.start()
    with cli.wrap_socket(b, server_hostname=client_name) as c:
        san = [v for _, v in c.getpeercert()["subjectAltName"]]
        c.sendall(b"x")
    t.join(5)
    assert san == [expect]
    return out["name"]


def test_leaf_for_sni_name_or_dialed_ip(tmp_path):
    ca = NodeCA(tmp_path / "ca")
    assert _handshake(ca, "api.openai.com", "api.openai.com") == "api.openai.com"
    assert _handshake(ca, None, "127.0.0.1") == "127.0.0.1"


def test_ca_export_prints_the_certificate(tmp_path, capsys):
    assert main(["ca", "export", "--ca-dir", str(tmp_path / "ca")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-----BEGIN CERTIFICATE-----") and out.encode() == NodeCA(tmp_path / "ca").cert_pem()
