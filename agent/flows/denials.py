"""Denied decisions -> one DECISION record per key per interval, with a count and one sample. Pure: no kernel, no I/O.

Every denied connect used to become one DECISION record, so one unprivileged process in a tight denied-connect loop
(~79k/s) flooded the collector and filled the agent's spool ahead of the records of allowed connections. Here denied
decisions are counted per key

    (source identity, destination identity, dialed port, reason, hook, verdict)

per interval (default 1 s):

- `add(d)` returns True when `d` is the first decision of a key that was quiet (not seen at all) in the previous
  interval: the caller reports it at once as its own record (count 1, `decision_record(d, ...)`), so a single denied
  connect is visible without waiting for the interval. It is not counted again in the aggregate.
- Otherwise `add(d)` returns False and `d` is counted in the key's aggregate of this interval; the first decision
  counted is the sample (its pid, comm, addresses, cookie and time go in the record).
- `flush(now_ns)` (the caller calls it when `due(now_ns)`) returns one DenialAggregate per key that counted anything,
  then starts the next interval. The keys of the closed interval are remembered for one interval: that is "quiet".

So a key costs at most two records per interval (one at once, one aggregate), and a steady flood of one key one
record per interval. Nothing is dropped, only merged: the immediate records (1 each) plus the aggregates' counts add
up to the events added.

At most `max_keys` records per interval (immediate records and aggregates together), plus one `other` record.
Decisions that would need a further record go to one `other` bucket per interval (never an immediate record): those
of a new key once the budget is spent, and the follow-ups of a key reported at once this interval (its aggregate
would be a second record). The budget counts records, not keys: a port scan cycling over more ports than
`max_keys` used to cost up to 2 * max_keys records a second, because the keys that overflowed into `other` were
not remembered and so were "quiet" in the next interval (an immediate record each, then an aggregate each).
Memory is bounded (this interval's keys and the previous interval's, 2 * max_keys) whatever the flood looks like.
The bucket's key keeps each field on which all its decisions agree and WILDCARD where they differ; its record names
wildcard identities `other` (kind) and zeroes wildcard ports and codes (agent/flows/denials.py denial_record).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from agent.flows.decode import Decision
from agent.flows.model import FlowRecordData, IdentityData
from agent.flows.records import Workloads, decision_record
from agent.policy.identities import IdentityMeta

WILDCARD = -1                  # a field of the `other` bucket's key on which its decisions differ
DEFAULT_INTERVAL_NS = 1_000_000_000
DEFAULT_MAX_KEYS = 1000        # records per interval (immediate + aggregates); more go to the `other` bucket
OTHER_IDENTITY = IdentityData(name="", kind="other")   # a wildcard identity in the `other` bucket's record


class DenialKey(NamedTuple):
    src_id: int
    dst_id: int
    port: int       # the dialed port (ingress: the local server's port)
    reason: int
    hook: int
    verdict: int


@dataclass(frozen=True, slots=True)
class DenialAggregate:
    """`count` decisions of one key (or of the `other` bucket) in one interval. Times are monotonic ns (ts_ns)."""

    key: DenialKey
    count: int
    first_ns: int
    last_ns: int
    sample: Decision    # the first decision counted
    other: bool = False


@dataclass(frozen=True, slots=True)
class DenialStats:
    events: int         # decisions added since the start
    keys: int           # distinct keys in the current interval
    overflowed: int     # decisions counted in `other` buckets since the start (key cap reached)
    immediate: int      # decisions add() asked to report at once
    aggregates: int     # aggregates flush() returned since the start


class _Acc:
    __slots__ = ("count", "first_ns", "last_ns", "sample")

    def __init__(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.sample: Decision | None = None

    def count_in(self, d: Decision) -> None:
        if self.sample is None:
            self.sample = d
            self.first_ns = self.last_ns = d.ts_ns
        elif d.ts_ns > self.last_ns:
            self.last_ns = d.ts_ns
        elif d.ts_ns < self.first_ns:
            self.first_ns = d.ts_ns
        self.count += 1


class DenialAggregator:
    """See the module docstring. Times are the decisions' clock (the kernel's monotonic ns) as the caller passes them."""

    def __init__(self, start_ns: int, interval_ns: int = DEFAULT_INTERVAL_NS, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if interval_ns <= 0:
            raise ValueError(f"interval_ns={interval_ns}: must be > 0")
        if max_keys < 1:
            raise ValueError(f"max_keys={max_keys}: must be >= 1")
        self.interval_ns = interval_ns
        self.max_keys = max_keys
        self.interval_start_ns = start_ns
        self._current: dict[tuple, _Acc] = {}
        self._previous: Mapping[tuple, _Acc] = {}
        self._other = _Acc()
        self._other_key: list[int] = []
        self._records = 0       # records this interval has committed to: immediate ones and non-empty aggregates
        self._events = self._overflowed = self._immediate = self._aggregates = 0

    def add(self, d: Decision) -> bool:
        """Count one decision. True: report `d` now as its own record (it is not in any aggregate)."""
        self._events += 1
        key = (d.src_id, d.dst_id, d.dialed_port, int(d.reason), int(d.hook), int(d.verdict))
        acc = self._current.get(key)
        if acc is None or acc.sample is None:    # a new key, or the first follow-up of one reported at once
            if self._records >= self.max_keys:
                self._overflow(key, d)
                return False
            self._records += 1
            if acc is None:
                self._current[key] = acc = _Acc()
                if key not in self._previous:
                    self._immediate += 1
                    return True
        acc.count_in(d)
        return False

    def _overflow(self, key: tuple, d: Decision) -> None:
        self._overflowed += 1
        if self._other.sample is None:
            self._other_key = list(key)
        else:
            ok = self._other_key
            for i, v in enumerate(key):
                if ok[i] != v:
                    ok[i] = WILDCARD
        self._other.count_in(d)

    def due(self, now_ns: int) -> bool:
        """Has the current interval ended?"""
        return now_ns - self.interval_start_ns >= self.interval_ns

    def flush(self, now_ns: int) -> list[DenialAggregate]:
        """Close the current interval: one aggregate per key that counted decisions (plus `other`), in first-seen
        order; the next interval starts at now_ns."""
        out = [DenialAggregate(DenialKey(*k), a.count, a.first_ns, a.last_ns, a.sample)
               for k, a in self._current.items() if a.sample is not None]
        o = self._other
        if o.sample is not None:
            out.append(DenialAggregate(DenialKey(*self._other_key), o.count, o.first_ns, o.last_ns, o.sample, True))
        self._aggregates += len(out)
        self._previous, self._current = self._current, {}
        self._other, self._other_key = _Acc(), []
        self._records = 0
        self.interval_start_ns = now_ns
        return out

    def stats(self) -> DenialStats:
        return DenialStats(events=self._events, keys=len(self._current), overflowed=self._overflowed,
                           immediate=self._immediate, aggregates=self._aggregates)


def denial_record(agg: DenialAggregate, meta: Mapping[int, IdentityMeta], mono_to_wall_ns: int, agent_id: str = "",
                  node: str = "", workloads: Workloads | None = None) -> FlowRecordData:
    """The DECISION record of one aggregate: the sample's details (its workload too), count, start/end =
    first/last decision."""
    rec = decision_record(agg.sample, meta, mono_to_wall_ns, agent_id, node, count=agg.count, last_ns=agg.last_ns,
                          workloads=workloads)
    if agg.first_ns != agg.sample.ts_ns:   # a decision read out of order came before the sample
        rec = replace(rec, start_time_unix_nano=agg.first_ns + mono_to_wall_ns)
    if not agg.other:
        return rec
    k, changes = agg.key, {}
    if k.src_id == WILDCARD:
        changes.update(source=OTHER_IDENTITY, source_address="", source_port=0, pid=0, comm="", cookie=0)
    if k.dst_id == WILDCARD:
        changes.update(destination=OTHER_IDENTITY, actual_destination=OTHER_IDENTITY, destination_address="",
                       dialed_address="")
    if k.port == WILDCARD:
        changes.update(dialed_port=0, destination_port=0)
    for name in ("reason", "hook", "verdict"):
        if getattr(k, name) == WILDCARD:
            changes[name] = 0
    return replace(rec, **changes)
