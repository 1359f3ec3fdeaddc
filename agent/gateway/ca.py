"""The node CA of the `intercept` TLS mode: created once in ca_dir (key 0600), kept across restarts; leaf
certificates for the SNI name (or the dialed IP) are issued on demand, kept in memory, and loaded into an
ssl.SSLContext per name. Uses the `cryptography` package (PyCA: the maintained X.509 library for Python)."""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
_LEAF_DAYS = 7
_CA_YEARS = 10
_MAX_LEAVES = 1024


class CAError(RuntimeError):
    """One line naming the file or value."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class NodeCA:
    """`NodeCA(ca_dir)` loads the CA there, or creates it; `cert_pem()`; `server_context(name)`."""

    def __init__(self, ca_dir: Path | str) -> None:
        self.dir = Path(ca_dir)
        self._lock = threading.Lock()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._names: dict[int, str] = {}      # id(context) -> the name its leaf is for
        self._key, self._cert = self._load_or_create()

    def _load_or_create(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        cert_p, key_p = self.dir / CA_CERT, self.dir / CA_KEY
        if cert_p.exists() and key_p.exists():
            try:
                key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
                cert = x509.load_pem_x509_certificate(cert_p.read_bytes())
            except (ValueError, OSError) as e:
                raise CAError(f"node CA in {self.dir}: cannot load ({e})") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CAError(f"node CA key {key_p}: not an EC key")
            if key_p.stat().st_mode & 0o077:
                os.chmod(key_p, 0o600)
            return key, cert
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name("aimesh node CA")).issuer_name(_name("aimesh node CA"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(hours=1))
                .not_valid_after(now + _dt.timedelta(days=365 * _CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        fd = os.open(key_p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *more: str) -> tuple[bytes, bytes]:
        """(leaf cert + CA chain PEM, leaf key PEM) for DNS names or IP addresses (the first is the subject)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(name[:64])).issuer_name(self._cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=_LEAF_DAYS))
                .add_extension(x509.SubjectAlternativeName([_san(n) for n in (name, *more)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem()
        return chain, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())

    def server_context(self, name: str) -> ssl.SSLContext:
        """A server-side context presenting a leaf for `name` (cached; issued on first use)."""
        with self._lock:
            ctx = self._contexts.get(name)
            if ctx is not None:
                return ctx
        chain, key = self.issue(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._on_sni
        with tempfile.TemporaryDirectory(prefix="aimesh-leaf-") as td:   # ssl loads chains from files only
            cp, kp = Path(td) / "c.pem", Path(td) / "k.pem"
            cp.write_bytes(chain)
            fd = os.open(kp, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            ctx.load_cert_chain(cp, kp)
        with self._lock:
            if len(self._contexts) >= _MAX_LEAVES:
                self._names.pop(id(self._contexts.pop(next(iter(self._contexts)))), None)
            kept = self._contexts.setdefault(name, ctx)
            self._names[id(kept)] = name
            return kept

    def name_of(self, ctx: ssl.SSLContext) -> str | None:
        """The name a context from `server_context` presents (after the SNI switch: the client's name)."""
        with self._lock:
            return self._names.get(id(ctx))

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if server_name and self.name_of(ctx) != server_name:
            try:
                sslobj.context = self.server_context(server_name)
            except (ValueError, ssl.SSLError):
                pass     # a name no certificate can carry: the handshake goes on with the dialed IP's leaf
