"""Who may call the collector: bearer tokens (one shared, or one per agent), client certificates (mutual TLS).

    token = load_or_create_token(Path("/var/lib/aimesh/flows.db.token"))  # created 0600 with a random token if missing
    auth = Authenticator(token=token, agent_tokens=read_agent_tokens(path), mtls=True)
    principal_or_rejection = auth.authenticate(method, metadata, peer, auth_context)
    auth.authorize(principal, method, batch_agent_id)                       # None, or why not

Principals:
- open: the collector runs with authentication disabled (--no-auth); anything goes.
- operator: the shared token (or, with mutual TLS only, any client certificate): push, list, follow.
- agent: a token from --agent-tokens: push (flows and model calls) for its own agent_id, health; no listing.
- probe: no credentials, from a loopback address, calling Health/Check only (kubelet-style probes cannot send a
  token; the answer is one serving status). Health/Watch holds a stream and needs credentials like everything else.
With mutual TLS, a push's agent_id must also be the client certificate's CN or one of its SANs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import grpc

from agent.collector.channel import ConfigError, read_token

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
PUSH = "/aimesh.v1.FlowCollector/Push"
PUSH_CALLS = "/aimesh.v1.FlowCollector/PushCalls"
PUSHES = frozenset({PUSH, PUSH_CALLS})  # the methods agents call: authorized by the batch's agent_id
TOKEN_BYTES = 32  # of randomness in a created token (43 characters of URL-safe base64)
MAX_AGENT_ID = 253


class Role(Enum):
    OPEN = "open"
    OPERATOR = "operator"
    AGENT = "agent"
    PROBE = "probe"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    # The agent ids this caller may push for; None = any. Agent tokens and client certificates narrow it.
    agent_ids: frozenset[str] | None = None

    def describe(self) -> str:
        if self.agent_ids is None:
            return self.role.value
        return f"{self.role.value} {'/'.join(sorted(self.agent_ids)) or '(no name)'}"


@dataclass(frozen=True, slots=True)
class Denial:
    code: grpc.StatusCode
    reason: str  # metrics label: unauthenticated | forbidden
    message: str


# --- token files --------------------------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The token in `path` (first line), creating the file (0600, a fresh random token) when missing.

    Returns (token, created). A file readable by group or others is used but logged as a warning."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        token = read_token(None, path)
        assert token is not None
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s has mode %04o: anyone who can read it can push and list flows (chmod 600)",
                        path, mode)  # fmt: skip
        return token, False
    except OSError as e:
        raise ConfigError(f"cannot create token file {path}: {e.strerror or e}") from None
    token = new_token()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True


def parse_agent_tokens(text: str, source: str) -> dict[str, str]:
    """`agent_id token` lines (blank lines and # comments ignored) -> {token: agent_id}. Pure."""
    out: dict[str, str] = {}
    seen_agents: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        if len(parts) != 2:
            raise ConfigError(f"{source} line {n}: expected `AGENT_ID TOKEN`, got {len(parts)} words")
        agent_id, token = parts
        if len(agent_id) > MAX_AGENT_ID or not agent_id.isprintable():
            raise ConfigError(f"{source} line {n}: agent_id must be 1-{MAX_AGENT_ID} printable characters")
        if len(token) < 16:
            raise ConfigError(f"{source} line {n}: the token of {agent_id} is shorter than 16 characters")
        if token in out:
            raise ConfigError(f"{source} line {n}: the token of {agent_id} is also the token of {out[token]}")
        if agent_id in seen_agents:
            raise ConfigError(f"{source} line {n}: agent_id {agent_id} appears twice")
        seen_agents.add(agent_id)
        out[token] = agent_id
    if not out:
        raise ConfigError(f"{source}: no `AGENT_ID TOKEN` lines")
    return out


def read_agent_tokens(path: Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read agent tokens file {path}: {getattr(e, 'strerror', None) or e}") from None
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        log.warning("agent tokens file %s has mode %04o (chmod 600)", path, mode)
    return parse_agent_tokens(text, f"agent tokens file {path}")


# --- per-call checks ----------------------------------------------------------------------------------------------


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def is_loopback_peer(peer: str) -> bool:
    """gRPC's context.peer() ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path") -> from this host?"""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%", 1)[0]
    else:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """CN and SANs of the verified client certificate, from grpc's context.auth_context()."""
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return frozenset(n for n in names if n)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Decides who a call comes from (authenticate) and whether it may do what it asks (authorize). Pure."""

    def __init__(self, *, token: str | None = None, agent_tokens: Mapping[str, str] | None = None,
                 mtls: bool = False) -> None:  # fmt: skip
        self._token = _digest(token) if token else None
        self._agents = {_digest(t): a for t, a in (agent_tokens or {}).items()}
        if token and _digest(token) in self._agents:
            raise ConfigError("the shared token is also an agent's token")
        self._mtls = mtls

    @property
    def enabled(self) -> bool:
        return self._token is not None or bool(self._agents) or self._mtls

    @property
    def wants_bearer(self) -> bool:
        return self._token is not None or bool(self._agents)

    def authenticate(
        self,
        method: str,
        metadata: Iterable[tuple[str, str | bytes]],
        peer: str,
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Principal | Denial:
        if not self.enabled:
            return Principal(Role.OPEN)
        cert_ids: frozenset[str] | None = None
        if self._mtls:
            cert_ids = certificate_names(auth_context)
            if not cert_ids:
                return Denial(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                              "the client certificate names no agent (no CN or SAN)")  # fmt: skip
        if not self.wants_bearer:
            return Principal(Role.OPERATOR, cert_ids)
        given = bearer_token(metadata)
        if given is not None:
            d = _digest(given)
            if self._token is not None and hmac.compare_digest(d, self._token):
                return Principal(Role.OPERATOR, cert_ids)
            agent = self._agents.get(d)
            if agent is not None:
                ids = frozenset({agent}) if cert_ids is None else frozenset({agent}) & cert_ids
                return Principal(Role.AGENT, ids)
        if method == HEALTH_CHECK and is_loopback_peer(peer):
            return Principal(Role.PROBE, frozenset())
        why = "missing bearer token" if given is None else "invalid bearer token"
        return Denial(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                      f"{why} (metadata authorization: Bearer <token>)")  # fmt: skip

    @staticmethod
    def authorize(principal: Principal, method: str, push_agent_id: str | None = None) -> Denial | None:
        """None when `principal` may call `method` (for Push: with this batch agent_id)."""
        if principal.role is Role.OPEN:
            return None
        if principal.role is Role.PROBE:
            return None if method == HEALTH_CHECK else Denial(
                grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", "missing bearer token")  # fmt: skip
        if method.startswith(HEALTH_PREFIX):
            return None
        if method in PUSHES:
            allowed = principal.agent_ids
            if allowed is not None and push_agent_id not in allowed:
                return Denial(grpc.StatusCode.PERMISSION_DENIED, "forbidden",
                              f"authenticated as {principal.describe()}: may not push for agent_id "
                              f"{push_agent_id!r}")  # fmt: skip
            return None
        if principal.role is Role.AGENT:
            return Denial(grpc.StatusCode.PERMISSION_DENIED, "forbidden",
                          f"authenticated as {principal.describe()}: agent credentials may only push")  # fmt: skip
        return None
