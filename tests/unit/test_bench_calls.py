"""bench.calls' pure parts: metric sums, paired ratios, the report table."""
from __future__ import annotations

import pytest

from bench import calls


def test_total_sums_the_samples_whose_labels_match():
    m = {'aimesh_model_calls_total{destination="fast",source="load"}': 3.0,
         'aimesh_model_calls_total{destination="fast",source="other"}': 4.0,
         'aimesh_model_calls_total{destination="llama-on",source="chat"}': 5.0,
         'aimesh_model_calls_created{destination="fast",source="load"}': 99.0}
    assert calls.total(m, "aimesh_model_calls_total", destination="fast") == 7.0
    assert calls.total(m, "aimesh_model_calls_total") == 12.0
    assert calls.total(m, "aimesh_capture_ring_lost_total") == 0.0


def test_paired_ratio_is_the_median_of_per_round_ratios():
    r = calls.paired_ratio("m", "on", "off", [1.1, 2.0, 3.3], [1.0, 1.0, 3.0])
    assert r.paired == pytest.approx([1.1, 2.0, 1.1])
    assert r.paired_median == pytest.approx(1.1)
    assert r.of_medians == pytest.approx(2.0)
    faster = calls.paired_ratio("m", "on", "off", [50.0], [100.0], higher_is_better=True)
    assert faster.paired_median == pytest.approx(2.0)     # half the rate costs 2x


def test_report_judges_each_target_and_the_decode_rate():
    ratio = calls.paired_ratio
    res = {"latency": {"ratios": {"plain": ratio("latency_plain", "capture_on", "capture_off", [1.01], [1.0]),
                                  "stream": ratio("latency_stream", "capture_on", "capture_off", [1.10], [1.0])},
                       "median_ms": {"plain": {"on": 1.01, "off": 1.0}, "stream": {"on": 1.1, "off": 1.0}},
                       "records_on": 10, "records_on_expected": 10, "records_off": 0},
           "decode": {"request_bytes": 4096, "response_chunks": 20, "best_clean_per_s": 6000.0,
                      "best_clean_agent_cpu_pct": 80.0, "best_clean_agent_us_per_call": 130.0,
                      "steps": [{"target_per_s": 6000.0, "achieved_per_s": 6000.0, "sent": 6000, "recorded": 6000,
                                 "kernel_lost": {"ring_full": 0, "truncated": 0}, "agent_cpu_pct_burst": 80.0,
                                 "agent_cpu_us_per_call": 130.0}]}}
    text, extra = calls.report(res)
    verdicts = {t["target"]: t.get("verdict", t["pass"]) for t in extra["targets"]}
    assert verdicts["latency, non-streamed chat call ≤ 1.03×"] == "PASS"
    assert verdicts["latency, streamed chat call ≤ 1.03×"] == "MISS"
    assert verdicts["governed pipe ping-pong ≤ 1.02×"] is None          # part not run: not measured
    assert verdicts["decode rate ≥ 5,000 calls/s, 0 lost"] is True
    assert "6,000" in text and "(not measured)" in text
