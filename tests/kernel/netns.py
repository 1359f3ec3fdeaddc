"""A test host in its own network namespace, joined to this one by a veth pair (198.18.0.0/15, the benchmarking
range). Removed by name at teardown."""
from __future__ import annotations

import fcntl
import re
import subprocess
import uuid

LOCK = "/run/lock/aimesh-test-netns.lock"   # parallel workers (pytest-xdist) pick their subnets one at a time


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


class NetnsHost:
    def __init__(self, extra_addrs: int = 1) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"aimt-{tag}"
        self.host_if, self.ns_if = f"aimh{tag}", f"aimn{tag}"
        lock = open(LOCK, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._make(tag, extra_addrs)
        finally:
            lock.close()

    def _make(self, tag: str, extra_addrs: int) -> None:
        used = {int(m) for m in re.findall(r"inet 198\.18\.(\d+)\.1/", subprocess.run(
            ["ip", "-4", "addr", "show"], capture_output=True, text=True).stdout)}
        octet = int(tag[:2], 16)
        free = [o for o in range(256) if o not in used]
        if octet in used and free:
            octet = free[octet % len(free)]   # a subnet no other test host (of any worker) holds now
        self.host_addr = f"198.18.{octet}.1"
        self.addrs = [f"198.18.{octet}.{2 + i}" for i in range(1 + extra_addrs)]
        self.host_addr6 = f"fd00:aim:{octet:x}::1".replace("aim", "a1")
        self.addrs6 = [f"fd00:a1:{octet:x}::{2 + i:x}" for i in range(1 + extra_addrs)]
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.ns)
            _ip("addr", "add", f"{self.host_addr}/24", "dev", self.host_if)
            _ip("-6", "addr", "add", f"{self.host_addr6}/64", "dev", self.host_if, "nodad")
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            for a in self.addrs:
                _ip("-n", self.ns, "addr", "add", f"{a}/24", "dev", self.ns_if)
            for a in self.addrs6:
                _ip("-n", self.ns, "-6", "addr", "add", f"{a}/64", "dev", self.ns_if, "nodad")
            _ip("-n", self.ns, "link", "set", self.ns_if, "up")
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.ns, check=False)
