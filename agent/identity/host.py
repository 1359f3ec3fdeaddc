"""This host's addresses and its listening sockets, so the kernel knows which destinations are local."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

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
