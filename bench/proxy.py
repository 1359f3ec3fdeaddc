"""The sidecar-style paths: our own HAProxy processes, a private network namespace and an nft REDIRECT table.

Never the system's haproxy service or the host's ruleset: each haproxy runs in the foreground (-db) from a config
file in the bench's temporary directory; the nft table (`aimesh_bench_<pid>`) lives inside a network namespace of
our own (`aimesh-bench-<pid>`), so its NAT hook, and the connection tracking that comes with it, never sees another
tenant's traffic. Cleanup deletes the table and the namespace by name, and stops the processes by pid.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from bench import loadgen

# command -> the Debian package that provides it
TOOLS = {"haproxy": "haproxy", "nft": "nftables", "ip": "iproute2", "nsenter": "util-linux"}


class ProxyError(RuntimeError):
    pass


def ensure_tools(commands: list[str]) -> list[str]:
    """Install (apt-get, idempotent) the packages of the commands that are missing; returns what was done."""
    missing = [c for c in commands if shutil.which(c) is None]
    if not missing:
        return []
    pkgs = sorted({TOOLS[c] for c in missing})
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:      # a stale package list: update once, then try again
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    still = [c for c in missing if shutil.which(c) is None]
    if still:
        raise ProxyError(f"cannot install {', '.join(pkgs)} for {', '.join(still)}: {res.stderr.strip()[-300:]}")
    return [" ".join(cmd)]


# ---- network namespace ----
def create_netns(name: str) -> None:
    if Path(loadgen.netns_path(name)).exists():
        raise ProxyError(f"network namespace {name} exists already (not ours: refusing to reuse it)")
    for cmd in (["ip", "netns", "add", name], ["ip", "-n", name, "link", "set", "lo", "up"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ProxyError(f"{' '.join(cmd)}: {res.stderr.strip()}")


def delete_netns(name: str) -> Optional[str]:
    res = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    return None if res.returncode == 0 else f"ip netns del {name}: {res.stderr.strip()}"


# ---- nft ----
@dataclass(frozen=True)
class Redirect:
    """nat OUTPUT: TCP from sockets in `cgroup` to `dport` goes to `to_port` on the same host instead."""
    table: str
    netns: str
    cgroup: Path          # absolute path of the client's cgroup
    mount: Path           # the cgroup2 mount
    dport: int
    to_port: int

    def level(self) -> int:
        return len(self.cgroup.relative_to(self.mount).parts)

    def nft_path(self) -> str:
        """nft resolves the path below /sys/fs/cgroup; the level counts from the cgroup2 root."""
        return str(self.cgroup.relative_to("/sys/fs/cgroup"))

    def ruleset(self) -> str:
        return (f"table ip {self.table} {{\n"
                f"  chain output {{\n"
                f"    type nat hook output priority -100; policy accept;\n"
                f"    socket cgroupv2 level {self.level()} \"{self.nft_path()}\" tcp dport {self.dport} "
                f"counter redirect to :{self.to_port}\n"
                f"  }}\n"
                f"}}\n")

    def command_lines(self, rules_file: Path) -> list[str]:
        ns = f"nsenter --net={loadgen.netns_path(self.netns)}"
        return [f"{ns} nft -f {rules_file}", f"{ns} nft delete table ip {self.table}"]


def add_redirect(r: Redirect, rules_file: Path) -> None:
    try:
        r.cgroup.relative_to("/sys/fs/cgroup")
    except ValueError:
        raise ProxyError(f"nft finds cgroups below /sys/fs/cgroup only; the cgroup2 mount is {r.mount}") from None
    rules_file.write_text(r.ruleset())
    res = subprocess.run(["nsenter", f"--net={loadgen.netns_path(r.netns)}", "nft", "-f", str(rules_file)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ProxyError(f"nft -f {rules_file}: {res.stderr.strip()}")


def delete_table(netns: str, table: str) -> Optional[str]:
    res = subprocess.run(["nsenter", f"--net={loadgen.netns_path(netns)}", "nft", "delete", "table", "ip", table],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else f"nft delete table ip {table} (netns {netns}): {res.stderr.strip()}"


# ---- haproxy ----
def haproxy_config(frontends: list[tuple[int, int]]) -> str:
    """TCP mode, one thread, one frontend per (listen port, server port) on 127.0.0.1; nothing else."""
    out = ["global",
           "    nbthread 1",
           "    maxconn 8000",
           "",
           "defaults",
           "    mode tcp",
           "    timeout connect 5s",
           "    timeout client 60s",
           "    timeout server 60s",
           ""]
    for i, (listen, server) in enumerate(frontends):
        out += [f"listen bench{i}",
                f"    bind 127.0.0.1:{listen} backlog 4096",
                f"    server s{i} 127.0.0.1:{server}",
                ""]
    return "\n".join(out)


@dataclass
class ProxyProc:
    name: str
    line: str
    config: Path
    popen: subprocess.Popen
    ps: psutil.Process


def _listening(pid: int, ports: set[int]) -> bool:
    """All ports in LISTEN in the network namespace of pid (read from /proc/PID/net/tcp)."""
    try:
        text = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    found = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A":
            found.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports <= found


def start_haproxy(name: str, config_text: str, tmpdir: Path, cgroup: Path, cpu: Optional[int],
                  netns: Optional[str], ports: list[int], timeout_s: float = 10.0) -> ProxyProc:
    cfg = tmpdir / f"haproxy-{name}.cfg"
    cfg.write_text(config_text)
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ProxyError(f"haproxy -c -f {cfg}: {(check.stdout + check.stderr).strip()}")
    line = loadgen.shell_line(cgroup, cpu, ["haproxy", "-db", "-f", str(cfg)], netns)
    log = open(tmpdir / f"haproxy-{name}.log", "wb")
    try:
        p = subprocess.Popen(["sh", "-c", line], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    finally:
        log.close()
    proc = ProxyProc(name=name, line=line, config=cfg, popen=p, ps=psutil.Process(p.pid))
    deadline = time.monotonic() + timeout_s
    while not _listening(p.pid, set(ports)):
        if p.poll() is not None or time.monotonic() > deadline:
            stop_haproxy(proc)
            tail = (tmpdir / f"haproxy-{name}.log").read_text(errors="replace")[-500:]
            raise ProxyError(f"haproxy {name} did not listen on {ports}: {tail.strip() or 'no output'}\n  {line}")
        time.sleep(0.05)
    return proc


def stop_haproxy(proc: ProxyProc) -> None:
    if proc.popen.poll() is None:
        proc.popen.terminate()
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()

