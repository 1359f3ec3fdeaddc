"""Denied decisions -> per-key, per-interval aggregates with a count and a sample (agent/flows/denials.py). No kernel."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from agent.export.records import RecordKind, from_proto, to_proto
from agent.flows.decode import Decision, decode_decision
from agent.flows.denials import WILDCARD, DenialAggregator, DenialKey, denial_record
from agent.kernel import abi
from tests.unit.test_decode import META, _event

SECOND = 1_000_000_000
BASE = decode_decision(_event(verdict=abi.Verdict.DENIED, reason=abi.Reason.NO_POLICY_DST, src_id=16, dst_id=17,
                              actual_dst_id=17, flags=0, ts_ns=0))


def _d(ts_ns: int, **kw) -> Decision:
    return replace(BASE, ts_ns=ts_ns, **kw)


def _key(d: Decision) -> DenialKey:
    return DenialKey(d.src_id, d.dst_id, d.dialed_port, d.reason, d.hook, d.verdict)


def test_a_single_denial_is_reported_at_once_and_not_again():
    agg = DenialAggregator(start_ns=0)
    assert agg.add(_d(10)) is True
    assert agg.flush(SECOND) == []
    st = agg.stats()
    assert (st.events, st.immediate, st.aggregates, st.overflowed) == (1, 1, 0, 0)


def test_flood_of_three_keys_is_three_records_per_interval_with_exact_counts():
    keys = [_d(0, dialed_port=8000), _d(0, dialed_port=9000), _d(0, src_id=1, reason=abi.Reason.NO_POLICY_SRC)]
    weights = (70_000, 20_000, 10_000)   # 100,000 events per interval
    agg = DenialAggregator(start_ns=0)
    total = 0
    for interval in range(3):
        t0 = interval * SECOND
        stream = [k for k, w in zip(keys, weights) for _ in range(w)]
        random.Random(interval).shuffle(stream)
        at_once = [d for i, d in enumerate(stream) if agg.add(replace(d, ts_ns=t0 + i))]
        assert agg.due(t0 + SECOND) and not agg.due(t0 + SECOND - 1)
        out = agg.flush(t0 + SECOND)
        assert len(out) == 3
        counts = {a.key: a.count for a in out}
        if interval == 0:   # each key's first decision was reported at once; the aggregate counts the rest
            assert sorted(map(_key, at_once)) == sorted(map(_key, keys))
            assert counts == {_key(k): w - 1 for k, w in zip(keys, weights)}
        else:               # the keys were busy in the interval before: nothing at once, one record each
            assert at_once == []
            assert counts == {_key(k): w for k, w in zip(keys, weights)}
        for a in out:
            assert t0 <= a.first_ns == a.sample.ts_ns <= a.last_ns < t0 + SECOND
        total += len(at_once) + sum(counts.values())
    st = agg.stats()
    assert (st.events, st.immediate, st.aggregates, st.overflowed) == (300_000, 3, 9, 0)
    assert total == st.events


def test_key_cap_sends_the_rest_to_one_other_bucket():
    agg = DenialAggregator(start_ns=0, max_keys=10)
    at_once = 0
    for rep in range(2):             # a port scan: 50 ports, twice
        for port in range(50):
            at_once += agg.add(_d(rep * 100 + port, dialed_port=1000 + port))
    assert at_once == 10 and agg.stats().keys == 10
    (other,) = agg.flush(SECOND)     # the budget (10 records) went to the 10 immediate ones: the rest is other
    assert other.other and other.count == 90 and agg.stats().overflowed == 90
    assert other.key == DenialKey(16, 17, WILDCARD, abi.Reason.NO_POLICY_DST, abi.Hook.CONNECT, abi.Verdict.DENIED)
    assert (other.first_ns, other.last_ns, other.sample.dialed_port) == (10, 149, 1010)
    assert at_once + other.count == 100
    rec = denial_record(other, META, 10**18, "node-a", "host")
    assert (rec.count, rec.dialed_port, rec.destination_port) == (90, 0, 0)
    assert (rec.source.name, rec.destination.name, rec.verdict) == ("chat", "llama", abi.Verdict.DENIED)
    # the next interval starts empty: its first 10 new keys are admitted again, its other bucket is new
    assert agg.add(_d(SECOND + 1, dialed_port=2000)) is True
    assert agg.flush(2 * SECOND) == []


def test_other_bucket_with_mixed_identities_names_them_other():
    agg = DenialAggregator(start_ns=0, max_keys=1)
    agg.add(_d(1))
    agg.add(_d(2, src_id=1))
    agg.add(_d(3, src_id=16, dst_id=18, dialed_port=7))
    (other,) = agg.flush(SECOND)
    assert other.other and other.count == 2
    rec = denial_record(other, META, 0)
    assert (rec.source.kind, rec.destination.kind, rec.actual_destination.kind) == ("other", "other", "other")
    assert (rec.source.name, rec.source_address, rec.dialed_port, rec.pid) == ("", "", 0, 0)
    assert rec.verdict == abi.Verdict.DENIED and rec.reason == abi.Reason.NO_POLICY_DST


def test_interval_boundary():
    agg = DenialAggregator(start_ns=5 * SECOND, interval_ns=SECOND)
    assert agg.add(_d(5 * SECOND + 1)) is True
    assert agg.add(_d(5 * SECOND + 2)) is False
    assert not agg.due(6 * SECOND - 1) and agg.due(6 * SECOND)
    (a,) = agg.flush(6 * SECOND)
    assert (a.count, a.first_ns, a.last_ns) == (1, 5 * SECOND + 2, 5 * SECOND + 2)
    assert agg.interval_start_ns == 6 * SECOND and not agg.due(6 * SECOND + 1)
    assert agg.add(_d(6 * SECOND + 5)) is False      # busy in the interval before: counted, not reported at once
    assert [x.count for x in agg.flush(7 * SECOND)] == [1]
    assert agg.flush(8 * SECOND) == []               # a quiet interval
    assert agg.add(_d(8 * SECOND + 5)) is True       # quiet before: reported at once again


def test_counts_add_up_exactly():
    rng = random.Random(7)
    agg = DenialAggregator(start_ns=0, max_keys=20)
    reported, t = 0, 0
    for _ in range(200):
        for _ in range(rng.randrange(0, 500)):
            t += 1
            d = _d(t, src_id=rng.choice((1, 16, 17)), dialed_port=rng.randrange(30),
                   hook=rng.choice((abi.Hook.CONNECT, abi.Hook.SENDMSG)))
            reported += agg.add(d)
        out = agg.flush(t)
        assert len([a for a in out if a.other]) <= 1 and len(out) <= 21
        reported += sum(a.count for a in out)
    st = agg.stats()
    assert reported == st.events and st.overflowed > 0


def test_denial_record_carries_count_sample_and_times():
    agg = DenialAggregator(start_ns=0)
    agg.add(_d(1))
    for t in (30, 10, 20):                           # out of order: start is the earliest, end the latest
        agg.add(_d(t, pid=900 + t, cookie=t))
    (a,) = agg.flush(SECOND)
    rec = denial_record(a, META, 10**18, "node-a", "host")
    assert rec.kind == RecordKind.DECISION and rec.count == 3
    assert (rec.pid, rec.cookie, rec.comm) == (930, 30, "python3")   # the first counted is the sample
    assert (rec.start_time_unix_nano, rec.end_time_unix_nano) == (10**18 + 10, 10**18 + 30)
    assert (rec.source.name, rec.destination.name, rec.dialed_port) == ("chat", "llama", 8000)
    msg = to_proto(rec)
    assert msg.count == 3 and from_proto(msg).count == 3


@pytest.mark.parametrize("kw", [{"interval_ns": 0}, {"max_keys": 0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        DenialAggregator(start_ns=0, **kw)


@pytest.mark.parametrize("ports", [None, 1500], ids=["unique keys", "a scan cycling over 1500 ports"])
def test_a_flood_of_10k_keys_a_second_costs_at_most_1000_records_and_one_other_a_second(ports):
    """10,000 denied connects a second, each to another key. Cycling over more ports than the cap used to cost up to
    2,001 records a second: the keys that overflowed into `other` were "quiet" in the next interval, so each got an
    immediate record and then an aggregate."""
    agg = DenialAggregator(start_ns=0)
    reported = 0
    for s in range(5):
        records = 0
        for j in range(10_000):
            i = s * 10_000 + j
            k = i if ports is None else i % ports
            if agg.add(_d(s * SECOND + j * 100_000, src_id=16 + k // 60_000, dialed_port=1 + k % 60_000)):
                records += 1
                reported += 1
        assert agg.due((s + 1) * SECOND)
        out = agg.flush((s + 1) * SECOND)
        others = [a for a in out if a.other]
        assert len(others) == 1 and others[0].count > 0
        records += len(out) - 1
        assert records <= 1000, (s, records)
        reported += sum(a.count for a in out)
    assert reported == agg.stats().events == 50_000
