"""`python -m bench.restart`: what an agent restart costs now that the datapath lives in bpffs.

Side by side in one run, on one private cgroup subtree (aimesh-bench-restart-<pid>):
  ready     seconds from `aimesh agent` starting to /healthz 200: first install (nothing pinned: compile + load),
            restart with the same programs (adopt), restart with one changed program (a copy of bpf/ with one
            program edited, alternating between two copies so every restart swaps a program).
  gap       two clients connect in a tight loop through each restart (one allowed, one denied by the policy) and
            count every attempt the kernel handled against the policy in force: SIGTERM + start, kill -9 + start,
            and, as the baseline of the old behaviour, `--ephemeral` (detach at exit, attach at start).
  records   records lost across a kill -9 with N flow records queued: the agent is stopped (SIGSTOP), N/2
            connections are made (2 records each: client and server are governed), the agent is killed, a new one
            starts; the collector's stored rows are compared with N.
  rss       agent RSS after start and one scrape, with 10 and 1,000 governed workloads (cgroups).
Figures are printed and written to bench/restart-results.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench.local import PY, REPO, LocalBench, free_port

PROBER = REPO / "tests" / "kernel" / "prober.py"
SERVER = REPO / "tests" / "kernel" / "workloads.py"


class Bench(LocalBench):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "restart")


def config(b: Bench, port: int, **over) -> dict:
    cfg = {"mode": "enforce",
           "identities": [
               {"name": "chat", "kind": "service", "select": {"cgroups": [b.rel(b.root) + "/chat"]}},
               {"name": "batch", "kind": "service", "select": {"cgroups": [b.rel(b.root) + "/batch"]}},
               {"name": "llama", "kind": "model", "select": {"cgroups": [b.rel(b.root) + "/llama"]}},
               {"name": "fleet", "kind": "service", "select": {"cgroups": [b.rel(b.root) + "/fleet/*"]}}],
           "policies": [{"from": "chat", "to": "llama", "ports": [port]}],
           "telemetry": {"interim_interval": 0}}
    cfg.update(over)
    return cfg


def probers(b: Bench, port: int, duration: float) -> tuple[subprocess.Popen, subprocess.Popen]:
    out = []
    for g in ("chat", "batch"):
        p = b.spawn([PY, str(PROBER), "--port", str(port), "--duration", str(duration)], b.group(g),
                    stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        out.append(p)
    return out[0], out[1]


def result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])["counts"]


def gap_cycle(b: Bench, cfg: dict, port: int, how: str, extra: tuple[str, ...] = ()) -> dict:
    allowed, denied = probers(b, port, 4.0)
    time.sleep(0.8)
    b.stop_agent(signal.SIGKILL if how == "kill9" else signal.SIGTERM)
    b.start_agent(cfg, extra)
    a, d = result(allowed), result(denied)
    wrong_allow = d.get("ok", 0)
    wrong_deny = sum(n for k, n in a.items() if k != "ok")
    return {"attempts": sum(a.values()) + sum(d.values()), "denied_client_connected": wrong_allow,
            "allowed_client_refused": wrong_deny, "wrong": wrong_allow + wrong_deny}


def stored(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM flows WHERE kind = 1 OR kind IS NULL").fetchone()[0]
    except sqlite3.Error:
        return con.execute("SELECT COUNT(*) FROM flows").fetchone()[0]
    finally:
        con.close()


def run(rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="aimesh-bench-restart-"))
    b = Bench(tmp)
    res: dict = {}
    try:
        port = free_port()
        b.spawn([PY, str(SERVER), "server", "--port", str(port), "--name", "llama", "--count", "0", "--timeout",
                 "600"], b.group("llama"), stdout=subprocess.PIPE)
        time.sleep(0.5)
        cfg = config(b, port)
        # ---- ready ----
        first = b.start_agent(cfg)
        same = []
        for _ in range(rounds):
            b.stop_agent()
            same.append(b.start_agent(cfg))
        copies = []
        for i in range(2):
            d = tmp / f"bpf{i}"
            shutil.copytree(REPO / "bpf", d)
            src = (d / "sock_egress.c").read_text()
            (d / "sock_egress.c").write_text(src.replace("int aimesh_egress(struct __sk_buff *skb)\n{\n",
                                             f"int aimesh_egress(struct __sk_buff *skb)\n{{\n\tif (skb->len == "
                                             f"{0x7ffffff0 + i})\n\t\treturn 1;\n"))
            copies.append(d)
        changed = []
        for i in range(rounds):
            b.stop_agent()
            changed.append(b.start_agent(cfg, ("--bpf-root", str(copies[i % 2]))))
        b.stop_agent()
        b.start_agent(cfg)          # back to the tree's own programs
        res["ready_s"] = {"first_install": round(first, 3), "same_programs_median": round(statistics.median(same), 3),
                          "same_programs": [round(x, 3) for x in same],
                          "one_program_changed_median": round(statistics.median(changed), 3),
                          "one_program_changed": [round(x, 3) for x in changed]}
        print(f"ready: first install {first:.2f}s; restart, same programs {statistics.median(same):.3f}s "
              f"(median of {rounds}); one program changed {statistics.median(changed):.3f}s", flush=True)
        # ---- gap ----
        res["gap"] = {}
        for how, extra in (("sigterm", ()), ("kill9", ()), ("ephemeral_baseline", ("--ephemeral",))):
            if how == "ephemeral_baseline":
                b.stop_agent()
                from agent.identity.cgroups import uninstall_datapath
                uninstall_datapath(b.root)
                b.start_agent(cfg, extra)
            g = gap_cycle(b, cfg, port, how, extra)
            res["gap"][how] = g
            print(f"gap ({how}): {g['attempts']:,} connects during the cycle, {g['denied_client_connected']:,} "
                  f"denied connects got through, {g['allowed_client_refused']:,} allowed ones refused", flush=True)
        b.stop_agent()
        from agent.identity.cgroups import uninstall_datapath
        uninstall_datapath(b.root)
        # ---- records across a kill -9 ----
        from agent.collector.auth import load_or_create_token
        cport = free_port()
        db, token = tmp / "flows.db", tmp / "collector.token"
        load_or_create_token(token)
        b.spawn([PY, "-m", "agent", "collector", "--listen", f"127.0.0.1:{cport}", "--db", str(db), "--token-file",
                 str(token)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        ccfg = config(b, port, collector={"address": f"127.0.0.1:{cport}", "spool_dir": str(tmp / "spool"),
                                          "token_file": str(token), "flush_interval": 0.2})
        b.start_agent(ccfg)
        res["records"] = []
        for conns in (2000, 5000):
            before = stored(db)
            b.agent.send_signal(signal.SIGSTOP)
            p = b.spawn([PY, str(SERVER), "client", "--port", str(port), "--count", str(conns), "--timeout", "2"],
                        b.group("chat"), stdout=subprocess.PIPE, text=True)
            p.communicate(timeout=300)
            b.agent.send_signal(signal.SIGKILL)
            b.agent.wait()
            b.start_agent(ccfg)
            want = 2 * conns
            deadline = time.monotonic() + 60
            while stored(db) - before < want and time.monotonic() < deadline:
                time.sleep(0.3)
            got = stored(db) - before
            res["records"].append({"queued_records": want, "stored": got, "lost": want - got})
            print(f"records: {want:,} queued in the kernel ring while the agent was stopped, then kill -9: "
                  f"{got:,} stored, {want - got:,} lost", flush=True)
        b.stop_agent()
        uninstall_datapath(b.root)
        # ---- rss ----
        res["rss_mb"] = {}
        for n in (10, 1000):
            for i in range(n):
                b.group(f"fleet/w{i}")
            b.start_agent(cfg)
            time.sleep(1)
            rss = b.rss() / 1e6
            res["rss_mb"][str(n)] = round(rss, 1)
            print(f"rss: {rss:.1f} MB with {n} governed workloads", flush=True)
            b.stop_agent()
    finally:
        b.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.restart")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "restart-results.json")
    a = ap.parse_args(argv)
    res = run(a.rounds)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
