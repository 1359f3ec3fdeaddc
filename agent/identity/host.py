"""This host's addresses and its listening sockets, so the kernel knows which destinations are local."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.kernel import abi
from agent.policy.compile import addr16


def local_address_keys() -> list[abi.LocalEndpointKey]:
    """Every address of every interface (psutil reads them over netlink; pyroute2 would cost the agent ~20 MB)."""
    keys = []
    seen: set[bytes] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            raw = addr16(ipaddress.ip_address(a.address.split("%")[0]))
            if raw in seen:
                continue
            seen.add(raw)
            k = abi.LocalEndpointKey()
            k.addr[:] = raw
            keys.append(k)
    return keys


RESOLV_CONF = Path("/etc/resolv.conf")
DNS_RESOLVER_CAPACITY = 64   # the kernel's dns_resolver map (bpf/include/maps.h, agent/kernel/registry.py)


def resolv_conf_nameservers(text: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf text, in order (a zone id dropped; anything not an IP skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return out


def dns_resolver_keys(configured: list[str], resolv_conf: Path = RESOLV_CONF) -> list[abi.LocalEndpointKey]:
    """The resolvers port 53 may reach under `dns: allow`: resolv.conf's nameservers (none when it cannot be read)
    and the configured ones, each once, at most the map's capacity."""
    try:
        found = resolv_conf_nameservers(resolv_conf.read_text())
    except OSError:
        found = []
    keys, seen = [], set()
    for a in found + list(configured):
        raw = addr16(ipaddress.ip_address(a))
        if raw in seen:
            continue
        seen.add(raw)
        k = abi.LocalEndpointKey()
        k.addr[:] = raw
        keys.append(k)
    return keys[:DNS_RESOLVER_CAPACITY]


@dataclass(frozen=True)
class Listener:
    addr: bytes      # 16-byte form
    port: int
    proto: int       # 6 or 17
    pid: int


def listeners() -> list[Listener]:
    """TCP listeners and bound UDP sockets with their owning pid (servers started before the agent)."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        if not c.laddr or c.pid is None:
            continue
        if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
            continue
        if c.type == socket.SOCK_DGRAM and c.raddr:
            continue
        ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        raw = b"\x00" * 16 if (ip.version == 6 and ip.is_unspecified) else addr16(ip)
        out.append(Listener(raw, c.laddr.port, 6 if c.type == socket.SOCK_STREAM else 17, c.pid))
    return out
