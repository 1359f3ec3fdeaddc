"""The token limit of a request, in every shape an upstream accepts, and the number of outputs it asks for. Pure.

Upstreams read the output limit from different fields, and OpenAI-compatible servers accept several at once (vLLM
and OpenAI's o-series read `max_completion_tokens`, most servers still read `max_tokens`): so the limit judged is the
LARGEST of every token-limit field present, whatever the shape —

    max_tokens              OpenAI chat/completions, Anthropic messages, vLLM, LiteLLM, llama.cpp
    max_completion_tokens   OpenAI chat (current), vLLM
    max_output_tokens       OpenAI Responses API
    options.num_predict     Ollama /api/chat, /api/generate (negative: no limit)

pydantic servers coerce `5000.0`, `"5000"` and `true` to integers, so a value that is not a JSON integer is refused
(`LimitError`, the field named) instead of being read as "no limit". `null` is absent, as the SDKs send it.
`n` and `best_of` (both generated server-side) multiply the output that can be spent: `choices` is the larger.
`insert_cap` writes a policy cap into the field the shape reads when the request named none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.l7.llm import Operation, Protocol

UNBOUNDED = 1 << 62          # Ollama's num_predict < 0: generate until the context is full (no reservation fits)
_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class LimitError(ValueError):
    """A token-limit or choice-count field the gateway will not guess about; the message names it."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"aimesh: {field} {value!r} {why}")
        self.field = field


@dataclass(frozen=True, slots=True)
class TokenLimit:
    value: int | None                 # the largest limit named (UNBOUNDED for a negative num_predict); None: none
    fields: tuple[str, ...]           # the fields present, as dotted paths
    choices: int                      # outputs generated: max(n, best_of, 1)


def _integer(field: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise LimitError(field, v, "is not an integer (the gateway does not guess what the upstream will read)")
    if v < minimum:
        raise LimitError(field, v, f"is below {minimum}")
    return v


def token_limit(obj: dict[str, Any]) -> TokenLimit:
    """The limit and choice count of a parsed request body (any shape). Raises LimitError."""
    values: list[int] = []
    fields: list[str] = []
    for f in _FIELDS:
        v = obj.get(f)
        if v is not None:
            values.append(_integer(f, v, 0))
            fields.append(f)
    opts = obj.get("options")
    if isinstance(opts, dict) and opts.get("num_predict") is not None:
        np = opts["num_predict"]
        if isinstance(np, bool) or not isinstance(np, int):
            raise LimitError("options.num_predict", np, "is not an integer")
        values.append(UNBOUNDED if np < 0 else np)
        fields.append("options.num_predict")
    choices = 1
    for f in ("n", "best_of"):
        v = obj.get(f)
        if v is not None:
            choices = max(choices, _integer(f, v, 1))
    return TokenLimit(max(values) if values else None, tuple(fields), choices)


def cap_field(protocol: Protocol, operation: Operation) -> str:
    """The field a request of this shape names its limit in (where a cap is inserted)."""
    if protocol is Protocol.OLLAMA:
        return "options.num_predict"
    if operation is Operation.RESPONSES:
        return "max_output_tokens"
    if protocol is Protocol.OPENAI and operation is Operation.CHAT:
        return "max_completion_tokens"    # what OpenAI reads for every model (max_tokens is refused by o-series)
    return "max_tokens"                   # OpenAI completions, Anthropic messages


def apply_cap(obj: dict[str, Any], limit: TokenLimit, cap: int, protocol: Protocol, operation: Operation) -> None:
    """Every limit field over `cap` is set to it; with none present the shape's own field is inserted."""
    if not limit.fields:
        f = cap_field(protocol, operation)
        if f == "options.num_predict":
            opts = obj.get("options")
            obj["options"] = {**(opts if isinstance(opts, dict) else {}), "num_predict": cap}
        else:
            obj[f] = cap
        return
    for f in limit.fields:
        if f == "options.num_predict":
            np = obj["options"]["num_predict"]
            if np < 0 or np > cap:
                obj["options"]["num_predict"] = cap
        elif obj[f] > cap:
            obj[f] = cap
