"""The agent's config file: reading, YAML, pydantic models and validation. Errors name the field and the value.

Loading never changes anything: the caller swaps in a new Config only after load_config() returned it.
load_config() raises ConfigError only, always with a one-line message
`<path>: <field path>: <problem> (<value, truncated>)`; YAML-level problems name the line and column instead of a field.

What the file may hold is narrower than YAML: one document, a mapping at the top, no anchors or aliases, no explicit
tags, no duplicate keys, string keys only, at most MAX_DEPTH levels of nesting, at most MAX_CONFIG_BYTES of UTF-8.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from agent.kernel import abi
from agent.l7.redact import RedactionPatternError, compile_redaction

try:
    from yaml._yaml import CParser   # libyaml; PyYAML's wheels and Debian's package have it
except ImportError:  # pragma: no cover - a PyYAML built without libyaml
    CParser = None
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

RESERVED_IDENTITIES = ("unmanaged", "world", "unresolved")
GATEWAY = "gateway"   # reserved: the node's L7 gateway (its cgroup <governed root>/aimesh-gateway), never in policies
GATEWAY_CGROUP = "aimesh-gateway"
UNRESOLVED = "unresolved"   # a cgroup under the kubepods hierarchy whose pod is not known yet (kubernetes.unresolved)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")    # used with fullmatch: `$` would accept a trailing newline
HOST_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_BACKENDS_PER_REDIRECT = abi.BACKENDS_PER_SERVICE
MAX_DNS_RESOLVERS = 32                # dns_resolvers entries (the kernel's dns_resolver map holds 64, resolv.conf too)

MAX_CONFIG_BYTES = 4 * 1024 * 1024   # read at most this much; a bigger file is refused before parsing
MAX_DEPTH = 64                       # nesting of YAML collections
MAX_VERSION_LEN = 64
MAX_ENDPOINT_LEN = 128               # an endpoint or backend string
MAX_HOST_LEN = 253                   # a DNS name
MAX_TEXT_LEN = 4096                  # globs, paths, agent id
MAX_MAP_ENTRIES = 1 << 20            # upper bound of every map size in `limits:`
MAX_RINGBUF_PAGES = 1 << 14          # 64 MiB per ring buffer
MAX_SHOWN = 60                       # characters of a value quoted in an error
MAX_MESSAGE = 480                    # an error message is cut here

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A config that cannot be used; the message is one line naming the file, the field and the value."""


def show(value: object) -> str:
    """A value as it appears in an error: repr, cut at MAX_SHOWN characters."""
    r = repr(value)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 3] + "..."


def one_line(msg: str) -> str:
    """Escape every non-printable character (newlines, line separators, controls) and cut at MAX_MESSAGE."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)
    return out if len(out) <= MAX_MESSAGE else out[: MAX_MESSAGE - 3] + "..."


def _text(v: str, what: str, max_len: int) -> str:
    """Non-empty, at most max_len characters, printable (no newline, tab or control character)."""
    if not v:
        raise ValueError(f"{what} is empty")
    if len(v) > max_len:
        raise ValueError(f"{what} has {len(v)} characters, at most {max_len} allowed")
    if not v.isprintable():
        raise ValueError(f"{what} has a non-printable character (newline, tab or control)")
    return v


def _port(p: str, text: str) -> int:
    if not (p.isascii() and p.isdigit()) or len(p) > 5 or not 1 <= int(p) <= 65535:
        raise ValueError(f"port {p!r} in {text!r} must be 1-65535 in ASCII digits")
    return int(p)


def parse_endpoint(text: str) -> tuple[Network, int]:
    """'10.0.0.0/24:8000', '[fd00::/64]:8000', '10.0.0.5', '[::1]:80' -> (network, port); port 0 = any port."""
    s = text
    if not 0 < len(s) <= MAX_ENDPOINT_LEN or not s.isascii() or not s.isprintable() or " " in s or "%" in s:
        raise ValueError(f"{show(text)} is not an address or CIDR (ASCII, at most {MAX_ENDPOINT_LEN} characters, "
                         "no spaces or zone ids)")
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


def _hostname(host: str, text: str) -> str:
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not 0 < len(host) <= MAX_HOST_LEN or not all(HOST_LABEL_RE.fullmatch(lb) for lb in labels):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    if all(lb.isdigit() for lb in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
    return host


def parse_hostport(text: str) -> tuple[str, int]:
    """'collector.example:4317', '10.0.0.1:4317', '[fd00::1]:4317' -> (host, port); port 1-65535, IPv6 in brackets."""
    if not 0 < len(text) <= MAX_HOST_LEN + 8 or not text.isascii() or not text.isprintable():
        raise ValueError(f"{show(text)} must be HOST:PORT in ASCII, at most {MAX_HOST_LEN + 8} characters")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError(f"{text!r} must be [IPv6]:PORT")
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        if "%" in host:
            raise ValueError(f"{text!r}: zone ids are not supported")
        return host, _port(text[end + 2:], text)
    if text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:4317")
    if text.count(":") == 0:
        raise ValueError(f"{text!r} must be HOST:PORT")
    host, p = text.split(":")
    return _hostname(host, text), _port(p, text)


def _path(v: Optional[Path], what: str) -> Optional[Path]:
    if v is not None:
        _text(str(v), what, MAX_TEXT_LEN)
    return v


# ---------------------------------------------------------------- models

class _Strict(BaseModel):
    # strict: no "80" for 80, no 1 for True, no 3.0 for 3; fields that parse text (paths, dates) opt out one by one.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)


class ProcessSelector(_Strict):
    exe: Optional[str] = None       # glob over /proc/PID/exe
    cmdline: Optional[str] = None   # glob over the space-joined command line
    uids: Optional[list[int]] = None   # the process's real and effective uid must both be one of these
    allow_any_user: bool = False    # opt-in: a cmdline selector without uids (any local user can write any argv)

    @field_validator("exe", "cmdline")
    @classmethod
    def _glob(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _text(v, "the glob", MAX_TEXT_LEN)

    @field_validator("uids")
    @classmethod
    def _uids(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(u < 0 or u > 0xFFFFFFFF for u in v)):
            raise ValueError("uids: a non-empty list of user ids (0..4294967295)")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> "ProcessSelector":
        if self.exe is None and self.cmdline is None:
            raise ValueError("a process selector needs exe or cmdline")
        if self.cmdline is not None and self.uids is None and not self.allow_any_user:
            raise ValueError("cmdline: any local user can put any command line in argv: add uids: [...] "
                             "(or allow_any_user: true)")
        return self

    def any_user(self) -> bool:
        """Whether any local user can run a process this selector matches."""
        return self.uids is None


# ---- Kubernetes (issue 11): names and label syntax as the API server validates them

DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")                     # RFC 1123 label, <= 63
DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")   # <= 253
LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")          # a label key's name, a value


def _dns_label(v: str, what: str) -> str:
    if not isinstance(v, str) or not DNS_LABEL_RE.fullmatch(v):
        raise ValueError(f"{what} {show(v)} is not a Kubernetes name (lower-case letters, digits and '-', at most 63)")
    return v


def _dns_subdomain(v: str, what: str) -> str:
    if not isinstance(v, str) or len(v) > 253 or not DNS_SUBDOMAIN_RE.fullmatch(v):
        raise ValueError(f"{what} {show(v)} is not a Kubernetes name (DNS subdomain, at most 253 characters)")
    return v


def label_key(v: str) -> str:
    prefix, slash, name = v.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        raise ValueError(f"label key {show(v)}: the prefix must be a DNS subdomain")
    if not LABEL_NAME_RE.fullmatch(name):
        raise ValueError(f"label key {show(v)} is not a label name (letters, digits, '-', '_', '.', at most 63, "
                         "alphanumeric at both ends)")
    return v


def label_value(v: str) -> str:
    if v and not LABEL_NAME_RE.fullmatch(v):
        raise ValueError(f"label value {show(v)} is not valid (empty, or letters, digits, '-', '_', '.', at most 63, "
                         "alphanumeric at both ends)")
    return v


class LabelRequirement(_Strict):
    """One matchExpressions entry: In/NotIn need values, Exists/DoesNotExist take none (as the API server says)."""
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return label_key(v)

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        for x in v:
            label_value(x)
        return v

    @model_validator(mode="after")
    def _arity(self) -> "LabelRequirement":
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Strict):
    """A Kubernetes LabelSelector: matchLabels and matchExpressions ANDed; {} matches everything."""
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelRequirement] = Field(default_factory=list, alias="matchExpressions")

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, x in v.items():
            label_key(k)
            label_value(x)
        return v


class _NamespaceChoice(_Strict):
    namespace: Optional[str] = None
    namespace_selector: Optional[LabelSelector] = Field(default=None, alias="namespaceSelector")

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _dns_label(v, "namespace")

    @model_validator(mode="after")
    def _one(self) -> "_NamespaceChoice":
        if (self.namespace is None) == (self.namespace_selector is None):
            raise ValueError("give exactly one of namespace and namespaceSelector (namespaceSelector: {} is every "
                             "namespace)")
        return self


class PodSelector(_NamespaceChoice):
    """An entry of select.pods (local pods): every given field must match. podSelector is required: {} is every pod
    of the namespace(s), as in a NetworkPolicy."""
    pod_selector: LabelSelector = Field(alias="podSelector")
    service_account: Optional[str] = Field(default=None, alias="serviceAccount")
    container: Optional[str] = None     # one container of the pod (others, and the pod level, do not match)

    @field_validator("service_account")
    @classmethod
    def _sa(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _dns_subdomain(v, "serviceAccount")

    @field_validator("container")
    @classmethod
    def _container(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _dns_label(v, "container")


class PodsSelector(_NamespaceChoice):
    """The pods of an endpoint (any node)."""
    pod_selector: LabelSelector = Field(alias="podSelector")


class ServiceRef(_Strict):
    namespace: str
    name: str

    @field_validator("namespace", "name")
    @classmethod
    def _names(cls, v: str) -> str:
        return _dns_label(v, "the name")


def _endpoint_ports(v: list[int]) -> list[int]:
    for p in v:
        if not 1 <= p <= 65535:
            raise ValueError(f"port {show(p)} must be 1-65535")
    return v


class ServiceEndpoint(_Strict):
    """A Service's ClusterIPs and the ready addresses of its EndpointSlices. ports: service ports (the endpoints'
    target ports follow by port name); empty = every port of the Service."""
    service: ServiceRef
    ports: list[int] = Field(default_factory=list)
    _ports = field_validator("ports")(_endpoint_ports)


class PodsEndpoint(_Strict):
    """The IPs of the matching pods on every node; ports empty = any port."""
    pods: PodsSelector
    ports: list[int] = Field(default_factory=list)
    _ports = field_validator("ports")(_endpoint_ports)


def _endpoint_kind(v: Any) -> Optional[str]:
    """A CIDR string, or a mapping with `service` or `pods`: picked by its key, never guessed."""
    if isinstance(v, str):
        return "cidr"
    if isinstance(v, dict) and ("service" in v) != ("pods" in v):
        return "service" if "service" in v else "pods"
    if isinstance(v, (ServiceEndpoint, PodsEndpoint)):
        return "service" if isinstance(v, ServiceEndpoint) else "pods"
    return None


def _cidr(v: str) -> str:
    parse_endpoint(v)
    return v


_ENDPOINT_TAGS = ("cidr", "service", "pods")
Endpoint = Annotated[Union[Annotated[str, AfterValidator(_cidr), Tag("cidr")], Annotated[ServiceEndpoint, Tag("service")],
                           Annotated[PodsEndpoint, Tag("pods")]],
                     Discriminator(_endpoint_kind, custom_error_type="endpoint",
                                   custom_error_message="an endpoint is a CIDR string or a mapping with exactly one of "
                                                        "service and pods")]


class KubernetesSettings(_Strict):
    unresolved: Literal["deny", "allow", "audit"] = "deny"
    kubeconfig: Optional[Path] = Field(default=None, strict=False)   # default: in-cluster config
    node_name: Optional[str] = None                                  # default: the NODE_NAME environment variable

    @field_validator("kubeconfig")
    @classmethod
    def _kubeconfig(cls, v: Optional[Path]) -> Optional[Path]:
        return _path(v, "kubeconfig")

    @field_validator("node_name")
    @classmethod
    def _node(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _dns_subdomain(v, "node_name")

    def node(self, environ: Optional[dict] = None) -> Optional[str]:
        return self.node_name or (os.environ if environ is None else environ).get("NODE_NAME") or None


class Select(_Strict):
    """Which local workloads are this identity. A process selector wins over the cgroup of the process (the kernel
    looks up process_identity first); for a cgroup, a pod selector wins over a cgroup glob; within each kind the
    first identity in file order wins."""
    cgroups: list[str] = Field(default_factory=list)   # globs over cgroup v2 paths relative to the cgroup2 mount
    processes: list[ProcessSelector] = Field(default_factory=list)
    pods: list[PodSelector] = Field(default_factory=list)

    @field_validator("cgroups")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for g in v:
            _text(g, f"cgroup glob {show(g)}", MAX_TEXT_LEN)
            if not g.startswith("/"):
                raise ValueError(f"cgroup glob {show(g)} must start with '/' (relative to the cgroup2 mount)")
        return v


class Deprecation(_Strict):
    sunset: datetime = Field(strict=False)
    successor: Optional[str] = None

    @field_validator("sunset", mode="before")
    @classmethod
    def _date(cls, v: Any) -> Any:
        if isinstance(v, (bool, int, float)):
            raise ValueError("sunset must be a date (2026-12-31) or an RFC 3339 time (2026-12-31T00:00:00Z), "
                             "not a number")
        if isinstance(v, date) and not isinstance(v, datetime):
            return datetime(v.year, v.month, v.day, tzinfo=timezone.utc)
        if isinstance(v, str):
            _text(v, "sunset", MAX_ENDPOINT_LEN)
        return v

    @field_validator("sunset")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)


class LlmCapture(_Strict):
    """What aimesh records of the LLM API calls made to this identity (plaintext capture, bpf/capture.c)."""
    protocol: Literal["auto", "openai", "anthropic", "ollama", "off"] = "auto"   # auto: recognised by method, path
    capture_content: Optional[bool] = None   # prompt and completion text, redacted, up to a cap; None: the global llm:

    @property
    def enabled(self) -> bool:
        return self.protocol != "off"


MAX_MODEL_LEN = 256      # a model name or glob


def _model_glob(v: str, what: str) -> str:
    """A glob over model names (fnmatch: *, ?, [...]): printable, no spaces, every '[' closed."""
    _text(v, what, MAX_MODEL_LEN)
    if " " in v:
        raise ValueError(f"{what} {show(v)} has a space")
    i = v.find("[")
    while i >= 0:
        j = i + 1
        if v[j:j + 1] == "!":
            j += 1
        if v[j:j + 1] == "]":   # a leading ']' is a member of the set
            j += 1
        k = v.find("]", j)
        if k < 0:
            raise ValueError(f"{what} {show(v)}: the '[' at offset {i} is not closed")
        i = v.find("[", k + 1)
    return v


def _regular_file_stat(v: Path, what: str) -> os.stat_result:
    """The stat of `v`, a valid path naming an existing regular file."""
    _path(v, what)
    try:
        st = os.stat(v)
    except OSError as e:
        raise ValueError(f"{what} {str(v)!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {str(v)!r} is not a regular file")
    return st


def _secret_file(v: Path, what: str) -> Path:
    """An existing regular file, mode 0600 or 0400, owned by root: the gateway reads a provider key from it."""
    st = _regular_file_stat(v, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode not in (0o600, 0o400):
        raise ValueError(f"{what} {str(v)!r} has mode {mode:04o}; it holds a key: chmod 0600 (or 0400)")
    if st.st_uid != 0:
        raise ValueError(f"{what} {str(v)!r} is owned by uid {st.st_uid}; it must be owned by root")
    return v


def _existing_file(v: Path, what: str) -> Path:
    _regular_file_stat(v, what)
    return v


class ModelLifecycle(_Strict):
    """One model served by an LLM destination, and when it retires (the gateway rewrites it to the successor after
    the sunset, or refuses it without one)."""
    name: str
    deprecated: Optional[Deprecation] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _text(v, "model name", MAX_MODEL_LEN)
        if any(c in v for c in "*?[ "):
            raise ValueError(f"model name {show(v)} must be a name, not a glob (no *, ?, [ or spaces)")
        return v

    @model_validator(mode="after")
    def _successor(self) -> "ModelLifecycle":
        succ = self.deprecated.successor if self.deprecated else None
        if succ is not None:
            ModelLifecycle._name(succ)
            if succ == self.name:
                raise ValueError(f"deprecated.successor: model {self.name!r} cannot succeed itself")
        return self


class LlmSettings(LlmCapture):
    """llm: of an identity: what aimesh records of its LLM API calls (LlmCapture) and, with gateway: enforce, the L7
    gateway's handling of connections to it (issue 10)."""
    gateway: Literal["off", "enforce"] = "off"
    tls: Optional[Literal["intercept", "originate"]] = None   # unset: the clients and the upstream speak plain HTTP
    upstream_ca: Optional[Path] = Field(default=None, strict=False)    # roots the gateway trusts upstream
    api_key_file: Optional[Path] = Field(default=None, strict=False)   # the provider key the gateway injects
    models: list[ModelLifecycle] = Field(default_factory=list, max_length=10_000)

    @field_validator("upstream_ca")
    @classmethod
    def _ca(cls, v: Optional[Path]) -> Optional[Path]:
        return None if v is None else _existing_file(v, "upstream_ca")

    @field_validator("api_key_file")
    @classmethod
    def _key(cls, v: Optional[Path]) -> Optional[Path]:
        return None if v is None else _secret_file(v, "api_key_file")

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelLifecycle]) -> list[ModelLifecycle]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"model {m.name!r} is listed twice")
            seen.add(m.name)
        return v

    @model_validator(mode="after")
    def _needs_gateway(self) -> "LlmSettings":
        if self.gateway == "enforce":
            if self.protocol == "off":
                raise ValueError("gateway: enforce needs a protocol (protocol is off)")
            return self
        for name in ("tls", "upstream_ca", "api_key_file"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: takes effect in the L7 gateway only: set gateway: enforce")
        if self.models:
            raise ValueError("models: model lifecycle takes effect in the L7 gateway only: set gateway: enforce")
        return self

    @model_validator(mode="after")
    def _upstream_ca_tls(self) -> "LlmSettings":
        if self.upstream_ca is not None and self.tls is None:
            raise ValueError("upstream_ca: the upstream is plain HTTP without tls (intercept or originate)")
        return self

    @property
    def enforced(self) -> bool:
        return self.gateway == "enforce"

    @property
    def needs_l7(self) -> bool:
        """Every connection a policy allows to this destination goes through the gateway."""
        return self.enforced and bool(self.models or self.api_key_file is not None or self.tls == "originate")


LLM_DEFAULT_ON = LlmCapture()
LLM_DEFAULT_OFF = LlmCapture(protocol="off")


class Identity(_Strict):
    name: str
    kind: Literal["model", "dataset", "service", "external"]
    version: Optional[str] = None
    mode: Optional[Literal["enforce", "audit"]] = None
    governed: Optional[bool] = None
    select: Select = Field(default_factory=Select)
    endpoints: list[Endpoint] = Field(default_factory=list)
    deprecated: Optional[Deprecation] = None
    llm: Optional[LlmSettings] = None   # default: auto for kinds model and external, off otherwise

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"name {show(v)} must match [a-z0-9][a-z0-9._-]* and have at most 63 characters")
        if v in RESERVED_IDENTITIES or v == GATEWAY:
            raise ValueError(f"name {v!r} is reserved")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, (bool, int, float, date)):
            raise ValueError("version must be a string: quote it (version: \"3.10\"), YAML reads 3.10 as the number "
                             "3.1")
        if isinstance(v, str):
            _text(v, "version", MAX_VERSION_LEN)
        return v

    @property
    def cidr_endpoints(self) -> list[str]:
        return [e for e in self.endpoints if isinstance(e, str)]

    @property
    def k8s_endpoints(self) -> list[Union[ServiceEndpoint, PodsEndpoint]]:
        return [e for e in self.endpoints if not isinstance(e, str)]

    @property
    def is_governed(self) -> bool:
        if self.governed is not None:
            return self.governed
        return self.kind != "service"

    @property
    def llm_capture(self) -> LlmCapture:
        if self.llm is not None:
            return self.llm
        return LLM_DEFAULT_ON if self.kind in ("model", "external") else LLM_DEFAULT_OFF

    @property
    def gateway_enforced(self) -> bool:
        """llm.gateway: enforce: connections a model policy covers go through the node's L7 gateway."""
        return self.llm is not None and self.llm.enforced


def _names(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


L7_POLICY_FIELDS = ("models", "max_tokens", "cap_max_tokens", "tokens_per_minute", "requests_per_minute",
                    "tokens_per_day")
MAX_TOKENS_LIMIT = 1 << 31      # any count of tokens or requests in a policy


class Policy(_Strict):
    from_: list[str] = Field(alias="from")
    to: list[str]
    ports: list[int] = Field(default_factory=list)   # empty = any port
    protocol: Literal["tcp", "udp", "any"] = "any"
    # same-node fast path for this pair only (TCP), even with the top-level `fast_path: false`: for workloads known
    # not to depend on what it changes (FAST_PATH_CAVEAT; README "Same-node fast path")
    fast_path: bool = False
    # model policy (issue 10), judged per request by the L7 gateway; all optional
    models: Optional[list[str]] = Field(default=None, max_length=1000)   # globs over the request's model; None: any
    max_tokens: Optional[int] = None           # a request asking for more is refused (or capped: cap_max_tokens)
    cap_max_tokens: bool = False
    tokens_per_minute: Optional[int] = None    # input + output, per source identity and destination
    requests_per_minute: Optional[int] = None
    tokens_per_day: Optional[int] = None

    _listify = field_validator("from_", "to", mode="before")(_names)

    @field_validator("models")
    @classmethod
    def _globs(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list allows no model: leave models out to allow any")
        for g in v:
            _model_glob(g, "model glob")
        return v

    @field_validator("max_tokens", "tokens_per_minute", "requests_per_minute", "tokens_per_day")
    @classmethod
    def _positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None:
            if v <= 0:
                raise ValueError("must be > 0")
            if v > MAX_TOKENS_LIMIT:
                raise ValueError(f"must be at most {MAX_TOKENS_LIMIT}")
        return v

    @model_validator(mode="after")
    def _l7(self) -> "Policy":
        if self.cap_max_tokens and self.max_tokens is None:
            raise ValueError("cap_max_tokens: caps requests at max_tokens, which is not set")
        if self.has_l7_fields and self.protocol == "udp":
            raise ValueError(f"protocol: udp cannot carry a model policy ({', '.join(self.l7_fields)})")
        return self

    @property
    def l7_fields(self) -> list[str]:
        return [f for f in L7_POLICY_FIELDS if getattr(self, f) not in (None, False)]

    @property
    def has_l7_fields(self) -> bool:
        return bool(self.l7_fields)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {show(p)} must be 1-65535")
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

    _listify = field_validator("from_", mode="before")(_names)

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
    tls_ca: Optional[Path] = Field(default=None, strict=False)
    tls_cert: Optional[Path] = Field(default=None, strict=False)   # client certificate for mutual TLS (with tls_key)
    tls_key: Optional[Path] = Field(default=None, strict=False)
    tls_server_name: Optional[str] = None
    token_file: Optional[Path] = Field(default=None, strict=False)  # bearer token, first line
    batch_size: int = Field(default=500, ge=1, le=100_000)
    flush_interval: float = Field(default=1.0, gt=0, le=60)
    queue_records: int = Field(default=100_000, ge=1, le=10_000_000)
    spool_dir: Optional[Path] = Field(default=Path("/var/lib/aimesh/spool"), strict=False)   # null: memory only
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, le=1 << 40)

    @field_validator("address")
    @classmethod
    def _address(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_hostport(v)
        return v

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _text(v, "agent_id", MAX_HOST_LEN)

    @field_validator("tls_server_name")
    @classmethod
    def _server_name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            if not v.isascii():
                raise ValueError(f"tls_server_name {show(v)} must be ASCII (write IDNs as xn--)")
            _hostname(v, v)
        return v

    @field_validator("tls_ca", "tls_cert", "tls_key", "token_file", "spool_dir")
    @classmethod
    def _paths(cls, v: Optional[Path]) -> Optional[Path]:
        return _path(v, "the path")

    @model_validator(mode="after")
    def _pair(self) -> "CollectorSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        return self


HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")   # an HTTP token (RFC 9110)
MAX_OTLP_HEADERS = 32


class OtlpSettings(_Strict):
    """Model calls as OTLP spans (agent/export/otlp.py), over OTLP/HTTP protobuf."""
    endpoint: str                                          # the traces URL, e.g. http://127.0.0.1:4318/v1/traces
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every export (an API key, a tenant)
    timeout: float = Field(default=10.0, gt=0, le=300)     # seconds per export
    service_name: str = "aimesh-agent"
    max_queue_size: int = Field(default=2048, ge=1, le=1_000_000)        # spans waiting; more are dropped, counted
    max_export_batch_size: int = Field(default=512, ge=1, le=1_000_000)
    schedule_delay: float = Field(default=5.0, gt=0, le=3600)           # seconds between exports

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        from urllib.parse import urlsplit
        _text(v, "endpoint", MAX_TEXT_LEN)
        try:
            u = urlsplit(v)
            port = u.port
        except ValueError as e:
            raise ValueError(f"{show(v)} is not a URL: {e}") from None
        if u.scheme not in ("http", "https") or not u.hostname or (port is not None and not 1 <= port <= 65535):
            raise ValueError(f"{show(v)} must be an http(s) URL like http://host:4318/v1/traces")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_OTLP_HEADERS:
            raise ValueError(f"at most {MAX_OTLP_HEADERS} headers, got {len(v)}")
        for name, value in v.items():
            if not HEADER_NAME_RE.fullmatch(name):
                raise ValueError(f"header name {show(name)} is not an HTTP token")
            if len(value) > MAX_TEXT_LEN or not value.isprintable() or not value.isascii():
                raise ValueError(f"header {name}: the value must be printable ASCII, at most {MAX_TEXT_LEN} "
                                 "characters")
        return v

    @field_validator("service_name")
    @classmethod
    def _service(cls, v: str) -> str:
        return _text(v, "service_name", MAX_HOST_LEN)

    @model_validator(mode="after")
    def _batch(self) -> "OtlpSettings":
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError(f"max_export_batch_size ({self.max_export_batch_size}) must not exceed max_queue_size "
                             f"({self.max_queue_size})")
        return self


class GenAiSettings(_Strict):
    """The gen_ai_client_* metrics: the request-model label keeps names matching `model_labels` (globs), the first
    `max_models` distinct ones; every other name is `other`."""
    model_labels: list[str] = Field(default_factory=lambda: ["*"], max_length=1000)
    max_models: int = Field(default=50, ge=0, le=10_000)

    @field_validator("model_labels")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for i, g in enumerate(v):
            _text(g, f"model_labels[{i}]", MAX_HOST_LEN)
        return v


class Telemetry(_Strict):
    interim_interval: float = Field(default=60.0, ge=0, le=86400)   # seconds; 0: long connections report at close only
    udp_window: float = Field(default=10.0, gt=0, le=3600)          # seconds per UDP aggregate
    otlp: Optional[OtlpSettings] = None                            # unset: no spans
    genai: GenAiSettings = Field(default_factory=GenAiSettings)

    def sinks_differ(self, other: "Telemetry") -> Optional[str]:
        """The section whose change a running agent cannot apply (its model-call sinks are built at start)."""
        for name in ("otlp", "genai"):
            if getattr(self, name) != getattr(other, name):
                return name
        return None


_D = abi.Limits()
DEFAULT_CAPTURE_REQUEST_BYTES = 1 << 20
DEFAULT_CAPTURE_RESPONSE_BYTES = 4 << 20
MAX_CAPTURE_BUDGET = (1 << 32) - 1   # a __u32 in runtime_config
RUNTIME_LIMITS = ("capture_max_request_bytes", "capture_max_response_bytes")   # limits: keys that are not capacities
_MAP = {"ge": 1, "le": MAX_MAP_ENTRIES}
_RING = {"ge": 1, "le": MAX_RINGBUF_PAGES}


class LimitSettings(_Strict):
    """Map capacities (abi.Limits, same names): map sizes 1 to 1048576 entries, ring buffers 1 to 16384 pages (a power
    of two). The five policy maps hold two generations at once during a reload; see agent/policy/capacity.py."""
    max_cgroups: int = Field(default=_D.max_cgroups, **_MAP)
    max_processes: int = Field(default=_D.max_processes, **_MAP)
    max_endpoints: int = Field(default=_D.max_endpoints, **_MAP)
    max_local_endpoints: int = Field(default=_D.max_local_endpoints, **_MAP)
    max_identities: int = Field(default=_D.max_identities, **_MAP)
    max_policies: int = Field(default=_D.max_policies, **_MAP)
    max_redirects: int = Field(default=_D.max_redirects, **_MAP)
    max_backends: int = Field(default=_D.max_backends, **_MAP)
    max_reverse_nat: int = Field(default=_D.max_reverse_nat, **_MAP)
    max_udp_flows: int = Field(default=_D.max_udp_flows, **_MAP)
    max_local_peers: int = Field(default=_D.max_local_peers, **_MAP)
    max_fastpath_sockets: int = Field(default=_D.max_fastpath_sockets, **_MAP)
    max_decision_keys: int = Field(default=_D.max_decision_keys, **_MAP)
    ringbuf_pages: int = Field(default=_D.ringbuf_pages, **_RING)
    flow_ringbuf_pages: int = Field(default=_D.flow_ringbuf_pages, **_RING)
    max_capture_sockets: int = Field(default=_D.max_capture_sockets, **_MAP)
    capture_ringbuf_pages: int = Field(default=_D.capture_ringbuf_pages, **_RING)
    # bytes per capture_events record (compiled in: -DCAPTURE_CHUNK); one send/receive copies at most
    # abi.CAPTURE_CHUNKS_PER_CALL (256) chunks, so 1 MiB at the default: the rest of that call is a counted gap
    capture_chunk: int = Field(default=_D.capture_chunk, ge=64, le=16384)
    # Runtime settings (runtime_config, changed by a reload; not map capacities): bytes the capture copies per request
    # (a run of sends) and per response (a run of receives) on one connection; past them bytes are counted, not
    # copied, and the record says truncated.
    capture_max_request_bytes: int = Field(default=DEFAULT_CAPTURE_REQUEST_BYTES, ge=1, le=MAX_CAPTURE_BUDGET)
    capture_max_response_bytes: int = Field(default=DEFAULT_CAPTURE_RESPONSE_BYTES, ge=1, le=MAX_CAPTURE_BUDGET)

    @field_validator("ringbuf_pages", "flow_ringbuf_pages", "capture_ringbuf_pages")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("ring buffer pages must be a power of two")
        return v


class GatewaySettings(_Strict):
    """The node's L7 gateway (issue 10): where it listens, the address connects are rewritten to, its CA."""
    listen: str = "127.0.0.1:15001"
    redirect_address: Optional[str] = None        # default: listen
    ca_dir: Path = Field(default=Path("/var/lib/aimesh/ca"), strict=False)   # the node CA (key 0600, kept)
    mode: Optional[Literal["enforce", "audit"]] = None   # default: the global mode
    # requests to endpoints the gateway does not understand (nor batches, whose models it does not read): refused,
    # served, or served and recorded would_deny (agent/l7/endpoints.py)
    unknown_endpoints: Literal["deny", "allow", "audit"] = "deny"

    @field_validator("listen", "redirect_address")
    @classmethod
    def _address(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_backend(v)
        return v

    @field_validator("ca_dir")
    @classmethod
    def _ca_dir(cls, v: Path) -> Path:
        _path(v, "ca_dir")
        if not v.is_absolute():
            raise ValueError(f"ca_dir {str(v)!r} must be an absolute path")
        return v

    @model_validator(mode="after")
    def _concrete(self) -> "GatewaySettings":
        if self.redirect_address is None and self.redirect[0].is_unspecified:
            raise ValueError(f"redirect_address: needed when listen ({self.listen}) is a wildcard address: connects "
                             "are rewritten to one address")
        if self.redirect_address is not None and self.redirect[0].is_unspecified:
            raise ValueError(f"redirect_address: {self.redirect_address} is a wildcard address")
        return self

    @property
    def redirect(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        """(address, port) the kernel rewrites connects that need the gateway to."""
        return parse_backend(self.redirect_address or self.listen)


def _endpoint_slot(net: Network, port: int) -> tuple[bytes, int, int]:
    """What an endpoint occupies in endpoint_identity: IPv4 as v4-mapped IPv6, like the compiler's keys."""
    if net.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + net.network_address.packed, net.prefixlen + 96, port
    return net.network_address.packed, net.prefixlen, port


class NodeLlmSettings(_Strict):
    """Node-wide model-call settings: content capture's default, its size cap and the redaction rules (applied in the
    agent before any text leaves the node; the built-in rules for API keys and e-mail addresses always apply)."""
    capture_content: bool = False
    content_max_chars: int = Field(default=16384, ge=0, le=1 << 20)   # of prompt and of completion text, each
    redact: list[str] = Field(default_factory=list, max_length=64)    # RE2 regular expressions (agent/l7/redact.py)

    @field_validator("redact")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for i, r in enumerate(v):
            _text(r, f"redact.{i}", 512)
            try:
                compile_redaction(r)
            except RedactionPatternError as e:
                raise ValueError(f"redact.{i}: {show(r)} is refused: RE2 cannot compile it ({e}); redaction runs in "
                                 "linear time, so backreferences and lookaround are not supported") from None
        return v


# Why `fast_path` is off by default: what tests/kernel/test_socket_conformance.py sees differ with it on, on this
# kernel (6.18). `aimesh check` prints it.
FAST_PATH_CAVEAT = (
    "the same-node fast path changes what applications see (issue 23; tests/kernel/test_socket_conformance.py, "
    "14-15 of 19 scenarios identical): a blocking recv after shutdown(SHUT_WR) fails with EAGAIN (5-45% of calls here), "
    "splice(2) from the socket reads nothing, a writer gets no back-pressure from a slow reader (a non-blocking send never "
    "gets EAGAIN; the reader's memory grows instead), a peer that closes with unread data sends FIN instead of RST (the writer sees EOF or EPIPE, not ECONNRESET); the kernel's "
    "sockmap cannot avoid these (README \"Same-node fast path\"): turn it on only for pairs known not to depend on them "
    "(a policy's fast_path: true)")


class Config(_Strict):
    mode: Literal["enforce", "audit"] = "enforce"
    dns: Literal["allow", "deny"] = "allow"   # allow: port 53 to the resolvers (resolv.conf and dns_resolvers)
    dns_resolvers: list[str] = Field(default_factory=list, max_length=MAX_DNS_RESOLVERS)   # IP addresses
    fast_path: bool = False            # same-node TCP between governed workloads skips the loopback stack: off
    #                                    by default until it passes the socket conformance suite (FAST_PATH_CAVEAT)
    identities: list[Identity] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)
    redirects: list[Redirect] = Field(default_factory=list)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    kubernetes: Optional[KubernetesSettings] = None
    llm: NodeLlmSettings = Field(default_factory=NodeLlmSettings)

    def capture_content(self, ident: "Identity") -> bool:
        """Content capture for calls to `ident`: its own llm.capture_content, else the global llm.capture_content."""
        own = ident.llm_capture.capture_content
        return self.llm.capture_content if own is None else own
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @property
    def uses_gateway(self) -> bool:
        """Some identity has llm.gateway: enforce: the node runs the L7 gateway (reserved identity `gateway`)."""
        return any(i.gateway_enforced for i in self.identities)

    def pair_needs_l7(self, policy: "Policy", dst: str) -> bool:
        """Connections this policy allows to dst go through the gateway: the policy has model fields, or the
        destination has model lifecycle entries, a provider key or tls: originate (and gateway: enforce)."""
        ident = self.identity(dst)
        if ident is None or not ident.gateway_enforced:
            return False
        return policy.has_l7_fields or ident.llm.needs_l7

    @property
    def uses_kubernetes(self) -> bool:
        """A kubernetes section, a pod selector or a Service/pods endpoint: the agent watches the API server and
        kubepods cgroups of pods not known yet get the reserved identity `unresolved`."""
        return self.kubernetes is not None or any(i.select.pods or i.k8s_endpoints for i in self.identities)

    @property
    def k8s(self) -> KubernetesSettings:
        return self.kubernetes or KubernetesSettings()

    @field_validator("dns_resolvers")
    @classmethod
    def _dns_resolvers(cls, v: list[str]) -> list[str]:
        for a in v:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(f"dns_resolvers: {show(a)} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _references(self) -> "Config":
        seen: set[str] = set()
        for i, ident in enumerate(self.identities):
            if ident.name in seen:
                raise ValueError(f"identities.{i}.name: {ident.name!r} is defined twice")
            seen.add(ident.name)
        known = seen | {n for n in RESERVED_IDENTITIES if n != UNRESOLVED or self.uses_kubernetes}
        self._check_successors(seen)
        for i, p in enumerate(self.policies):
            for field, refs in (("from", p.from_), ("to", p.to)):
                for r in refs:
                    if r not in known:
                        raise ValueError(f"policies.{i}.{field}: unknown identity {show(r)}")
        for i, r in enumerate(self.redirects):
            for s in r.from_:
                if s not in known:
                    raise ValueError(f"redirects.{i}.from: unknown identity {show(s)}")
            if r.to not in seen:
                raise ValueError(f"redirects.{i}.to: unknown identity {show(r.to)}")
        self._check_model_policies()
        self._check_endpoints()
        self._check_redirect_keys()
        self._check_expansion()
        return self

    def _check_successors(self, seen: set[str]) -> None:
        successor: dict[str, str] = {}
        for i, ident in enumerate(self.identities):
            d = ident.deprecated
            if d and d.successor is not None:
                if d.successor not in seen:
                    raise ValueError(f"identities.{i}.deprecated.successor: unknown identity {show(d.successor)}")
                if d.successor == ident.name:
                    raise ValueError(f"identities.{i}.deprecated.successor: {ident.name!r} cannot succeed itself")
                successor[ident.name] = d.successor
        index = {ident.name: i for i, ident in enumerate(self.identities)}
        done: set[str] = set()   # names whose chain is known to end: each name is walked once
        for ident in self.identities:
            chain: list[str] = []
            on_chain: set[str] = set()
            n: Optional[str] = ident.name
            while n is not None and n not in done:
                if n in on_chain:
                    cycle = chain[chain.index(n):] + [n]
                    raise ValueError(f"identities.{index[n]}.deprecated.successor: successors form a cycle "
                                     f"({' -> '.join(cycle)})")
                chain.append(n)
                on_chain.add(n)
                n = successor.get(n)
            done.update(chain)

    def _check_model_policies(self) -> None:
        """A model policy needs every destination it names behind the gateway: else nothing would enforce it."""
        index = {ident.name: i for i, ident in enumerate(self.identities)}
        for i, p in enumerate(self.policies):
            if not p.has_l7_fields:
                continue
            for dst in p.to:
                ident = self.identity(dst)
                if ident is None:
                    raise ValueError(f"policies.{i}.to: {dst!r} is a reserved identity; a model policy "
                                     f"({', '.join(p.l7_fields)}) needs a destination with llm.gateway: enforce")
                if not ident.gateway_enforced:
                    raise ValueError(f"policies.{i}: a model policy ({', '.join(p.l7_fields)}) to {dst!r} needs "
                                     f"identities.{index[dst]}.llm.gateway: enforce ({dst!r} has gateway: off)")

    def _check_endpoints(self) -> None:
        owner: dict[tuple[bytes, int, int], tuple[str, str]] = {}
        for i, ident in enumerate(self.identities):
            for j, e in enumerate(ident.endpoints):
                if not isinstance(e, str):
                    continue   # resolved from the cluster at run time (agent/identity/k8s/resolve.py)
                slot = _endpoint_slot(*parse_endpoint(e))
                if slot in owner:
                    where, first = owner[slot]
                    raise ValueError(f"identities.{i}.endpoints.{j}: {e!r} is the same endpoint as {first!r} "
                                     f"of {where}")
                owner[slot] = (f"identities.{i} ({ident.name})", e)

    def _check_redirect_keys(self) -> None:
        first: dict[tuple[Optional[str], str], int] = {}
        for i, r in enumerate(self.redirects):
            for s in r.from_ or [None]:
                key = (s, r.to)
                if key in first:
                    src = "any source" if s is None else repr(s)
                    raise ValueError(f"redirects.{i}: the redirect from {src} to {r.to!r} is also "
                                     f"redirects.{first[key]}")
                first[key] = i

    def _check_expansion(self) -> None:
        """Refuse before compiling what cannot fit: policies and redirect backends multiply (from x to x ports)."""
        policies = sum(len(p.from_) * len(p.to) * max(1, len(p.ports)) * (2 if p.protocol == "any" else 1)
                       for p in self.policies)
        if policies > self.limits.max_policies:
            raise ValueError(f"policies: map policy_verdict: the config needs {policies} entries, "
                             f"capacity {self.limits.max_policies} (limits.max_policies)")
        backends = sum(max(1, len(r.from_)) * len(r.backends) for r in self.redirects)   # lifecycle ones: linear
        if backends > self.limits.max_backends:
            raise ValueError(f"redirects: map redirect_backend: the config needs {backends} entries, "
                             f"capacity {self.limits.max_backends} (limits.max_backends)")

    def identity(self, name: str) -> Optional[Identity]:
        return next((i for i in self.identities if i.name == name), None)


def limits_of(config: Config) -> abi.Limits:
    """The map capacities the config asks for (its `limits:` section, abi.Limits defaults for what it leaves out).
    The runtime settings of `limits:` (RUNTIME_LIMITS) are not capacities: the datapath takes them at each reload."""
    return abi.Limits(**config.limits.model_dump(exclude=set(RUNTIME_LIMITS)))


# ---------------------------------------------------------------- YAML

class _Checks:
    """What the loaders add to PyYAML's safe loading: anchors, aliases, explicit tags, merge keys, non-string and
    duplicate keys and nesting deeper than MAX_DEPTH are refused while composing, so nothing is ever expanded and a
    hostile document costs no more than its size."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"YAML aliases are not allowed (*{event.anchor})",
                                              event.start_mark)
        if event.anchor is not None:
            raise yaml.composer.ComposerError(None, None, f"YAML anchors are not allowed (&{event.anchor})",
                                              event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise yaml.composer.ComposerError(None, None, f"YAML tags are not allowed ({event.tag})", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def compose_scalar_node(self, anchor):
        """Composer's, without the end mark nobody reads: a file of tiny scalars takes a quarter less memory."""
        event = self.get_event()
        return yaml.ScalarNode(self.resolve(yaml.ScalarNode, event.value, event.implicit), event.value,
                               event.start_mark, None, style=event.style)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    what = show(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "a collection"
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        what = "a merge key (<<)"
                    raise yaml.constructor.ConstructorError(None, None, f"keys must be strings, not {what}",
                                                            key_node.start_mark)
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key_node.value)}",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return SafeConstructor.construct_mapping(self, node, deep=deep)


class _PyLoader(_Checks, yaml.SafeLoader):
    """Pure-Python scanner and parser."""


if CParser is not None:
    class _CLoader(_Checks, CParser, Composer, SafeConstructor, Resolver):
        """libyaml's scanner and parser (about 2.5x faster) under the same Python composer and checks."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

        # CParser composes in C (without our checks): take every composing step from the Python Composer.
        get_single_node = Composer.get_single_node
        compose_document = Composer.compose_document
        compose_scalar_node = _Checks.compose_scalar_node
        compose_sequence_node = Composer.compose_sequence_node
        compose_mapping_node = Composer.compose_mapping_node

    LOADERS: tuple[type, ...] = (_CLoader, _PyLoader)
else:
    LOADERS = (_PyLoader,)


def _checked(construct):
    def run(loader, node):
        try:
            return construct(loader, node)
        except (ValueError, OverflowError) as e:
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(None, None, f"{show(node.value)} is not a valid {kind}: {e}",
                                                    node.start_mark) from None
    return run


for _loader in LOADERS:
    for _tag, _construct in (("timestamp", SafeConstructor.construct_yaml_timestamp),
                             ("int", SafeConstructor.construct_yaml_int),
                             ("float", SafeConstructor.construct_yaml_float)):
        _loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _checked(_construct))


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        return f"not valid YAML: character U+{code:04X} at offset {e.position} is not allowed ({e.reason})"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        what = " ".join(s for s in (e.context, e.problem) if s)
        return f"{where}not valid YAML: {what}"
    return f"not valid YAML: {e}"


def _parse_yaml(text: str, loader_type: Optional[type] = None) -> Any:
    loader = (loader_type or LOADERS[0])(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("the file holds no YAML document (empty, blank or only comments)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _format(err: ValidationError) -> str:
    errors = err.errors()
    e = errors[0]
    raw = e["loc"]
    # an endpoint's union tag (endpoints.<i>.<tag>...) is ours, not a field of the file
    raw = [p for j, p in enumerate(raw)
           if not (j >= 2 and raw[j - 2] == "endpoints" and isinstance(raw[j - 1], int) and p in _ENDPOINT_TAGS)]
    loc = ".".join(str(p) if str(p).isprintable() and len(str(p)) <= MAX_SHOWN else show(p) for p in raw)
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    if isinstance(value, (dict, list)) and e["type"] in ("value_error", "missing"):
        shown = ""   # a model's own check or a missing field: the message says what is wrong
    elif isinstance(value, dict):
        shown = " (got a mapping)"
    elif isinstance(value, list):
        shown = f" (got a list of {len(value)})"
    else:
        shown = "" if value is None else f" (got {show(value)})"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{shown}{more}" if loc else f"{msg}{more}"


def _validate(data: Any, now: Optional[datetime]) -> Config:
    if data is None:
        raise ConfigError("the document is empty (null): the top level must be a mapping")
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    # A config that loads must also compile and fit its maps, two generations at once (what a reload needs).
    from agent.policy.capacity import check_capacity
    from agent.policy.compile import compile_image
    from agent.policy.identities import IdentityNumbering
    try:
        image = compile_image(cfg, IdentityNumbering(), 0, now or datetime.now(timezone.utc))
    except ValueError as e:
        raise ConfigError(f"does not compile: {e}") from None
    check_capacity(image, limits_of(cfg))
    return cfg


def parse_config(text: str, source: str = "<config>", now: Optional[datetime] = None) -> Config:
    """YAML text -> a Config that compiles and fits its limits; ConfigError with one line '<source>: ...' otherwise."""
    try:
        return _validate(_parse_yaml(text.removeprefix("\ufeff")), now)
    except ConfigError as e:
        msg = f"{source}: {e}"
    except yaml.YAMLError as e:
        msg = f"{source}: {_yaml_problem(e)}"
    except RecursionError:
        msg = f"{source}: nested too deeply"
    except (ValueError, OverflowError) as e:   # the parser's own, should any slip through
        msg = f"{source}: cannot parse: {type(e).__name__}: {e}"
    raise ConfigError(one_line(msg))


def read_config_bytes(path: Path, cap: int = MAX_CONFIG_BYTES) -> bytes:
    """At most cap bytes of a regular file; never blocks (FIFOs, devices and sockets are refused by fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(one_line(f"{path}: cannot read: {e.strerror or e}")) from None
    except ValueError as e:  # a NUL in the path
        raise ConfigError(one_line(f"{path}: cannot read: {e}")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(one_line(f"{path}: not a regular file"))
        chunks, size = [], 0
        while size <= cap:
            try:
                chunk = os.read(fd, cap + 1 - size)
            except BlockingIOError:  # a regular file never does this; refuse rather than wait
                raise ConfigError(one_line(f"{path}: cannot read: it would block")) from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise ConfigError(one_line(f"{path}: the file is larger than {cap} bytes"))
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(one_line(f"{path}: cannot read: {e.strerror or e}")) from None
    finally:
        os.close(fd)


def decode_config(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(one_line(f"{source}: not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}")) from None


def load_config(path: Path, now: Optional[datetime] = None) -> Config:
    """Read, parse and validate the config file at path; raises ConfigError (one line) and nothing else."""
    return parse_config(decode_config(read_config_bytes(Path(path)), str(path)), str(path), now)
