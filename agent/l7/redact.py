"""Redaction patterns on a linear-time engine (RE2). Pure.

Redaction runs on text the workload controls (prompts and completions), so a pattern with catastrophic backtracking
(`(a+)+$` on "a" * 50 + "!") would stall the agent for minutes with Python's `re`. RE2 (google-re2) matches in time
linear in the text; it refuses what needs backtracking (backreferences `\\1`, lookaround `(?=`, `(?<!`), and such a
pattern is refused at config load (agent/config.py) rather than run on another engine.
"""
from __future__ import annotations

import re2

Redaction = re2._Regexp           # a compiled pattern: `.sub(repl, text)` is what redaction calls

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False      # RE2 would print each refused pattern to stderr; the refusal is our error


class RedactionPatternError(ValueError):
    """RE2 cannot compile the pattern (the message is RE2's, one line)."""


def compile_redaction(pattern: str) -> Redaction:
    """The pattern compiled by RE2; RedactionPatternError if RE2 cannot compile it."""
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as e:
        msg = e.args[0] if e.args else str(e)
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        raise RedactionPatternError(str(msg).replace("\n", " ")) from None
