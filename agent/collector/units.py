"""Parsing and printing of durations, sizes and times for the command line. Pure functions."""

from __future__ import annotations

import re
from datetime import datetime, timezone, tzinfo

_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
    "w": 7 * 86400 * 10**9,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|w)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration_ns(text: str) -> int:
    """"90s", "5m", "1h30m", "7d", "250ms", or a plain number of seconds -> nanoseconds. Raises ValueError."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return int(float(s) * 10**9)
    pos, total = 0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h30m, 7d)")
    return total


def parse_size(text: str) -> int:
    """"1GiB", "500M", "64k", "1.5GB", "4096" -> bytes. K/M/G/T and KiB/MiB/... are powers of 1024,
    KB/MB/GB/TB powers of 1000. Raises ValueError."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 64KiB, 500MiB, 1GB)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit in ("", "b"):
        scale = 1
    elif "i" in unit or len(unit) == 1:
        scale = _SIZE_UNITS[unit[0]]
    else:  # kb, mb, gb, tb
        scale = 1000 ** ("kmgt".index(unit[0]) + 1)
    return int(number * scale)


def parse_time_ns(text: str, now_ns: int) -> int:
    """A duration ago ("5m": now - 5 min) or an ISO 8601 / RFC 3339 time ("2025-01-02T15:04:05Z") -> Unix ns.

    A time without a zone is local time."""
    try:
        return now_ns - parse_duration_ns(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (5m, 2h) nor a time (2025-01-02T15:04:05Z)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def format_duration_ns(ns: int) -> str:
    """Short human duration: 850ns, 12.3us, 4.56ms, 1.234s, 3m05s, 2h01m."""
    if ns < 1000:
        return f"{ns}ns"
    if ns < 10**6:
        return f"{ns / 1e3:.3g}us"
    if ns < 10**9:
        return f"{ns / 1e6:.3g}ms"
    if ns < 60 * 10**9:
        return f"{ns / 1e9:.3f}s"
    s = ns // 10**9
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: int) -> str:
    """1023B, 1.0KiB, 12.3MiB, ..."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")


def format_time_ns(ns: int, tz: tzinfo | None = None) -> str:
    """Unix ns -> "Nov 27 14:53:02.123" in tz (local time when None)."""
    dt = datetime.fromtimestamp(ns // 10**9, tz=tz or timezone.utc)
    if tz is None:
        dt = dt.astimezone()
    return f"{dt:%b %d %H:%M:%S}.{ns % 10**9 // 10**6:03d}"
