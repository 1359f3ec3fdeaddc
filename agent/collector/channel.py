"""Addresses, TLS material and bearer tokens shared by the collector server and its clients (exporter, `flows`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

# Trailing metadata keys on a RESOURCE_EXHAUSTED Push: the collector's limits (the exporter splits batches by them).
MD_MAX_RECORDS = "aimesh-max-records"
MD_MAX_BYTES = "aimesh-max-bytes"


class ConfigError(Exception):
    """A setting is wrong or a file it names cannot be read; the message says which."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, *, what: str = "address") -> HostPort:
    """"HOST:PORT" or "[IPv6]:PORT" -> HostPort. Port 0 (pick one) is allowed."""
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"{what} {text!r}: write IPv6 addresses in brackets, e.g. [::1]:4317")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be a number from 0 to 65535")
    return HostPort(host=host, port=int(port_text))


def read_file(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise ConfigError(f"{what} {path} is empty")
    return data


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from --token or --token-file (first line, stripped); None when neither is given."""
    if token is not None and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        token = read_file(token_file, "token file").decode(errors="strict").splitlines()[0]
    if token is None:
        return None
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError("the token must be non-empty and contain no whitespace")
    return token


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS to the collector. ca None: the system's roots. cert and key: a client certificate for mutual TLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name to check the server certificate against, if not the target host

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca, "CA bundle") if self.ca else None,
            private_key=read_file(self.key, "TLS key") if self.key else None,
            certificate_chain=read_file(self.cert, "TLS certificate") if self.cert else None,
        )


def open_channel(
    target: str, tls: ClientTls | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    """A channel to HOST:PORT, plaintext or TLS."""
    addr = str(parse_hostport(target, what="collector address"))
    opts = list(options)
    if tls is None:
        return grpc.insecure_channel(addr, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(addr, tls.credentials(), options=opts)
