"""What a response really spent, for settling budgets: usage asked for on OpenAI streams, and an estimate without it.

OpenAI-shaped streams (chat and completions) report usage only when the request says
`stream_options.include_usage: true`; the gateway sets it on a streamed request that holds a budget reservation
(`want_stream_usage`), and when the client had not asked for it, `UsageChunkStrip` removes the extra final event
(`"choices": []` with a `usage`) so the client sees the stream it asked for. A stream that still ends without usage
is settled from its text: `estimate_tokens` is ceil(text bytes / 4), never a count of chunks (a server may pack any
number of tokens into one chunk).
"""
from __future__ import annotations

import json
import math
from typing import Any

from agent.l7.llm import Operation, Protocol


def want_stream_usage(obj: dict[str, Any], protocol: Protocol, operation: Operation) -> bool | None:
    """None: nothing to do; else set include_usage on `obj` and say whether the client had NOT asked for it (strip)."""
    if protocol is not Protocol.OPENAI or operation not in (Operation.CHAT, Operation.COMPLETION):
        return None
    if obj.get("stream") is not True:
        return None
    so = obj.get("stream_options")
    if isinstance(so, dict) and so.get("include_usage") is True:
        return None
    obj["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
    return True


def estimate_tokens(text_bytes: int) -> int:
    return math.ceil(max(text_bytes, 0) / 4)


class UsageChunkStrip:
    """SSE bytes in, the same bytes out less the usage-only event(s) the gateway asked for. Incremental: an event is
    passed on when its blank line arrives; `flush` passes what is left (a stream cut mid-event)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.stripped = 0

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            i, sep = _event_end(self._buf)
            if i < 0:
                break
            event = bytes(self._buf[:i + sep])
            del self._buf[:i + sep]
            if _usage_only(event):
                self.stripped += 1
            else:
                out += event
        return bytes(out)

    def flush(self) -> bytes:
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


def _event_end(buf: bytearray) -> tuple[int, int]:
    ends = [(i, len(s)) for s in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := buf.find(s)) >= 0]
    return min(ends) if ends else (-1, 0)


def _usage_only(event: bytes) -> bool:
    data = b"".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    if not data.startswith(b"{") or b"usage" not in data:
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
