"""Which model API endpoint a request target names, and which model the upstream will use for it. Pure.

Shared by the gateway (agent/gateway/server.py judges what `parse_target` says) and the capture path
(agent/l7/record.py records the model the upstream used). Real servers let the endpoint choose the model: LiteLLM
serves `/openai/deployments/{model}/chat/completions` (Azure's shape), `/engines/{model}/completions` and
`?model=` and uses those over the body's `model`; so a request is judged by every place a known server reads the
model from, and refused when they disagree.

Ambiguity is refused, never guessed (`Unclear`): percent-encoded `/`, `\\` or `.` in the path (`/v1/chat%2Fcompletions`:
aiohttp matches it as `/v1/chat/completions`, others route it elsewhere), dot segments, a backslash, `model` twice
in the query string, a model name with control characters. An absolute-form target (`POST http://host/v1/...`) is
judged by its path and forwarded in origin form.

`parse_target` answers:
- an `Endpoint` the gateway understands: `model_bearing` (judged: the model is in the path, the query or the body,
  `body` says how to read the body) or not (`GET /v1/models`, file uploads, listing batches: no model runs);
- `Unclear`: refuse (400);
- None: an endpoint the gateway does not understand (`unknown_endpoints: deny|allow|audit` decides).
`Endpoint.judged` says whether the gateway can judge it at all: batches carry their models in an uploaded JSONL file
that the gateway does not read, so they are never judged (`unknown_endpoints` decides them too).
"""
from __future__ import annotations

import enum
import email.parser
import email.policy
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from agent.l7.llm import Operation, Protocol


class BodyShape(str, enum.Enum):
    JSON = "json"             # a JSON object; its top-level "model"
    MULTIPART = "multipart"   # multipart/form-data; its "model" field (audio transcriptions, image edits)
    NONE = "none"             # no body is read for the model (realtime: the query names it)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str                                   # "chat", "images", "batches", "models", ...
    kind: tuple[Protocol, Operation] | None     # how agent/l7/llm.py reads its response (None: not read)
    model_bearing: bool                         # a model runs for it: judged
    judged: bool                                # the gateway can judge it (False: batches)
    body: BodyShape
    path: str                                   # decoded path, origin form
    target: str                                 # the origin-form target to forward (as received, less scheme/host)
    path_model: str | None = None               # /openai/deployments/{m}/..., /engines/{m}/...
    query_model: str | None = None              # ?model=
    _path_head: str = ""                        # the raw target around the path model, to rewrite it
    _path_tail: str = ""

    def with_model(self, model: str) -> str:
        """The target with its path and query models replaced by `model` (a retired model's successor)."""
        target = self.target
        if self.path_model is not None:
            target = self._path_head + quote(model, safe="") + self._path_tail
        if self.query_model is not None:
            path, _, query = target.partition("?")
            pairs = [(k, model if k == "model" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
            target = path + "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
        return target


@dataclass(frozen=True, slots=True)
class Unclear:
    code: str                                   # the refusal's code and the record's reason
    message: str


# (tail of path segments, name, kind, body) — longest tails first; "*" matches one segment
_MODEL_ENDPOINTS: tuple[tuple[tuple[str, ...], str, tuple[Protocol, Operation] | None, BodyShape], ...] = (
    (("threads", "*", "runs"), "runs", None, BodyShape.JSON),
    (("threads", "runs"), "runs", None, BodyShape.JSON),
    (("images", "generations"), "images", None, BodyShape.JSON),
    (("images", "edits"), "images", None, BodyShape.MULTIPART),
    (("images", "variations"), "images", None, BodyShape.MULTIPART),
    (("audio", "speech"), "audio", None, BodyShape.JSON),
    (("audio", "transcriptions"), "audio", None, BodyShape.MULTIPART),
    (("audio", "translations"), "audio", None, BodyShape.MULTIPART),
    (("fine_tuning", "jobs"), "fine_tuning", None, BodyShape.JSON),
    (("realtime", "sessions"), "realtime", None, BodyShape.JSON),
    (("messages", "count_tokens"), "messages", None, BodyShape.JSON),
    (("chat", "completions"), "chat", (Protocol.OPENAI, Operation.CHAT), BodyShape.JSON),
    (("api", "chat"), "chat", (Protocol.OLLAMA, Operation.CHAT), BodyShape.JSON),
    (("api", "generate"), "completion", (Protocol.OLLAMA, Operation.COMPLETION), BodyShape.JSON),
    (("api", "embed"), "embeddings", (Protocol.OLLAMA, Operation.EMBEDDINGS), BodyShape.JSON),
    (("api", "embeddings"), "embeddings", (Protocol.OLLAMA, Operation.EMBEDDINGS), BodyShape.JSON),
    (("completions",), "completion", (Protocol.OPENAI, Operation.COMPLETION), BodyShape.JSON),
    (("embeddings",), "embeddings", (Protocol.OPENAI, Operation.EMBEDDINGS), BodyShape.JSON),
    (("responses",), "responses", (Protocol.OPENAI, Operation.RESPONSES), BodyShape.JSON),
    (("messages",), "messages", (Protocol.ANTHROPIC, Operation.MESSAGES), BodyShape.JSON),
    (("moderations",), "moderations", None, BodyShape.JSON),
    (("rerank",), "rerank", None, BodyShape.JSON),
    (("assistants",), "assistants", None, BodyShape.JSON),
    (("realtime",), "realtime", None, BodyShape.NONE),
    (("batches",), "batches", None, BodyShape.NONE),
)

# understood endpoints that run no model: (tail, methods, name)
_PLAIN_ENDPOINTS: tuple[tuple[tuple[str, ...], frozenset[str], str], ...] = (
    (("models",), frozenset({"GET", "HEAD"}), "models"),
    (("models", "*"), frozenset({"GET", "HEAD"}), "models"),
    (("files",), frozenset({"GET", "HEAD", "POST"}), "files"),
    (("files", "*"), frozenset({"GET", "HEAD", "DELETE"}), "files"),
    (("files", "*", "content"), frozenset({"GET", "HEAD"}), "files"),
    (("batches",), frozenset({"GET", "HEAD"}), "batches"),
    (("batches", "*"), frozenset({"GET", "HEAD"}), "batches"),
    (("batches", "*", "cancel"), frozenset({"POST"}), "batches"),
    (("api", "tags"), frozenset({"GET", "HEAD"}), "models"),
    (("api", "version"), frozenset({"GET", "HEAD"}), "version"),
    (("api", "ps"), frozenset({"GET", "HEAD"}), "models"),
    (("threads",), frozenset({"POST"}), "threads"),                       # a thread, no run: no model runs
    (("threads", "*"), frozenset({"GET", "HEAD", "POST", "DELETE"}), "threads"),
    (("threads", "*", "messages"), frozenset({"GET", "HEAD", "POST"}), "threads"),
)

_BAD_ESCAPES = ("%2f", "%5c", "%2e", "%00")
_PLAIN_PREFIXES = ([], ["v1"], ["openai", "v1"], ["openai"])


def _tail_matches(segs: list[str], tail: tuple[str, ...]) -> bool:
    if len(segs) < len(tail):
        return False
    return all(t == "*" or t == s for t, s in zip(tail, segs[len(segs) - len(tail):]))


def parse_target(method: str, target: str) -> Endpoint | Unclear | None:
    """The endpoint a request line names (see the module docstring)."""
    raw = target
    if "://" in raw.split("?", 1)[0]:        # absolute form: judged by its path, forwarded in origin form
        u = urlsplit(raw)
        if u.scheme.lower() not in ("http", "https"):
            return Unclear("ambiguous_target", f"aimesh: request target {target[:200]!r} is not an HTTP URL")
        raw = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if not raw.startswith("/"):
        return Unclear("ambiguous_target", f"aimesh: request target {target[:200]!r} is not a path")
    raw_path, _, query = raw.partition("?")
    low = raw_path.lower()
    if any(e in low for e in _BAD_ESCAPES) or "\\" in raw_path:
        return Unclear("ambiguous_path", f"aimesh: the path {raw_path[:200]!r} has an encoded '/', '\\', '.' or "
                       "NUL, which servers route differently; refused")
    raw_segs = raw_path.split("/")[1:]
    if any(s in (".", "..") for s in raw_segs):
        return Unclear("ambiguous_path", f"aimesh: the path {raw_path[:200]!r} has dot segments; refused")
    segs = [unquote(s) for s in raw_segs]
    while segs and segs[-1] == "":
        segs.pop()
    path = "/" + "/".join(segs)
    # the path model: Azure's /openai/deployments/{m}/..., OpenAI's old /engines/{m}/...
    path_model: str | None = None
    head = tail = ""
    for i, s in enumerate(segs[:-1]):
        if s in ("deployments", "engines"):    # under any prefix (/openai/v1/deployments/...): fail closed
            path_model = segs[i + 1]
            head = "/" + "/".join(raw_segs[:i + 1]) + "/"
            tail = "/" + "/".join(raw_segs[i + 2:]) if len(raw_segs) > i + 2 else ""
            tail += f"?{query}" if query else ""
            segs = segs[:i] + segs[i + 2:]
            break
    models = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "model"]
    if len(models) > 1:
        return Unclear("duplicate_model", "aimesh: the query string names \"model\" more than once; refused")
    query_model = models[0] if models else None
    for m in (path_model, query_model):
        if m is not None and (bad := check_model(m)) is not None:
            return bad
    wrong_method: Unclear | None = None
    thread_messages = _tail_matches(segs, ("threads", "*", "messages"))    # not Anthropic's /v1/messages
    for tail_segs, name, kind, body in () if thread_messages else _MODEL_ENDPOINTS:
        if _tail_matches(segs, tail_segs):
            realtime = name == "realtime" and body is BodyShape.NONE
            if method == ("GET" if realtime else "POST"):
                return Endpoint(name=name, kind=kind, model_bearing=True, judged=name != "batches", body=body,
                                path=path, target=raw, path_model=path_model, query_model=query_model,
                                _path_head=head, _path_tail=tail)
            wrong_method = Unclear("method_not_judged", f"aimesh: {method} {path} is a model endpoint; only "
                                   f"{'GET (websocket)' if realtime else 'POST'} is judged there; refused")
            break
    if path_model is None and query_model is None:
        for tail_segs, methods, name in _PLAIN_ENDPOINTS:     # GET /v1/batches: a listing, no model runs
            n = len(segs) - len(tail_segs)
            if n >= 0 and segs[:n] in _PLAIN_PREFIXES and _tail_matches(segs, tail_segs) and method in methods:
                return Endpoint(name=name, kind=None, model_bearing=False, judged=True, body=BodyShape.NONE,
                                path=path, target=raw)
    if wrong_method is not None:
        return wrong_method
    return None


def check_model(model: str) -> Unclear | None:
    """A model name the upstream reads the same way we do: no control characters, no lone surrogates."""
    if not model:
        return Unclear("missing_model", "aimesh: the request names an empty model")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in model):
        return Unclear("ambiguous_model", f"aimesh: the model name {model[:100]!r} has control characters or lone "
                       "surrogates; refused")
    return None


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def read_json(body: bytes) -> dict[str, Any] | Unclear:
    """The body as the upstream reads it: UTF-8 JSON (escapes decoded as json does), a duplicate key anywhere is
    ambiguous (servers differ on first-wins and last-wins): refused."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Unclear("invalid_json", "aimesh: the request body is not UTF-8")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs)
    except _Duplicate as e:
        return Unclear("duplicate_key", f"aimesh: the request body has the key {e.key[:100]!r} more than once; "
                       "servers differ on which one counts; refused")
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return Unclear("invalid_json", "aimesh: the request body is not a JSON object")
    return obj


def read_form_model(content_type: str | None, body: bytes) -> str | None | Unclear:
    """The `model` field of a multipart/form-data body; Unclear when the body is not one or names it twice."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return Unclear("invalid_form", "aimesh: this endpoint takes multipart/form-data")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects:
        return Unclear("invalid_form", "aimesh: the multipart body could not be read")
    found: list[str] = []
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "model":
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                return Unclear("invalid_form", "aimesh: the form's model field could not be read")
            try:
                found.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                return Unclear("invalid_form", "aimesh: the form's model field is not UTF-8")
    if len(found) > 1:
        return Unclear("duplicate_key", "aimesh: the form names \"model\" more than once; refused")
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Judged:
    model: str
    source: str                                 # where it was named: "path", "query", "body", joined by "+"


def judged_model(ep: Endpoint, body_model: Any) -> Judged | Unclear:
    """The one model the upstream will use: every place names the same one, or the request is refused."""
    named = [(src, m) for src, m in (("path", ep.path_model), ("query", ep.query_model), ("body", body_model))
             if m is not None]
    if not named:
        return Unclear("missing_model", f"aimesh: the request to {ep.path} names no model (in the path, the query "
                       "string or the body's \"model\"); refused")
    for src, m in named:
        if not isinstance(m, str):
            return Unclear("missing_model", f"aimesh: the {src}'s \"model\" is not a string")
        if (bad := check_model(m)) is not None:
            return bad
    models = {m for _, m in named}
    if len(models) > 1:
        return Unclear("model_mismatch", "aimesh: the request names different models ("
                       + ", ".join(f"{src}: {m[:80]!r}" for src, m in named) + "); the upstream would use one of "
                       "them; refused")
    return Judged(named[0][1], "+".join(src for src, _ in named))


def target_model(method: str, target: str) -> str | None:
    """The model the path or query names (what the upstream uses over the body's), for the capture path."""
    ep = parse_target(method, target)
    if isinstance(ep, Endpoint):
        return ep.path_model if ep.path_model is not None else ep.query_model
    return None


__all__ = ["BodyShape", "Endpoint", "Judged", "Unclear", "check_model", "judged_model", "parse_target",
           "read_form_model", "read_json", "target_model"]
