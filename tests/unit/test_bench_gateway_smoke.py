"""bench/gateway.py runs with tiny rounds and produces every figure it reports, for every path it could start.
Only that the figures exist is checked, never their values (no timing assertions)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gateway

REPO = Path(__file__).resolve().parents[2]


def test_bench_gateway_produces_every_figure(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: bench.gateway needs the C load generator")
    paths = ["direct", "gateway"] + [p for p, exe in (("haproxy", "haproxy"), ("mitmproxy", "mitmdump"))
                                     if shutil.which(exe)]
    out = tmp_path / "gw.json"
    p = subprocess.run([sys.executable, "-m", "bench.gateway", "--rounds", "2", "--rates", "100,200", "--run-s", "0.2",
                        "--stream-rate", "100", "--sat-calls", "60", "--sat-conns", "4", "--conns", "4",
                        "--warmup", "5", "--paths", ",".join(paths), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["path_errors"] == {}
    fig = res["figures"]
    assert set(fig) == {"plain_100", "plain_200", "stream_100", "saturation"}
    for run, per_path in fig.items():
        assert set(per_path) == set(paths), run
        for name, f in per_path.items():
            assert f["rounds"] == 2 and f["non_200"] == 0
            for k in ("median_us", "p99_us", "rate_per_s"):
                assert isinstance(f[k], float), (run, name, k)
            if name != "direct":
                for k in ("added_median_us", "added_p99_us", "added_ttfc_median_us"):
                    assert isinstance(f[k], float), (run, name, k)
    assert isinstance(fig["saturation"]["gateway"]["proxy_cpu_us_per_call"], float)
    assert set(res["rss"]) == set(paths) - {"direct"}
    assert all(r["peak_mb"] > 0 for r in res["rss"].values())
    assert [t["verdict"] in ("PASS", "MISS") for t in res["targets"]] == [True] * 4
    # every call sent through the gateway became a record: it really was on the path
    assert res["gateway_records"]["served"] == res["gateway_calls"] > 0
    assert "targets:" in p.stdout and "added first chunk p50" in p.stdout
    # nothing it started is left: no process runs from its temporary directory, which is gone
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and res["tmp_dir"].encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            pass
    assert left == [] and not Path(res["tmp_dir"]).exists()


def test_figures_pair_each_path_with_direct_of_the_same_round():
    s = gateway.Settings(rounds=2, rates=(200.0,), run_s=1, stream_rate=200, sat_calls=10, sat_conns=1, conns=1,
                         warmup=0, request_bytes=1024, chunks=1, proxy_cpu=None, workload_cpu=None,
                         paths=("direct", "gateway"))

    def row(rnd: int, path: str, p50: float) -> dict:
        return {"round": rnd, "path": path, "run": "plain_200", "n": 10, "warmup": 0, "median_us": p50,
                "p99_us": p50 * 2, "ttfc_median_us": p50, "ttfc_p99_us": p50 * 2, "rate_per_s": 200.0, "non_200": 0,
                "late_1ms": 0, "proxy_cpu_s": None}
    rows = [row(0, "direct", 100), row(0, "gateway", 400), row(1, "direct", 1000), row(1, "gateway", 1200)]
    f = gateway.figures(rows, s, ["direct", "gateway"])["plain_200"]["gateway"]
    assert f["added_median_us"] == 250.0            # median of 300 and 200, not 800 - 550
    assert f["added_median_us_range"] == [200, 300]
    assert f["median_us"] == 800.0
