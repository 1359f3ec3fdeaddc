"""The agent's config file: pydantic models and validation only. Errors name the field and the value.

Loading never changes anything: the caller swaps in a new Config only after load_config() returned it.
"""
from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RESERVED_IDENTITIES = ("unmanaged", "world")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_BACKENDS_PER_REDIRECT = 16  # abi.h BACKENDS_PER_SERVICE

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A config that cannot be used; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def parse_endpoint(text: str) -> tuple[Network, int]:
    """'10.0.0.0/24:8000', '[fd00::/64]:8000', '10.0.0.5', '[::1]:80' -> (network, port); port 0 = any port."""
    s = text.strip()
    port = 0
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after ']' in {text!r}")
            port = _port(rest[1:], text)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, text)
    else:
        host = s  # bare IPv4 or bare IPv6 CIDR without port
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError as e:
        raise ValueError(f"{text!r} is not an address or CIDR: {e}") from None
    return net, port


def parse_backend(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """'127.0.0.1:8001' or '[::1]:8001' -> (address, port); both parts required."""
    net, port = parse_endpoint(text)
    if net.num_addresses != 1:
        raise ValueError(f"backend {text!r} must be one address, not a CIDR")
    if port == 0:
        raise ValueError(f"backend {text!r} needs a port")
    return net.network_address, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 1 <= int(p) <= 65535:
        raise ValueError(f"port {p!r} in {text!r} must be 1-65535")
    return int(p)


class ProcessSelector(_Strict):
    exe: Optional[str] = None       # glob over /proc/PID/exe
    cmdline: Optional[str] = None   # glob over the space-joined command line

    @model_validator(mode="after")
    def _one_of(self) -> "ProcessSelector":
        if self.exe is None and self.cmdline is None:
            raise ValueError("a process selector needs exe or cmdline")
        return self


class Select(_Strict):
    cgroups: list[str] = Field(default_factory=list)   # globs over cgroup v2 paths relative to the cgroup2 mount
    processes: list[ProcessSelector] = Field(default_factory=list)

    @field_validator("cgroups")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for g in v:
            if not g.startswith("/"):
                raise ValueError(f"cgroup glob {g!r} must start with '/' (relative to the cgroup2 mount)")
        return v


class Deprecation(_Strict):
    sunset: datetime
    successor: Optional[str] = None

    @field_validator("sunset")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)


class Identity(_Strict):
    name: str
    kind: Literal["model", "dataset", "service", "external"]
    version: Optional[str] = None
    mode: Optional[Literal["enforce", "audit"]] = None
    governed: Optional[bool] = None
    select: Select = Field(default_factory=Select)
    endpoints: list[str] = Field(default_factory=list)
    deprecated: Optional[Deprecation] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"name {v!r} must match [a-z0-9][a-z0-9._-]*")
        if v in RESERVED_IDENTITIES:
            raise ValueError(f"name {v!r} is reserved")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v):
        return None if v is None else str(v)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for e in v:
            parse_endpoint(e)
        return v

    @property
    def is_governed(self) -> bool:
        if self.governed is not None:
            return self.governed
        return self.kind != "service"


class Policy(_Strict):
    from_: list[str] = Field(alias="from")
    to: list[str]
    ports: list[int] = Field(default_factory=list)   # empty = any port
    protocol: Literal["tcp", "udp", "any"] = "any"

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} must be 1-65535")
        return v


class Backend(_Strict):
    address: str
    weight: int = Field(default=1, ge=0, le=1_000_000)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_backend(v)
        return v


class Redirect(_Strict):
    from_: list[str] = Field(default_factory=list, alias="from")   # empty = every source
    to: str
    backends: list[Backend]

    @field_validator("from_", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[Backend]) -> list[Backend]:
        if not v:
            raise ValueError("a redirect needs at least one backend")
        if len(v) > MAX_BACKENDS_PER_REDIRECT:
            raise ValueError(f"at most {MAX_BACKENDS_PER_REDIRECT} backends per redirect, got {len(v)}")
        if sum(b.weight for b in v) == 0:
            raise ValueError("backend weights add up to 0")
        return v


class CollectorSettings(_Strict):
    address: Optional[str] = None          # host:port of the collector; unset = no export
    agent_id: Optional[str] = None         # default: the host name
    tls: bool = False                      # TLS with the system roots (implied by tls_ca / tls_cert)
    tls_ca: Optional[Path] = None
    tls_cert: Optional[Path] = None        # client certificate for mutual TLS (with tls_key)
    tls_key: Optional[Path] = None
    tls_server_name: Optional[str] = None
    token_file: Optional[Path] = None      # bearer token, first line
    batch_size: int = Field(default=500, ge=1, le=100_000)
    flush_interval: float = Field(default=1.0, gt=0, le=60)
    queue_records: int = Field(default=100_000, ge=1)
    spool_dir: Optional[Path] = Path("/var/lib/aimesh/spool")   # null: memory only
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _pair(self) -> "CollectorSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        return self


class Telemetry(_Strict):
    interim_interval: float = Field(default=60.0, ge=0, le=86400)   # seconds; 0: long connections report at close only
    udp_window: float = Field(default=10.0, gt=0, le=3600)          # seconds per UDP aggregate


class Config(_Strict):
    mode: Literal["enforce", "audit"] = "enforce"
    dns: Literal["allow", "deny"] = "allow"
    fast_path: bool = True             # same-node TCP between governed workloads skips the loopback stack
    identities: list[Identity] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)
    redirects: list[Redirect] = Field(default_factory=list)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    telemetry: Telemetry = Field(default_factory=Telemetry)

    @model_validator(mode="after")
    def _references(self) -> "Config":
        names = [i.name for i in self.identities]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise ValueError(f"identities.{i}.name: {n!r} is defined twice")
            seen.add(n)
        known = seen | set(RESERVED_IDENTITIES)
        for i, ident in enumerate(self.identities):
            d = ident.deprecated
            if d and d.successor is not None:
                if d.successor not in seen:
                    raise ValueError(f"identities.{i}.deprecated.successor: unknown identity {d.successor!r}")
                if d.successor == ident.name:
                    raise ValueError(f"identities.{i}.deprecated.successor: {ident.name!r} cannot succeed itself")
        for i, p in enumerate(self.policies):
            for field, refs in (("from", p.from_), ("to", p.to)):
                for r in refs:
                    if r not in known:
                        raise ValueError(f"policies.{i}.{field}: unknown identity {r!r}")
        for i, r in enumerate(self.redirects):
            for s in r.from_:
                if s not in known:
                    raise ValueError(f"redirects.{i}.from: unknown identity {s!r}")
            if r.to not in seen:
                raise ValueError(f"redirects.{i}.to: unknown identity {r.to!r}")
        return self

    def identity(self, name: str) -> Optional[Identity]:
        return next((i for i in self.identities if i.name == name), None)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"{loc}: {msg}{shown}")
    return "; ".join(lines)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format(e)}") from None


def load_config(path: Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, str(path))
