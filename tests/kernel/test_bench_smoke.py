"""The benchmarks run: each bench module, with tiny rounds, produces every figure it reports and cleans up after itself.
Only that the figures exist is checked, never their values (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.kernel.harness import REPO


def test_bench_calls_produces_every_figure_and_cleans_up(tmp_path):
    from agent.identity.cgroups import cgroup2_mount
    out = tmp_path / "calls.json"
    p = subprocess.Popen([sys.executable, "-m", "bench.calls", "--rounds", "2", "--latency-calls", "5",
                          "--latency-warmup", "2", "--decode-rates", "500", "--decode-step", "0.5", "--rr-n", "500",
                          "--rr-warmup", "50", "--other-wait", "0", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    assert not (cgroup2_mount() / f"aimesh-bench-calls-{p.pid}").exists()
    res = json.loads(out.read_text())
    for kind in ("plain", "stream"):
        r = res["latency"]["ratios"][kind]
        assert isinstance(r["paired_median"], float) and len(r["paired"]) == 2
    assert res["latency"]["records_on_expected"] == 2 * 2 * (5 + 2)
    (step,) = res["decode"]["steps"]
    assert step["sent"] > 0 and isinstance(step["recorded"], int) and "ring_full" in step["kernel_lost"]
    assert "best_clean_per_s" in res["decode"]
    for k in ("gov_pipe", "gov_tcp", "free_pipe", "free_tcp"):
        assert isinstance(res["other"]["ratios"][k]["paired_median"], float)
        assert len(res["other"]["rounds"]["agent"]) == len(res["other"]["rounds"]["none"]) == 2
    assert len(res["targets"]) == 7 and all("target" in t for t in res["targets"])
    assert "targets:" in text and "decode" in text
