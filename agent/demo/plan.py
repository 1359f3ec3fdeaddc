"""The demo config: an ordinary agent config plus a `demo:` section naming the workloads to start.

    demo:
      servers:                     # OpenAI wire-format model servers and dataset servers, on 127.0.0.1:<port>
        - {name: llama, kind: model, version: "3.1-8b", port: 18001, cgroup: llama}
        - {name: gpt-oss, kind: model, version: "20b", port: 18005, cgroup: gpt-oss, tls: true}   # https
      clients:                     # call a server in a loop; `target` names a server
        - {name: chat-frontend, target: llama, interval: 0.5, cgroup: chat}
        - {name: support-bot, target: gpt-oss, cgroup: support, error_every: 5}   # every 5th call: HTTP 404

A client of a model server asks for `<name>-<version>` through the openai SDK; a `tls: true` server gets a certificate
from the CA the demo makes at start, and its clients trust that CA.

`cgroup` is a child of the demo's subtree (`<cgroup2 mount>/aimesh-demo-<pid>/<cgroup>`); the identities of the agent
config select it with globs like `/aimesh-demo*/chat`. The agent is handed the config without the `demo:` section.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
UNMANAGED = "unmanaged"


class DemoConfigError(ValueError):
    """The demo config cannot be used; the message names the field."""


class ServerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    kind: Literal["model", "dataset"] = "model"
    version: str = Field(min_length=1, max_length=63)
    port: int = Field(ge=1024, le=65535)
    cgroup: str = Field(pattern=NAME_PATTERN, max_length=63)
    tls: bool = False                # https with a certificate from the demo's CA (model servers only)

    @model_validator(mode="after")
    def _tls_models_only(self) -> "ServerSpec":
        if self.tls and self.kind != "model":
            raise ValueError("tls: only model servers serve https")
        return self

    @property
    def model_id(self) -> str:
        """The model a model server serves (and its clients ask for)."""
        return f"{self.name}-{self.version}"


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    target: str = Field(pattern=NAME_PATTERN)
    interval: float = Field(default=1.0, ge=0.2, le=60.0)   # seconds between calls; bounded so the demo stays quiet
    cgroup: str = Field(pattern=NAME_PATTERN, max_length=63)
    error_every: int = Field(default=0, ge=0, le=1000)   # every N-th chat call asks for a model that is not there


class DemoPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: list[ServerSpec] = Field(min_length=1)
    clients: list[ClientSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "DemoPlan":
        names = [s.name for s in self.servers] + [c.name for c in self.clients]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"workload names must be unique: {', '.join(dup)}")
        ports = [s.port for s in self.servers]
        dup_ports = sorted({p for p in ports if ports.count(p) > 1})
        if dup_ports:
            raise ValueError(f"server ports must be unique: {', '.join(map(str, dup_ports))}")
        servers = {s.name for s in self.servers}
        for i, c in enumerate(self.clients):
            if c.target not in servers:
                raise ValueError(f"clients.{i}.target: {c.target!r} is not one of the servers ({', '.join(sorted(servers))})")
        return self

    def server(self, name: str) -> ServerSpec:
        return next(s for s in self.servers if s.name == name)

    @property
    def uses_tls(self) -> bool:
        return any(s.tls for s in self.servers)

    def cgroups(self) -> list[str]:
        """Every cgroup the workloads need, once each, in order of first use."""
        seen: dict[str, None] = {}
        for w in [*self.servers, *self.clients]:
            seen.setdefault(w.cgroup, None)
        return list(seen)


def format_validation_error(e: ValidationError, prefix: str) -> str:
    """pydantic's errors as `prefix.field.0.sub: message` lines."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


@dataclass(frozen=True)
class DemoConfig:
    agent_config: dict[str, Any]     # what the agent gets: the file without `demo:`
    plan: DemoPlan


def split_config(doc: Any) -> DemoConfig:
    """A parsed demo config file -> (agent config, demo plan). DemoConfigError names what is wrong."""
    if not isinstance(doc, Mapping):
        raise DemoConfigError(f"the config must be a YAML mapping, got {type(doc).__name__}")
    if "demo" not in doc:
        raise DemoConfigError("demo: missing; the demo config lists its workloads under `demo:` (servers, clients)")
    try:
        plan = DemoPlan.model_validate(doc["demo"])
    except ValidationError as e:
        raise DemoConfigError(format_validation_error(e, "demo")) from None
    agent_config = {k: v for k, v in doc.items() if k != "demo"}
    return DemoConfig(agent_config=agent_config, plan=plan)


def expected_identity(agent_config: Mapping[str, Any], cgroup_path: str) -> str:
    """The identity whose cgroup globs match `cgroup_path` (relative to the cgroup2 mount), first match wins.

    Only a label for the view: the agent decides, this shows what the config asks for.
    """
    for ident in agent_config.get("identities") or []:
        if not isinstance(ident, Mapping):
            continue
        select = ident.get("select") or {}
        globs = select.get("cgroups") or [] if isinstance(select, Mapping) else []
        if any(isinstance(g, str) and fnmatch.fnmatchcase(cgroup_path, g) for g in globs):
            return str(ident.get("name"))
    return UNMANAGED


def config_mode(agent_config: Mapping[str, Any]) -> str:
    mode = agent_config.get("mode", "enforce")
    return mode if isinstance(mode, str) else "enforce"
