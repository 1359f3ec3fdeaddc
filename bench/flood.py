"""`python -m bench.flood`: what one hostile process in a tight denied-connect loop does to the agent and the collector.

One run, on one private cgroup subtree (aimesh-bench-flood-<pid>), with a collector (SQLite in a temporary
directory) and an agent exporting to it with a spool, policy `chat -> llama` (llama is a governed model):

  baseline  no flood: SIGHUP after a config change until the log says "config reloaded" (control-loop latency),
            an allowed client (`chat`) making N connections, SIGTERM until the agent exits.
  flood     a process in cgroup `hostile` runs connect() to llama's port in a tight C loop (compiled with the
            machine's cc; a Python loop without one): every attempt is denied (EPERM, no policy hostile -> llama).
            Meanwhile: the same reload latency (several times), the same allowed client, agent and collector CPU %,
            the agent's export backlog and losses (its /metrics, once a second), and at the end SIGTERM until the
            agent exits (while the flood still runs).
  measured  records per second the collector stored from the flood (rows with source `hostile`) and the decisions
            they stand for (sum of `count`, 0 meaning 1) against the attempts the loop made; allowed records lost:
            the allowed client's 2N records (client and server side) must all reach the collector, counted after a
            new agent started and drained what the old one left (pinned ring, spool).

Figures are printed and written to bench/flood-results.json; nothing is asserted. Run as root from the repo root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import psutil

from bench.local import PY, REPO, LocalBench, free_port

SERVER = REPO / "tests" / "kernel" / "workloads.py"

# The flood: connect() in a loop on one socket (a connect the cgroup hook refuses leaves the socket unconnected, so
# it is reused: no socket()/close() per attempt). Prints one JSON line when DURATION seconds have passed.
FLOOD_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv)
{
	if (argc != 4) { fprintf(stderr, "usage: flood HOST PORT SECONDS\n"); return 2; }
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) { fprintf(stderr, "bad host %s\n", argv[1]); return 2; }
	double t0 = now(), end = t0 + atof(argv[3]), t = t0;
	unsigned long long attempts = 0, denied = 0, connected = 0, other = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) { perror("socket"); return 1; }
	printf("{\"started\": true}\n");
	fflush(stdout);
	while (t < end) {
		for (int i = 0; i < 1024; i++) {
			attempts++;
			if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
				connected++;
			} else if (errno == EPERM) {
				denied++;
				continue;
			} else {
				other++;
			}
			close(fd);
			fd = socket(AF_INET, SOCK_STREAM, 0);
			if (fd < 0) { perror("socket"); return 1; }
		}
		t = now();
	}
	printf("{\"attempts\": %llu, \"denied\": %llu, \"connected\": %llu, \"other\": %llu, \"elapsed_s\": %.3f, "
	       "\"rate_per_s\": %.1f}\n", attempts, denied, connected, other, t - t0, attempts / (t - t0));
	return 0;
}
"""

FLOOD_PY = r"""
import errno, json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic(); end = t0 + seconds; t = t0
n = {"attempts": 0, "denied": 0, "connected": 0, "other": 0}
s = socket.socket()
print(json.dumps({"started": True}), flush=True)
while t < end:
    for _ in range(1024):
        n["attempts"] += 1
        try:
            s.connect((host, port))
            n["connected"] += 1
        except PermissionError:
            n["denied"] += 1
            continue
        except OSError:
            n["other"] += 1
        s.close(); s = socket.socket()
    t = time.monotonic()
n.update(elapsed_s=round(t - t0, 3), rate_per_s=round(n["attempts"] / (t - t0), 1))
print(json.dumps(n), flush=True)
"""


def build_flood(tmp: Path, force_python: bool) -> tuple[list[str], str]:
    """The flood's argv prefix and what it is ("c" or "python: why")."""
    py = tmp / "flood.py"
    py.write_text(FLOOD_PY)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if force_python or cc is None:
        return [PY, str(py)], "python: " + ("--python-flood given" if force_python else "no C compiler")
    src, out = tmp / "flood.c", tmp / "aimesh-flood"
    src.write_text(FLOOD_C)
    res = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        return [PY, str(py)], f"python: cc failed: {res.stderr.strip()[:300]}"
    return [str(out)], "c"


class Bench(LocalBench):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "flood")

    def reload_latency(self, cfg: dict, timeout_s: float = 60.0) -> Optional[float]:
        """Write cfg, SIGHUP, seconds until the log has a new "config reloaded" line (None: not within timeout)."""
        assert self.agent is not None
        self.write_config(cfg)
        offset = self.log_path.stat().st_size
        t0 = time.monotonic()
        self.agent.send_signal(signal.SIGHUP)
        while time.monotonic() - t0 < timeout_s:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            if "config reloaded" in text:
                return round(time.monotonic() - t0, 4)
            if "config reload rejected" in text or "config reload failed" in text:
                raise RuntimeError(f"the bench's reload was refused: {text[-400:]}")
            time.sleep(0.005)
        return None

    def stop_latency(self, timeout_s: float = 60.0) -> Optional[float]:
        """SIGTERM, seconds until the agent exited (None: SIGKILLed after timeout_s)."""
        assert self.agent is not None
        t0 = time.monotonic()
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent.wait(timeout_s)
            return round(time.monotonic() - t0, 3)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
            return None

    def metrics(self) -> dict[str, float]:
        """The agent's /metrics as {"name{labels}": value} (empty when it does not answer)."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out


def config(b: Bench, port: int, collector: dict, generation: int = 0) -> dict:
    """The bench's policy; `generation` adds that many unused identities, so every reload really changes it."""
    idents = [{"name": "chat", "kind": "service", "select": {"cgroups": [b.rel(b.root) + "/chat"]}},
              {"name": "hostile", "kind": "service", "select": {"cgroups": [b.rel(b.root) + "/hostile"]}},
              {"name": "llama", "kind": "model", "select": {"cgroups": [b.rel(b.root) + "/llama"]}}]
    idents += [{"name": f"spare{i}", "kind": "service", "select": {"cgroups": [b.rel(b.root) + f"/spare{i}"]}}
               for i in range(generation % 7)]
    return {"mode": "enforce", "identities": idents, "policies": [{"from": "chat", "to": "llama", "ports": [port]}],
            "telemetry": {"interim_interval": 0}, "collector": collector}


def db_query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def rows(db: Path, src: str, since_ns: int = 0, until_ns: int = 1 << 62) -> int:
    return db_query(db, "SELECT COUNT(*) FROM flows WHERE src_name = ? AND received_ns >= ? AND received_ns < ?",
                    (src, since_ns, until_ns))[0][0]


def decisions_represented(db: Path, src: str) -> int:
    """Sum over the stored records of `src` of the decisions each stands for (count; 0 means 1)."""
    from agent._gen.aimesh.v1 import flow_pb2
    total = 0
    for (payload,) in db_query(db, "SELECT record FROM flows WHERE src_name = ?", (src,)):
        total += max(flow_pb2.FlowRecord.FromString(payload).count, 1)
    return total


def allowed_client(b: Bench, port: int, n: int) -> subprocess.Popen:
    return b.spawn([PY, str(SERVER), "client", "--port", str(port), "--count", str(n), "--timeout", "5"],
                   b.group("chat"), stdout=subprocess.PIPE, text=True)


def client_result(p: subprocess.Popen, timeout_s: float = 600) -> dict:
    out, _ = p.communicate(timeout=timeout_s)
    return json.loads(out.strip().splitlines()[-1])


class Sampler(threading.Thread):
    """Once a second: the agent's export backlog and losses (its /metrics)."""

    WATCH = {"spool_bytes": 'aimesh_export_backlog_bytes{where="spool"}',
             "memory_bytes": 'aimesh_export_backlog_bytes{where="memory"}',
             "queue_records": "aimesh_export_queue_records"}

    def __init__(self, b: Bench) -> None:
        super().__init__(daemon=True)
        self.b = b
        self.stop = threading.Event()
        self.peak: dict[str, float] = {k: 0.0 for k in self.WATCH}
        self.last: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.wait(1.0):
            m = self.b.metrics()
            if not m:
                continue
            self.last = m
            for k, name in self.WATCH.items():
                self.peak[k] = max(self.peak[k], m.get(name, 0.0))


def losses(m: dict[str, float]) -> dict[str, float]:
    keys = {"decision_ring_full": 'aimesh_events_lost_total{ring="decision_events"}',
            "export_dropped_queue_full": 'aimesh_export_records_total{outcome="dropped_queue_full"}',
            "export_dropped_spool_full": 'aimesh_export_records_total{outcome="dropped_spool_full"}',
            "export_submitted": 'aimesh_export_records_total{outcome="submitted"}',
            "decision_ring_events_read": 'aimesh_ring_events_total{ring="decision_events"}',
            "kernel_connect_denied": 'aimesh_kernel_decisions_total{hook="connect",verdict="denied"}'}
    return {k: m.get(v, 0.0) for k, v in keys.items()}


def cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def median(xs: list[Optional[float]]) -> Optional[float]:
    got = [x for x in xs if x is not None]
    return round(statistics.median(got), 4) if got else None


def run(duration: float, connections: int, reloads: int, force_python: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="aimesh-bench-flood-"))
    b = Bench(tmp)
    res: dict = {"duration_s": duration, "allowed_connections": connections}
    try:
        flood_argv, res["flood_program"] = build_flood(tmp, force_python)
        port = free_port()
        b.spawn([PY, str(SERVER), "server", "--port", str(port), "--name", "llama", "--count", "0", "--timeout",
                 "3600"], b.group("llama"), stdout=subprocess.PIPE)
        from agent.collector.auth import load_or_create_token
        cport = free_port()
        db, token = tmp / "flows.db", tmp / "collector.token"
        load_or_create_token(token)
        collector = b.spawn([PY, "-m", "agent", "collector", "--listen", f"127.0.0.1:{cport}", "--db", str(db),
                             "--token-file", str(token)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        ccfg = {"address": f"127.0.0.1:{cport}", "spool_dir": str(tmp / "spool"), "token_file": str(token),
                "flush_interval": 0.2}
        gen = 0
        b.group("hostile")
        b.start_agent(config(b, port, ccfg, gen))

        # ---- baseline: no flood ----
        base_reload = []
        for _ in range(reloads):
            gen += 1
            base_reload.append(b.reload_latency(config(b, port, ccfg, gen)))
            time.sleep(0.3)
        before = rows(db, "chat")
        ok = client_result(allowed_client(b, port, connections))["ok"]
        deadline = time.monotonic() + 60
        while rows(db, "chat") - before < 2 * ok and time.monotonic() < deadline:
            time.sleep(0.2)
        base_stored = rows(db, "chat") - before
        base_stop = b.stop_latency()
        res["baseline"] = {"reload_s": base_reload, "reload_median_s": median(base_reload), "stop_s": base_stop,
                           "allowed_ok": ok, "allowed_records_stored": base_stored,
                           "allowed_records_lost": 2 * ok - base_stored}
        print(f"baseline: reload {median(base_reload)}s (median of {reloads}), SIGTERM -> exit {base_stop}s, "
              f"{2 * ok - base_stored} of {2 * ok} allowed records lost", flush=True)

        # ---- flood ----
        b.start_agent(config(b, port, ccfg, gen))
        m0 = losses(b.metrics())
        chat_before, hostile_before = rows(db, "chat"), rows(db, "hostile")
        flood = b.spawn([*flood_argv, "127.0.0.1", str(port), str(duration)], b.group("hostile"),
                        stdout=subprocess.PIPE, text=True)
        flood.stdout.readline()    # started
        t_flood, wall_flood = time.monotonic(), time.time_ns()
        time.sleep(min(2.0, duration / 5))
        sampler = Sampler(b)
        sampler.start()
        cpu0, ccpu0, t_cpu0 = cpu_seconds(b.agent.pid), cpu_seconds(collector.pid), time.monotonic()
        client = allowed_client(b, port, connections)
        flood_reload = []
        for _ in range(reloads):
            gen += 1
            flood_reload.append(b.reload_latency(config(b, port, ccfg, gen)))
            time.sleep(0.5)
        ok = client_result(client)["ok"]
        # SIGTERM while the flood still runs (its last quarter), after the client's connections
        wait = t_flood + duration * 0.75 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elapsed = time.monotonic() - t_cpu0
        cpu = (cpu_seconds(b.agent.pid) - cpu0) / elapsed * 100
        ccpu = (cpu_seconds(collector.pid) - ccpu0) / elapsed * 100
        sampler.stop.set()
        sampler.join()
        m1 = losses(sampler.last)
        wall_term, t_term = time.time_ns(), time.monotonic()
        flood_stop = b.stop_latency()
        flood_out = client_result(flood, duration + 60)
        window_s = (wall_term - wall_flood) / 1e9
        flood_rows = rows(db, "hostile", wall_flood, wall_term)
        # ---- what reached the collector: a new agent drains what the old one left (pinned ring, spool) ----
        b.start_agent(config(b, port, ccfg, gen))
        deadline = time.monotonic() + 120
        while rows(db, "chat") - chat_before < 2 * ok and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(2)
        stored = rows(db, "chat") - chat_before
        hostile_rows = rows(db, "hostile") - hostile_before
        represented = decisions_represented(db, "hostile")
        delta = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m0}
        res["flood"] = {
            "loop": flood_out, "reload_s": flood_reload, "reload_median_s": median(flood_reload),
            "reload_max_s": max((x for x in flood_reload if x is not None), default=None),
            "flood_left_at_sigterm_s": round(max(0.0, t_flood + duration - t_term), 3),
            "reload_timeouts": sum(x is None for x in flood_reload), "stop_s": flood_stop,
            "agent_cpu_percent": round(cpu, 1), "collector_cpu_percent": round(ccpu, 1),
            "collector_rows_per_s": round(flood_rows / window_s, 1), "collector_rows_in_window": flood_rows,
            "collector_rows_total": hostile_rows, "decisions_represented": represented,
            "decisions_represented_of_attempts": round(represented / max(flood_out["attempts"], 1), 4),
            "peak_export_backlog": sampler.peak, "agent_counters_delta": delta,
            "db_bytes": sum(p.stat().st_size for p in tmp.glob("flows.db*")),
            "allowed_ok": ok, "allowed_records_stored": stored, "allowed_records_lost": 2 * ok - stored,
        }
        f = res["flood"]
        print(f"flood ({res['flood_program']}): {flood_out['rate_per_s']:,.0f} denied connects/s from one process "
              f"({flood_out['attempts']:,} in {flood_out['elapsed_s']}s)", flush=True)
        print(f"  collector: {f['collector_rows_per_s']:,.0f} records/s from the flood ({hostile_rows:,} records, "
              f"{f['db_bytes'] / 1e6:.1f} MB db), standing for {represented:,} decisions "
              f"({f['decisions_represented_of_attempts']:.1%} of the attempts)", flush=True)
        print(f"  agent: {f['agent_cpu_percent']}% CPU (collector {f['collector_cpu_percent']}%), reload "
              f"{f['reload_median_s']}s median / {f['reload_max_s']}s max ({f['reload_timeouts']} timeouts), "
              f"SIGTERM -> exit {flood_stop}s (None: killed after 60s; the flood ran {f['flood_left_at_sigterm_s']}s "
              "more)", flush=True)
        print(f"  export: peak spool {sampler.peak['spool_bytes'] / 1e6:.1f} MB, memory "
              f"{sampler.peak['memory_bytes'] / 1e6:.1f} MB; decision ring full {delta['decision_ring_full']:,.0f}, "
              f"dropped queue full {delta['export_dropped_queue_full']:,.0f}, spool full "
              f"{delta['export_dropped_spool_full']:,.0f}", flush=True)
        print(f"  allowed: {2 * ok - stored} of {2 * ok} records lost ({ok} of {connections} connections made)",
              flush=True)
        b.stop_latency()
    finally:
        b.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flood")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds the denied-connect loop runs")
    ap.add_argument("--connections", type=int, default=1000, help="allowed connections made during the flood")
    ap.add_argument("--reloads", type=int, default=5, help="SIGHUPs timed in each phase")
    ap.add_argument("--python-flood", action="store_true", help="the Python loop even when cc is there")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "flood-results.json")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.flood: error: run as root (it starts an agent)", file=sys.stderr)
        return 2
    if a.duration < 5:
        print(f"bench.flood: error: --duration {a.duration}: at least 5 seconds", file=sys.stderr)
        return 2
    res = run(a.duration, a.connections, a.reloads, a.python_flood)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
