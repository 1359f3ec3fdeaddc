"""This host's addresses and its listening sockets, so the kernel knows which destinations are local."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil
from pyroute2 import IPRoute

from agent.kernel import abi
from agent.policy.compile import addr16


def local_address_keys() -> list[abi.LocalEndpointKey]:
    keys = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            a = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not a:
                continue
            k = abi.LocalEndpointKey()
            k.addr[:] = addr16(ipaddress.ip_address(a.split("%")[0]))
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
