"""Token and request budgets per (source identity, destination identity), held under concurrency. Pure, thread safe.

Reserve at admission, settle from the response's usage, release on failure. A request is admitted only when the
window's committed tokens (settled + still reserved) plus its own reservation fit the budget, so concurrent requests
and streams that have not ended yet are already counted: with every request's usage at or under its reservation the
served total never exceeds the budget, and a request whose usage exceeds its reservation (an input estimate that was
low) overspends by at most that request's excess — at most one reservation while the others wait.

Windows are FIXED, aligned to the UTC minute and the UTC day of the clock given: simple, cheap, and what the
providers' own per-minute limits look like to a client (`retry-after-ms` is the time to the next minute). A
reservation is charged to the windows it was made in; settling after a window rolled over charges nothing to the
new one. Budgets are per node: a cluster-wide budget needs a shared counter (e.g. a token bucket in Redis, or
per-node shares handed out by the collector).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Hashable

Key = Hashable


@dataclass(frozen=True, slots=True)
class Limits:
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(slots=True)
class Reservation:
    key: Key
    tokens: int
    minute: int
    day: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class Exceeded:
    kind: str              # tokens_per_minute | requests_per_minute | tokens_per_day | request_too_large
    retry_after_s: float


@dataclass(slots=True)
class _Window:
    index: int = -1
    used: int = 0          # settled tokens
    reserved: int = 0      # tokens of requests in flight
    requests: int = 0

    def roll(self, index: int) -> None:
        if index != self.index:
            self.index, self.used, self.reserved, self.requests = index, 0, 0, 0


@dataclass(slots=True)
class _Account:
    minute: _Window
    day: _Window


@dataclass(frozen=True, slots=True)
class BudgetCounters:
    admitted: int
    refused: int
    settled: int
    released: int


class BudgetBook:
    """All budgets of one gateway. `clock` returns Unix seconds (wall time: windows are UTC minutes and days)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[Key, _Account] = {}
        self._admitted = self._refused = self._settled = self._released = 0

    def reserve(self, key: Key, limits: Limits, tokens: int) -> Reservation | Exceeded:
        tokens = max(int(tokens), 0)
        now = self._clock()
        minute, day = int(now // 60), int(now // 86400)
        with self._lock:
            acc = self._accounts.get(key)
            if acc is None:
                acc = self._accounts[key] = _Account(_Window(), _Window())
            acc.minute.roll(minute)
            acc.day.roll(day)
            m, d = acc.minute, acc.day
            to_minute = 60.0 - (now - minute * 60)
            verdict: Exceeded | None = None
            if limits.tokens_per_day is not None and d.used + d.reserved + tokens > limits.tokens_per_day:
                verdict = Exceeded("tokens_per_day", 86400.0 - (now - day * 86400))
            elif limits.tokens_per_minute is not None and tokens > limits.tokens_per_minute:
                verdict = Exceeded("request_too_large", to_minute)      # would never fit: not worth a retry
            elif limits.requests_per_minute is not None and m.requests + 1 > limits.requests_per_minute:
                verdict = Exceeded("requests_per_minute", to_minute)
            elif limits.tokens_per_minute is not None and m.used + m.reserved + tokens > limits.tokens_per_minute:
                verdict = Exceeded("tokens_per_minute", to_minute)
            if verdict is not None:
                self._refused += 1
                return verdict
            m.requests += 1
            d.requests += 1
            m.reserved += tokens
            d.reserved += tokens
            self._admitted += 1
            return Reservation(key, tokens, minute, day)

    def settle(self, r: Reservation, used_tokens: int) -> None:
        """The response said how many tokens it used: replace the reservation with that."""
        self._end(r, max(int(used_tokens), 0))

    def release(self, r: Reservation) -> None:
        """The request failed before the model used anything: give the reservation back (the request still counts)."""
        self._end(r, 0)

    def _end(self, r: Reservation, used: int) -> None:
        with self._lock:
            if r.done:
                return
            r.done = True
            if used:
                self._settled += 1
            else:
                self._released += 1
            acc = self._accounts.get(r.key)
            if acc is None:
                return
            for w, idx in ((acc.minute, r.minute), (acc.day, r.day)):
                if w.index == idx:
                    w.reserved -= r.tokens
                    w.used += used

    def committed(self, key: Key) -> tuple[int, int]:
        """(settled, reserved) tokens of the current minute window of `key` (tests, metrics)."""
        with self._lock:
            acc = self._accounts.get(key)
            if acc is None or acc.minute.index != int(self._clock() // 60):
                return 0, 0
            return acc.minute.used, acc.minute.reserved

    @property
    def counters(self) -> BudgetCounters:
        with self._lock:
            return BudgetCounters(self._admitted, self._refused, self._settled, self._released)
