"""The demo's TLS: a CA made at demo start (openssl), and a certificate it signs for the https model server.

Everything goes into a directory of the demo's private work directory, mode 0700, every file 0600; the CA key signs
one certificate and is left there with the rest (the work directory is removed at exit unless --keep-logs).
The clients trust the CA through an explicit CA file (`--ca-file`), SSL_CERT_FILE works as well.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
SERVER_EXT = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n" \
             "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"


class TlsError(RuntimeError):
    """The demo's certificates could not be made; the message names the openssl step."""


@dataclass(frozen=True)
class DemoTls:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(step: str, args: list[str], cwd: Path) -> None:
    try:
        r = subprocess.run(["openssl", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise TlsError(f"openssl {step}: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise TlsError(f"openssl {step} failed: {last}")


def make_demo_tls(directory: Path) -> DemoTls:
    """A fresh CA and a server certificate for 127.0.0.1/::1/localhost in `directory` (made 0700; files 0600)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    directory.chmod(0o700)
    old = os.umask(0o077)           # the keys are never readable by anyone else, not even for a moment
    try:
        _openssl("CA", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", "ca.key", "-out", "ca.pem", "-days", DAYS, "-subj", "/CN=aimesh demo CA",
                        "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], directory)
        (directory / "server.ext").write_text(SERVER_EXT)
        _openssl("server key", ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"], directory)
        _openssl("server certificate", ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                                        "-CAcreateserial", "-out", "server.pem", "-days", DAYS,
                                        "-extfile", "server.ext"], directory)
    finally:
        os.umask(old)
    for f in directory.iterdir():
        f.chmod(0o600)
    return DemoTls(ca_cert=directory / "ca.pem", server_cert=directory / "server.pem",
                   server_key=directory / "server.key")
