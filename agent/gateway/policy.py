"""The gateway's policy: what each (source identity, destination identity) pair may ask of a model API. Pure.

`GatewayPolicy.from_config_dict` builds it from the config's plain sections (`identities`, `policies`, `gateway`,
`mode`: what agent/config.py's model dumps); `to_json`/`from_json` are the file the agent writes and the gateway
reads (`gateway-policy.json`). `decide` judges one request: the model (after a retired model's rewrite to its
successor), then `max_tokens`. Budgets are judged by agent/gateway/budget.py; `budget_refusal` gives their error.

Refusals carry the HTTP status, headers and the JSON body in the destination's error shape (OpenAI's
`{"error": {message, type, param, code}}`, Anthropic's `{"type": "error", "error": {type, message}}`) so the SDKs
raise their own exceptions (403 -> PermissionDeniedError, 400 -> BadRequestError, 429 -> RateLimitError).
"""
from __future__ import annotations

import enum
import fnmatch
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

DEFAULT_OUTPUT_RESERVATION = 4096   # output tokens reserved for a request that names no max_tokens
FORMAT = 1
UNKNOWN_ENDPOINTS = ("deny", "allow", "audit")


class PolicyError(ValueError):
    """The policy file or config section is malformed; the message names the field."""


class Outcome(str, enum.Enum):
    SERVED = "served"
    REFUSED = "refused"
    WOULD_DENY = "would_deny"


class TlsMode(str, enum.Enum):
    NONE = "none"             # plaintext both ways
    INTERCEPT = "intercept"   # client TLS terminated with a node-CA leaf; verified TLS upstream
    ORIGINATE = "originate"   # client plaintext; TLS upstream


@dataclass(frozen=True, slots=True)
class ModelLifecycle:
    name: str
    sunset: datetime | None
    successor: str | None


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    protocol: str                               # openai | anthropic | ollama
    tls: TlsMode
    upstream_ca: str | None
    api_key_file: str | None
    endpoints: tuple[str, ...]
    models: tuple[ModelLifecycle, ...] = ()
    audit: bool = False                         # per-identity audit mode

    def lifecycle(self, model: str) -> ModelLifecycle | None:
        return next((m for m in self.models if m.name == model), None)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str                                   # "policies[i]"
    source: str
    destination: str
    ports: tuple[int, ...] = ()                 # empty: any port
    models: tuple[str, ...] | None = None       # globs; None: any model
    max_tokens: int | None = None
    cap_max_tokens: bool = False
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, g) for g in self.models)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    error_type: str                             # the OpenAI-shape type (Anthropic's is derived)
    code: str | None
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self, protocol: str) -> bytes:
        if protocol == "anthropic":
            return json.dumps({"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                                          "message": self.message}}).encode()
        return json.dumps({"error": {"message": self.message, "type": self.error_type, "param": None,
                                     "code": self.code}}).encode()


_ANTHROPIC_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 502: "api_error", 503: "overloaded_error"}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str | None                          # why refused / would_deny / flagged ("deprecated")
    refusal: Refusal | None                     # what enforce would answer (set for refused and would_deny)
    rule: Rule | None                           # the policy that decided (None: none matched)
    requested_model: str
    sent_model: str                             # after a retired model's rewrite
    max_tokens: int | None                      # what to send (capped when cap_max_tokens)
    reserve_tokens: int                         # estimated input + max_tokens (or the default output reservation)
    deprecated: bool = False

    @property
    def policy(self) -> str | None:
        return self.rule.name if self.rule else None


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    mode: str = "enforce"                       # enforce | audit (global)
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    identity_numbers: Mapping[str, int] = field(default_factory=dict)   # name -> kernel identity number
    audit_sources: frozenset[str] = frozenset()  # source identities in audit mode (identity mode: audit)
    unknown_endpoints: str = "deny"             # deny | allow | audit: requests to endpoints the gateway does not
                                                # understand (agent/l7/endpoints.py), batches among them

    # -- building --------------------------------------------------------------------------------------------------
    @staticmethod
    def from_config_dict(cfg: Mapping[str, Any], identity_numbers: Mapping[str, int] | None = None) -> "GatewayPolicy":
        """From the config's plain sections: identities (with llm:), policies, gateway, mode."""
        gw = cfg.get("gateway") or {}
        mode = str(gw.get("mode") or cfg.get("mode") or "enforce")
        if mode not in ("enforce", "audit"):
            raise PolicyError(f"gateway.mode: {mode!r} is not enforce or audit")
        unknown = str(gw.get("unknown_endpoints") or "deny")
        if unknown not in UNKNOWN_ENDPOINTS:
            raise PolicyError(f"gateway.unknown_endpoints: {unknown!r} is not deny, allow or audit")
        dests: dict[str, Destination] = {}
        for i, ident in enumerate(cfg.get("identities") or []):
            llm = ident.get("llm")
            if llm is None and ident.get("kind") in ("model", "external"):
                llm = {"protocol": "auto"}           # the config's default for these kinds
            if not llm or llm.get("protocol") == "off":
                continue
            name = _str(ident, "name", f"identities[{i}]")
            eps = [e for e in ident.get("endpoints") or [] if isinstance(e, str)]   # CIDR[:port] endpoints
            dests[name] = Destination(
                name=name, protocol=_protocol(llm.get("protocol")),
                tls=_tls(llm.get("tls"), eps, f"identities[{i}].llm.tls"),
                upstream_ca=llm.get("upstream_ca"), api_key_file=llm.get("api_key_file"), endpoints=tuple(eps),
                models=tuple(_lifecycle(m, f"identities[{i}].llm.models[{j}]")
                             for j, m in enumerate(llm.get("models") or [])),
                audit=(ident.get("mode") or llm.get("mode")) == "audit")
        rules = []
        for i, p in enumerate(cfg.get("policies") or []):
            where = f"policies[{i}]"
            if "from" not in p and "from_" in p:
                p = {**p, "from": p["from_"]}
            common = dict(
                ports=tuple(int(x) for x in (p.get("ports") or ())),
                models=tuple(str(g) for g in p["models"]) if p.get("models") is not None else None,
                max_tokens=_opt_int(p, "max_tokens", where), cap_max_tokens=bool(p.get("cap_max_tokens", False)),
                tokens_per_minute=_opt_int(p, "tokens_per_minute", where),
                requests_per_minute=_opt_int(p, "requests_per_minute", where),
                tokens_per_day=_opt_int(p, "tokens_per_day", where))
            for src in _names(p, "from", where):           # a policy names one identity or a list of them
                for dst in _names(p, "to", where):
                    rules.append(Rule(name=where, source=src, destination=dst, **common))  # type: ignore[arg-type]
        return GatewayPolicy(mode=mode, destinations=dests, rules=tuple(r for r in rules if r.destination in dests),
                             identity_numbers=dict(identity_numbers or {}),
                             audit_sources=frozenset(str(i.get("name")) for i in cfg.get("identities") or []
                                                     if i.get("mode") == "audit"), unknown_endpoints=unknown)

    @staticmethod
    def from_config(config: Any, identity_numbers: Mapping[str, int] | None = None) -> "GatewayPolicy":
        """From agent/config.py's Config model (its plain dump, aliases as written in YAML)."""
        return GatewayPolicy.from_config_dict(config.model_dump(mode="json", by_alias=True), identity_numbers)

    # -- the file --------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "mode": self.mode, "identity_numbers": dict(self.identity_numbers),
            "audit_sources": sorted(self.audit_sources), "unknown_endpoints": self.unknown_endpoints,
            "destinations": [{
                "name": d.name, "protocol": d.protocol, "tls": d.tls.value, "upstream_ca": d.upstream_ca,
                "api_key_file": d.api_key_file, "endpoints": list(d.endpoints), "audit": d.audit,
                "models": [{"name": m.name, "sunset": m.sunset.isoformat() if m.sunset else None,
                            "successor": m.successor} for m in d.models]} for d in self.destinations.values()],
            "rules": [{"name": r.name, "source": r.source, "destination": r.destination, "ports": list(r.ports),
                       "models": list(r.models) if r.models is not None else None, "max_tokens": r.max_tokens,
                       "cap_max_tokens": r.cap_max_tokens, "tokens_per_minute": r.tokens_per_minute,
                       "requests_per_minute": r.requests_per_minute, "tokens_per_day": r.tokens_per_day}
                      for r in self.rules]}, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "GatewayPolicy":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PolicyError(f"gateway policy: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PolicyError(f"gateway policy: format {d.get('format') if isinstance(d, dict) else None!r} "
                              f"is not {FORMAT}")
        try:
            dests = {x["name"]: Destination(
                name=x["name"], protocol=x["protocol"], tls=TlsMode(x["tls"]), upstream_ca=x.get("upstream_ca"),
                api_key_file=x.get("api_key_file"), endpoints=tuple(x.get("endpoints") or ()),
                audit=bool(x.get("audit")),
                models=tuple(ModelLifecycle(m["name"], _time(m.get("sunset"), "sunset"), m.get("successor"))
                             for m in x.get("models") or ())) for x in d.get("destinations") or ()}
            rules = tuple(Rule(
                name=r["name"], source=r["source"], destination=r["destination"], ports=tuple(r.get("ports") or ()),
                models=tuple(r["models"]) if r.get("models") is not None else None, max_tokens=r.get("max_tokens"),
                cap_max_tokens=bool(r.get("cap_max_tokens")), tokens_per_minute=r.get("tokens_per_minute"),
                requests_per_minute=r.get("requests_per_minute"), tokens_per_day=r.get("tokens_per_day"))
                for r in d.get("rules") or ())
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyError(f"gateway policy: bad entry ({e})") from None
        unknown = d.get("unknown_endpoints", "deny")
        if unknown not in UNKNOWN_ENDPOINTS:
            raise PolicyError(f"gateway policy: unknown_endpoints {unknown!r} is not deny, allow or audit")
        return GatewayPolicy(mode=d.get("mode", "enforce"), destinations=dests, rules=rules,
                             identity_numbers={str(k): int(v) for k, v in (d.get("identity_numbers") or {}).items()},
                             audit_sources=frozenset(str(x) for x in d.get("audit_sources") or ()),
                             unknown_endpoints=unknown)

    def identity_name(self, number: int) -> str | None:
        return next((n for n, v in self.identity_numbers.items() if v == number), None)

    def audit_for(self, source: str, destination: str) -> bool:
        """Audit mode: global, or the source's or the destination's identity mode."""
        d = self.destinations.get(destination)
        return self.mode == "audit" or source in self.audit_sources or bool(d and d.audit)


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise PolicyError(f"{where}.{key}: {v!r} is not a name")
    return v


def _names(d: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = d.get(key)
    if isinstance(v, list) and v:
        return [_str({key: x}, key, where) for x in v]
    return [_str(d, key, where)]


def _opt_int(d: Mapping[str, Any], key: str, where: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PolicyError(f"{where}.{key}: {v!r} is not a non-negative integer")
    return v


def _protocol(v: Any) -> str:
    """The error shape of the destination: auto (the capture's default) answers by the request's path."""
    return str(v) if v in ("openai", "anthropic", "ollama") else "auto"


def _tls(v: Any, endpoints: list[str], where: str) -> TlsMode:
    if v is None:               # unset (agent/config.py): clients and upstream speak plain HTTP
        return TlsMode.NONE
    try:
        return TlsMode(v)
    except ValueError:
        raise PolicyError(f"{where}: {v!r} is not intercept, originate or none") from None


def _time(v: Any, where: str) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        t = v
    else:
        try:
            t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        except ValueError:
            raise PolicyError(f"{where}: {v!r} is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _lifecycle(m: Mapping[str, Any], where: str) -> ModelLifecycle:
    dep = m.get("deprecated") or {}
    return ModelLifecycle(_str(m, "name", where), _time(dep.get("sunset"), f"{where}.deprecated.sunset"),
                          dep.get("successor"))


# -- the decision ----------------------------------------------------------------------------------------------------
def decide(policy: GatewayPolicy, source: str, destination: str, port: int, model: str, max_tokens: int | None,
           input_tokens: int, now: datetime, choices: int = 1) -> Decision:
    """Judge one request: lifecycle rewrite, then the model allow-list, then max_tokens (the largest limit the
    request names, agent/gateway/limits.py). Budgets are separate; the reservation is the input estimate plus
    `choices` (n, best_of) times the output limit. With cap_max_tokens a request naming no limit gets the cap."""
    dest = policy.destinations.get(destination)
    audit = policy.audit_for(source, destination)
    rules = [r for r in policy.rules if r.source == source and r.destination == destination
             and (not r.ports or port in r.ports)]
    sent, deprecated, note = model, False, None
    life = dest.lifecycle(model) if dest else None

    def reserve(mt: int | None) -> int:
        return max(input_tokens, 0) + max(choices, 1) * (mt if mt is not None else DEFAULT_OUTPUT_RESERVATION)

    def out(refusal: Refusal, reason: str, rule: Rule | None) -> Decision:
        return Decision(Outcome.WOULD_DENY if audit else Outcome.REFUSED, reason, refusal, rule, model, sent,
                        max_tokens, reserve(max_tokens), deprecated)

    if life is not None and life.sunset is not None:
        deprecated = True
        if now < life.sunset:
            note = f"deprecated: {model} retires at {life.sunset.isoformat()}"
        elif life.successor:
            sent = life.successor
            note = f"retired: {model} rewritten to {sent}"
        else:
            return out(Refusal(404, "invalid_request_error", "model_not_found",
                               f"The model {model!r} was retired on {life.sunset.isoformat()} and has no successor "
                               f"(aimesh gateway, destination {destination})"), "model_retired", None)
    if not rules:
        return out(Refusal(403, "permission_denied", "model_not_allowed",
                           f"aimesh: no policy allows {source} to call models on {destination}"), "no_policy", None)
    rule = next((r for r in rules if r.allows(sent)), None)
    if rule is None:
        names = ", ".join(r.name for r in rules)
        return out(Refusal(403, "permission_denied", "model_not_allowed",
                           f"aimesh: source {source} may not call model {sent!r} on {destination} "
                           f"(policy {names})"), "model_not_allowed", rules[0])
    mt = max_tokens
    if rule.max_tokens is not None and max_tokens is not None and max_tokens > rule.max_tokens:
        if rule.cap_max_tokens:
            mt = rule.max_tokens
            note = (note + "; " if note else "") + f"max_tokens capped to {mt}"
        else:
            return out(Refusal(400, "invalid_request_error", "max_tokens_exceeded",
                               f"aimesh: max_tokens {_limit_text(max_tokens)} is over the cap {rule.max_tokens} "
                               f"of policy "
                               f"{rule.name} for {source} on {destination}"), "max_tokens_over_cap", rule)
    if mt is None and rule.max_tokens is not None:
        if rule.cap_max_tokens:
            mt = rule.max_tokens
            note = (note + "; " if note else "") + f"max_tokens {mt} inserted"
        res = reserve(rule.max_tokens)
    else:
        res = reserve(mt)
    return Decision(Outcome.SERVED, note, None, rule, model, sent, mt, res, deprecated)


def _limit_text(n: int) -> str:
    return "unbounded (a negative num_predict)" if n >= 1 << 62 else str(n)     # limits.UNBOUNDED


def budget_refusal(kind: str, retry_after_s: float, source: str, destination: str, rule: Rule) -> Refusal:
    """kind: tokens_per_minute | requests_per_minute | tokens_per_day | request_too_large."""
    if kind == "tokens_per_day":
        return Refusal(429, "insufficient_quota", "insufficient_quota",
                       f"aimesh: the daily token budget of {source} on {destination} (policy {rule.name}) is spent",
                       (("x-should-retry", "false"),))
    if kind == "request_too_large":
        return Refusal(429, "tokens", "rate_limit_exceeded",
                       f"aimesh: the request's reservation is larger than the per-minute token budget of {source} "
                       f"on {destination} (policy {rule.name})", (("x-should-retry", "false"),))
    ms = max(int(retry_after_s * 1000), 1)
    return Refusal(429, "tokens" if kind == "tokens_per_minute" else "requests", "rate_limit_exceeded",
                   f"aimesh: {kind.replace('_', ' ')} budget of {source} on {destination} (policy {rule.name}) is "
                   f"used; retry in {ms} ms",
                   (("retry-after-ms", str(ms)), ("retry-after", str(max(1, -(-ms // 1000))))))
