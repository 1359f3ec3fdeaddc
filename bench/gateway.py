"""`python -m bench.gateway`: what the aimesh L7 gateway adds to a model call, side by side with its peers.

One fast local upstream (`aimesh-lg llmserver`: a pre-built chat.completion JSON for a non-streamed call, a pre-built
SSE stream of CHUNKS chunks + finish + usage + [DONE] for a streamed one) and four paths to it, all up for the whole
run:

  direct     client -> upstream
  gateway    client -> `python -m agent.gateway` -> upstream; the real gateway process with a policy that allows the
             bench's model (no budgets) and a static origin table (`--origins-file`: any 127.0.0.1 peer -> chat ->
             the upstream) instead of the kernel's pinned map, so no agent is needed; the kernel redirect only rewrites
             the destination at connect time. Its records go to a receiver in this process, drained meanwhile.
  haproxy    client -> HAProxy (tcp mode, nbthread 1) -> upstream: the floor for any userspace hop
  mitmproxy  client -> `mitmdump --mode reverse:http://upstream` (streaming bodies) -> upstream: a Python L7 proxy

The proxies run pinned to --proxy-cpu (one core each: the saturation figure is per core), the client and upstream to
--workload-cpu. The client is `aimesh-lg llmload` (C, epoll): keep-alive connections, open loop at a fixed rate
(latency from the call's due time, so a path that falls behind pays its queueing), or closed loop with every
connection busy for saturation. Interleaved rounds: each round runs every kind of run on every path in an order
rotated per round, waiting after each run until the path's processes are idle. Figures are medians over rounds of
per-round values; "added" is path − direct measured in the same round (paired), then the median of those.
Results go to bench/gateway-results.json; the exit status is 0 whatever the targets say (1 when a path failed).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

from bench import host, loadgen, rounds
from bench.local import PY, REPO

DEFAULT_OUT = Path(__file__).resolve().parent / "gateway-results.json"
PATHS = ("direct", "gateway", "haproxy", "mitmproxy")
PACKAGES = {"haproxy": "haproxy", "mitmdump": "mitmproxy"}
MODEL = "bench-llm"   # what aimesh-lg llmload asks for (loadgen.c LLM_MODEL)


@dataclass(frozen=True)
class Settings:
    rounds: int
    rates: tuple[float, ...]         # open-loop non-streamed rates
    run_s: float                     # seconds per open-loop run
    stream_rate: float
    sat_calls: int
    sat_conns: int
    conns: int                       # keep-alive connections of an open-loop run
    warmup: int
    request_bytes: int
    chunks: int
    proxy_cpu: Optional[int]
    workload_cpu: Optional[int]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    key: str          # "plain_200", "stream_200", "saturation"
    stream: bool
    rate: float       # 0: closed loop
    calls: int
    conns: int


def runs_of(s: Settings) -> list[Run]:
    out = [Run(f"plain_{r:g}", False, r, max(1, int(r * s.run_s)), s.conns) for r in s.rates]
    out.append(Run(f"stream_{s.stream_rate:g}", True, s.stream_rate, max(1, int(s.stream_rate * s.run_s)), s.conns))
    out.append(Run("saturation", False, 0.0, s.sat_calls, s.sat_conns))
    return out


def pin(cpu: Optional[int]) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def shell(argv: list[str]) -> str:
    """A shell line that execs argv (taskset execs too): killing what loadgen started kills the generator itself."""
    return "exec " + " ".join(shlex.quote(a) for a in argv)


def ensure_tools(commands: list[str]) -> list[str]:
    """apt-get install (idempotent) the packages of the missing commands; what was done, one line each."""
    missing = sorted({PACKAGES[c] for c in commands if shutil.which(c) is None})
    if not missing:
        return []
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    status = "ok" if res.returncode == 0 else f"failed: {res.stderr.strip()[-200:]}"
    return [f"{' '.join(cmd)}: {status}"]


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    ps: psutil.Process

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> tuple[float, float]:
        """(RSS now, peak RSS) in MB (10^6 B)."""
        now = self.ps.memory_info().rss / 1e6
        peak = now
        try:
            for line in Path(f"/proc/{self.ps.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024 / 1e6
        except OSError:
            pass
        return now, peak

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _listening(pid: int, port: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    return any(len(p) > 3 and p[3] == "0A" and int(p[1].rsplit(":", 1)[1], 16) == port
               for p in (ln.split() for ln in text.splitlines()[1:]))


def spawn(name: str, argv: list[str], port: int, log: Path, timeout_s: float = 30.0) -> Proc:
    """Start a proxy (argv already pinned) and wait until it listens on port."""
    with open(log, "wb") as f:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    proc = Proc(name, argv, p, psutil.Process(p.pid))
    deadline = time.monotonic() + timeout_s
    while not _listening(p.pid, port):
        if p.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            tail = log.read_text(errors="replace")[-400:].strip()
            raise RuntimeError(f"{name} did not listen on {port}: {tail or 'no output'}\n  {' '.join(argv)}")
        time.sleep(0.05)
    return proc


def haproxy_config(listen: int, upstream: int) -> str:
    return "\n".join(["global", "    nbthread 1", "    maxconn 8000", "", "defaults", "    mode tcp",
                      "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s", "",
                      "listen gw", f"    bind 127.0.0.1:{listen} backlog 4096", f"    server up 127.0.0.1:{upstream}",
                      ""])


def gateway_policy_json(upstream: int) -> str:
    from agent.gateway.policy import GatewayPolicy
    return GatewayPolicy.from_config_dict({
        "identities": [{"name": "chat", "kind": "process"},
                       {"name": "openai", "kind": "external", "endpoints": [f"127.0.0.1:{upstream}"],
                        "llm": {"protocol": "openai", "gateway": "enforce"}}],
        "policies": [{"from": "chat", "to": "openai", "models": [f"{MODEL}*"]}]}).to_json()


class Records:
    """The agent's end of the gateway's record socket, drained on a thread: counts what the gateway reported."""

    def __init__(self, path: Path) -> None:
        from agent.gateway.records import GatewayRecordReceiver
        self.recv = GatewayRecordReceiver(path)
        self.count = 0
        self.served = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self._drain()

    def _drain(self) -> None:
        for r in self.recv.drain():
            self.count += 1
            self.served += r.get("decision") == "served"

    def close(self) -> dict:
        self._stop.set()
        self._t.join(5)
        self._drain()
        out = {"records": self.count, "served": self.served, "dropped": self.recv.dropped}
        self.recv.close()
        return out


@dataclass
class Bench:
    s: Settings
    tmp: Path
    lg: loadgen.LoadGen
    upstream: subprocess.Popen
    upstream_port: int
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    records: Optional[Records] = None
    commands: dict[str, str] = field(default_factory=dict)

    def client_argv(self, port: int | str, r: Run) -> list[str]:
        return pin(self.s.workload_cpu) + self.lg.argv + [
            "llmload", loadgen.HOST, str(port), str(r.conns), str(r.calls), f"{r.rate:g}", "1" if r.stream else "0",
            str(self.s.request_bytes), str(self.s.warmup)]


def start(s: Settings, tmp: Path, say: Callable[[str], None]) -> tuple[Bench, dict[str, str]]:
    lg = loadgen.build(tmp)
    if lg.kind != "c":
        raise RuntimeError(f"bench.gateway needs the C load generator: {lg.note}")
    up_port = rounds_free_port()
    up_argv = pin(s.workload_cpu) + lg.argv + ["llmserver", loadgen.HOST, str(up_port), str(s.chunks)]
    up = loadgen.start_server(shell(up_argv))
    b = Bench(s, tmp, lg, up, up_port, commands={"upstream": " ".join(up_argv)})
    b.ports["direct"] = up_port
    failed: dict[str, str] = {}
    for name in s.paths:
        if name == "direct":
            continue
        port = rounds_free_port()
        try:
            b.procs[name] = start_path(b, name, port)
            b.ports[name] = port
            b.commands[name] = " ".join(b.procs[name].argv)
        except (RuntimeError, OSError) as e:
            failed[name] = str(e)
            say(f"  {name}: not measured: {e}")
    return b, failed


def rounds_free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind((loadgen.HOST, 0))
        return sk.getsockname()[1]


def start_path(b: Bench, name: str, port: int) -> Proc:
    cpu = pin(b.s.proxy_cpu)
    if name == "gateway":
        pol = b.tmp / "gateway-policy.json"
        pol.write_text(gateway_policy_json(b.upstream_port))
        origins = b.tmp / "origins.json"
        origins.write_text(json.dumps([{"peer_ip": "127.0.0.1", "peer_port": 0, "address": "127.0.0.1",
                                        "port": b.upstream_port, "source": "chat", "destination": "openai"}]))
        sock = b.tmp / "records.sock"
        b.records = Records(sock)
        argv = cpu + [PY, "-m", "agent.gateway", "--policy", str(pol), "--listen", f"127.0.0.1:{port}",
                      "--origins-file", str(origins), "--records", str(sock), "--log-level", "warning"]
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + old if old else "")
        try:
            return spawn(name, argv, port, b.tmp / "gateway.log")
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
    if name == "haproxy":
        if shutil.which("haproxy") is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        cfg = b.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, b.upstream_port))
        return spawn(name, cpu + ["haproxy", "-db", "-f", str(cfg)], port, b.tmp / "haproxy.log")
    if name == "mitmproxy":
        exe = shutil.which("mitmdump")
        if exe is None:
            raise RuntimeError("mitmdump is not installed (apt-get install mitmproxy)")
        conf = b.tmp / "mitmproxy"
        conf.mkdir(exist_ok=True)
        argv = cpu + [exe, "--mode", f"reverse:http://127.0.0.1:{b.upstream_port}", "--listen-host", "127.0.0.1",
                      "-p", str(port), "-q", "--set", f"confdir={conf}", "--set", "stream_large_bodies=1",
                      "--set", "connection_strategy=lazy"]
        return spawn(name, argv, port, b.tmp / "mitmproxy.log", timeout_s=60)
    raise RuntimeError(f"unknown path {name!r}")


def measure(b: Bench, say: Callable[[str], None]) -> tuple[list[dict], dict[str, str]]:
    """Interleaved rounds; one dict per (round, path, run) with the client's JSON and the proxy's CPU."""
    paths = [p for p in b.s.paths if p in b.ports]
    out: list[dict] = []
    errors: dict[str, str] = {}
    for rnd in range(b.s.rounds):
        busy, waited = host.wait_quiet(0.15, 3.0)
        order = rounds.rotated(paths, rnd)
        for r in runs_of(b.s):
            for name in order:
                if name in errors:
                    continue
                proc = b.procs.get(name)
                line = shell(b.client_argv(b.ports[name], r))
                b.commands[f"client_{r.key}"] = " ".join(b.client_argv("PORT", r))
                cpu0 = proc.cpu_s() if proc else None
                core0, t0 = (host.cpu_times(b.s.proxy_cpu) if b.s.proxy_cpu is not None else None), time.monotonic()
                try:
                    res = loadgen.run_client(line, 120 + 4 * r.calls / max(r.rate, 50.0))
                except loadgen.LoadGenError as e:
                    errors[name] = str(e)
                    say(f"  {name}: {r.key} failed: {e}")
                    continue
                wall = time.monotonic() - t0
                used = proc.cpu_s() - cpu0 if proc and cpu0 is not None else None
                # the share of the proxy's core that other processes (other tenants) took during the run
                others = None
                if core0 is not None:
                    others = max(0.0, host.busy_fraction(core0, host.cpu_times(b.s.proxy_cpu)) - (used or 0.0) / wall)
                rounds.settle([b.upstream.pid] + ([proc.ps.pid] if proc else []))
                out.append({"round": rnd, "path": name, "run": r.key, "busy_before": round(busy, 3),
                            "proxy_cpu_s": round(used, 4) if used is not None else None,
                            "others_on_proxy_cpu": round(others, 3) if others is not None else None, **res})
        say(progress(out, rnd, b.s.rounds, paths))
    return out, errors


def progress(rows: list[dict], rnd: int, total: int, paths: list[str]) -> str:
    mine = {(x["path"], x["run"]): x for x in rows if x["round"] == rnd}
    cells = []
    for p in paths:
        pl = next((v for (pp, k), v in mine.items() if pp == p and k.startswith("plain_")), None)
        sat = mine.get((p, "saturation"))
        c = p
        if pl:
            c += f" p50 {pl['median_us']:.0f}µs"
        if sat:
            c += f" {sat['rate_per_s']:,.0f}/s"
        cells.append(c)
    return f"  round {rnd + 1}/{total}: " + " | ".join(cells)


# ---- figures ----
def _med(v: list[float]) -> Optional[float]:
    return statistics.median(v) if v else None


def figures(rows: list[dict], s: Settings, paths: list[str]) -> dict:
    """Per path and run: median over rounds of p50/p99 (µs), TTFC, rate; added = paired (path − direct) medians."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for x in rows:
        by.setdefault((x["path"], x["run"]), {})[x["round"]] = x
    out: dict = {}
    for r in runs_of(s):
        fr: dict = {}
        for p in paths:
            mine = by.get((p, r.key), {})
            if not mine:
                continue
            f: dict = {"rounds": len(mine)}
            for k in ("median_us", "p99_us", "ttfc_median_us", "ttfc_p99_us", "rate_per_s"):
                f[k] = _med([x[k] for x in mine.values()])
            f["non_200"] = sum(x["non_200"] for x in mine.values())
            f["others_on_proxy_cpu"] = _med([x["others_on_proxy_cpu"] for x in mine.values()
                                             if x.get("others_on_proxy_cpu") is not None])
            f["late_1ms"] = sum(x["late_1ms"] for x in mine.values())
            cpu = [x["proxy_cpu_s"] for x in mine.values() if x["proxy_cpu_s"] is not None]
            if cpu and r.rate == 0:
                f["proxy_cpu_us_per_call"] = _med([x["proxy_cpu_s"] * 1e6 / x["n"] for x in mine.values()
                                                   if x["proxy_cpu_s"] is not None])
            ref = by.get(("direct", r.key), {})
            if p != "direct" and ref:
                for k in ("median_us", "p99_us", "ttfc_median_us", "ttfc_p99_us"):
                    d = [mine[i][k] - ref[i][k] for i in mine if i in ref]
                    f["added_" + k] = _med(d)
                    f["added_" + k + "_range"] = [min(d), max(d)] if d else None
            fr[p] = f
        out[r.key] = fr
    return out


def targets(fig: dict, rss: dict, s: Settings) -> list[dict]:
    low = f"plain_{s.rates[0]:g}"
    gw = fig.get(low, {}).get("gateway", {})
    sat = fig.get("saturation", {}).get("gateway", {})
    rows = [(f"gateway added p50 at {s.rates[0]:g} req/s ≤ 0.5 ms", gw.get("added_median_us"), 500.0, "µs", False),
            (f"gateway added p99 at {s.rates[0]:g} req/s ≤ 2 ms", gw.get("added_p99_us"), 2000.0, "µs", False),
            ("gateway saturation ≥ 2,000 req/s on one core", sat.get("rate_per_s"), 2000.0, "/s", True),
            ("gateway peak RSS ≤ 80 MB", rss.get("gateway", {}).get("peak_mb"), 80.0, "MB", False)]
    out = []
    for text, v, limit, unit, higher in rows:
        ok = None if v is None else (v >= limit if higher else v <= limit)
        out.append({"target": text, "value": v, "limit": limit, "unit": unit,
                    "verdict": "NONE" if ok is None else ("PASS" if ok else "MISS")})
    return out


def _f(v: Optional[float], unit: str = "µs") -> str:
    if v is None:
        return "–"
    if unit == "µs":
        return f"{v / 1000:.3f} ms" if abs(v) >= 1000 else f"{v:.0f} µs"
    return f"{v:,.0f}{unit}"


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.0%}"


def report(res: dict, s: Settings) -> str:
    fig, paths = res["figures"], [p for p in s.paths if p in res["rss"] or p == "direct"]
    lines = [f"{'':<28}" + "".join(f"{p:>14}" for p in paths)]

    def row(label: str, run: str, key: str) -> None:
        cells = [_f(fig.get(run, {}).get(p, {}).get(key)) for p in paths]
        lines.append(f"{label:<28}" + "".join(f"{c:>14}" for c in cells))
    for rate in s.rates:
        k = f"plain_{rate:g}"
        lines.append(f"non-streamed at {rate:g} req/s")
        row("  p50", k, "median_us")
        row("  p99", k, "p99_us")
        row("  added p50 (paired)", k, "added_median_us")
        row("  added p99 (paired)", k, "added_p99_us")
    k = f"stream_{s.stream_rate:g}"
    lines.append(f"streamed ({s.chunks} chunks) at {s.stream_rate:g} req/s")
    row("  first chunk p50", k, "ttfc_median_us")
    row("  first chunk p99", k, "ttfc_p99_us")
    row("  added first chunk p50", k, "added_ttfc_median_us")
    row("  added first chunk p99", k, "added_ttfc_p99_us")
    row("  whole stream p50", k, "median_us")
    lines.append(f"saturation ({s.sat_conns} conns, closed loop; proxy on one core)")
    lines.append(f"{'  req/s':<28}" + "".join(f"{_f(fig.get('saturation', {}).get(p, {}).get('rate_per_s'), '/s'):>14}"
                                              for p in paths))
    lines.append(f"{'  proxy CPU µs/call':<28}" + "".join(
        f"{_f(fig.get('saturation', {}).get(p, {}).get('proxy_cpu_us_per_call'), ''):>14}" for p in paths))
    def rss(p: str) -> str:
        r = res["rss"].get(p)
        return "–" if r is None else f"{r['now_mb']:.0f} / {r['peak_mb']:.0f}"
    lines.append(f"{'RSS now / peak (MB)':<28}" + "".join(f"{rss(p):>14}" for p in paths))
    lines.append(f"{'others on the proxy CPU':<28}" + "".join(
        f"{_pct(fig.get(f'plain_{s.rates[0]:g}', {}).get(p, {}).get('others_on_proxy_cpu')):>14}" for p in paths)
        + f"  (median, runs at {s.rates[0]:g} req/s)")
    bad = {p: sum(f.get("non_200", 0) for f in (fig[k].get(p, {}) for k in fig)) for p in paths}
    if any(bad.values()):
        lines.append("non-200 answers: " + ", ".join(f"{p} {n}" for p, n in bad.items() if n))
    if "gateway_records" in res:
        g = res["gateway_records"]
        lines.append(f"gateway records: {g['records']:,} ({g['served']:,} served, {g['dropped']} lost) for "
                     f"{res['gateway_calls']:,} calls sent through it")
    lines.append("targets:")
    for t in res["targets"]:
        v = t["value"]
        shown = "–" if v is None else (_f(v) if t["unit"] == "µs" else f"{v:,.1f} {t['unit']}")
        lines.append(f"  {t['verdict']:<5} {t['target']:<48} {shown}")
    return "\n".join(lines)


def run(s: Settings, say: Callable[[str], None]) -> tuple[dict, int]:
    tmp = Path(tempfile.mkdtemp(prefix="aimesh-bench-gateway-"))
    tools = {"haproxy": "haproxy", "mitmproxy": "mitmdump"}
    res: dict = {"settings": asdict(s), "tmp_dir": str(tmp), "setup": ensure_tools([tools[p] for p in s.paths if p in tools])}
    status = 0
    b: Optional[Bench] = None
    try:
        b, failed = start(s, tmp, say)
        res["path_errors"] = dict(failed)
        status = 1 if failed else 0
        rows, errors = measure(b, say)
        if errors:
            res["path_errors"].update(errors)
            status = 1
        paths = [p for p in s.paths if p in b.ports and p not in errors]
        res["rows"] = rows
        res["figures"] = figures(rows, s, paths)
        res["rss"] = {n: dict(zip(("now_mb", "peak_mb"), p.rss_mb())) for n, p in b.procs.items()
                      if n in paths and p.popen.poll() is None}
        res["gateway_calls"] = sum(x["n"] + x["warmup"] for x in rows if x["path"] == "gateway")
        res["targets"] = targets(res["figures"], res["rss"], s)
        res["commands"] = b.commands
    finally:
        if b is not None:
            for p in b.procs.values():
                p.stop()
            loadgen.stop_server(b.upstream)
            if b.records is not None:
                time.sleep(0.1)
                res["gateway_records"] = b.records.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res, status


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rates", type=floats, default=(200.0, 1000.0), help="non-streamed open-loop rates, req/s")
    ap.add_argument("--run-s", type=float, default=4.0, help="seconds per open-loop run")
    ap.add_argument("--stream-rate", type=float, default=200.0)
    ap.add_argument("--sat-calls", type=int, default=5000)
    ap.add_argument("--sat-conns", type=int, default=16)
    ap.add_argument("--conns", type=int, default=16, help="keep-alive connections of an open-loop run")
    ap.add_argument("--warmup", type=int, default=100, help="calls per run before the measured ones")
    ap.add_argument("--request-bytes", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=20, help="content chunks of a streamed answer")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--workload-cpu", type=int, default=1 if (os.cpu_count() or 1) > 1 else 0)
    ap.add_argument("--paths", default=",".join(PATHS), help="some of " + ",".join(PATHS) + " (direct always)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    paths = tuple(dict.fromkeys(["direct"] + [p.strip() for p in a.paths.split(",") if p.strip()]))
    bad = [p for p in paths if p not in PATHS]
    if bad:
        print(f"bench.gateway: --paths: unknown path {bad[0]!r} ({', '.join(PATHS)})", file=sys.stderr)
        return 2
    if not a.rates or a.rounds < 1:
        print("bench.gateway: --rates needs at least one rate and --rounds at least 1", file=sys.stderr)
        return 2
    s = Settings(rounds=a.rounds, rates=a.rates, run_s=a.run_s, stream_rate=a.stream_rate, sat_calls=a.sat_calls,
                 sat_conns=a.sat_conns, conns=a.conns, warmup=a.warmup, request_bytes=a.request_bytes,
                 chunks=a.chunks, proxy_cpu=a.proxy_cpu, workload_cpu=a.workload_cpu, paths=paths)

    def say(t: str) -> None:
        print(t, flush=True)
    t0 = time.monotonic()
    try:
        res, status = run(s, say)
    except (RuntimeError, OSError, loadgen.LoadGenError) as e:
        print(f"bench.gateway: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.gateway: interrupted (cleaned up)", file=sys.stderr)
        return 130
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["command"] = "python -m bench.gateway " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(res, s))
    a.out.write_text(json.dumps(res, indent=1))
    print(f"written to {a.out} ({res['elapsed_s']:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
