"""Who dialed what, for a connection the kernel handed to the gateway: the pinned gateway_origin map.

At connect, bpf/sock_addr.c rewrites a connection that needs L7 policy to the gateway and records the destination as
dialed and the source identity; at established, bpf/sock_ops.c files it under the client socket's local address and
port, which is the peer address the gateway's accept() reports. lookup() reads and deletes that entry: one origin
per accepted connection, and a connection that did not come through the kernel has none (the gateway refuses it:
identity comes from the kernel only, never from a header).

No bcc: the map is opened by its pin (Datapath.map_paths["gateway_origin"]) through agent/kernel/bpfsys.py.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Optional

from agent.kernel import abi, bpfsys


@dataclass(frozen=True, slots=True)
class Origin:
    """One hand-off: the destination as the client dialed it and the identities (numbers of the agent's numbering,
    names in its manifest)."""
    address: str            # dialed address; IPv4 as dotted quad (also when dialed v4-mapped from an IPv6 socket)
    port: int
    family: int             # socket.AF_INET or socket.AF_INET6, of the dialed address
    src_id: int
    dst_id: int
    tls_expected: bool      # the client speaks TLS (llm.tls: intercept)
    cookie: int             # the client socket's cookie (joins the agent's flow records)
    ts_ns: int              # CLOCK_MONOTONIC at connect
    policy_gen: int         # the policy generation live at connect


def client_key(peer_ip: str, peer_port: int) -> abi.GatewayClientKey:
    """The map key for an accepted connection's peer: 16-byte address (IPv4 v4-mapped), port in host order."""
    addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    if not 0 < peer_port <= 65535:
        raise ValueError(f"peer port {peer_port} must be 1-65535")
    k = abi.GatewayClientKey()
    k.addr[:] = (b"\x00" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed
    k.port = peer_port
    return k


def origin_of(v: abi.GatewayOrigin) -> Origin:
    raw = bytes(v.addr)
    a = ipaddress.IPv6Address(raw)
    mapped = a.ipv4_mapped
    return Origin(address=str(mapped if mapped is not None else a), port=int(v.port),
                  family=socket.AF_INET if v.family == socket.AF_INET else socket.AF_INET6,
                  src_id=int(v.src_id), dst_id=int(v.dst_id),
                  tls_expected=bool(v.flags & abi.GatewayOriginFlag.TLS), cookie=int(v.cookie), ts_ns=int(v.ts_ns),
                  policy_gen=int(v.policy_gen))


class OriginTable:
    """The pinned gateway_origin map, opened once; lookup() takes an entry out."""

    def __init__(self, pin_path: str) -> None:
        self.pin_path = str(pin_path)
        self._fd = bpfsys.obj_get(self.pin_path)   # BpfError naming the path when nothing is pinned there

    def lookup(self, peer_ip: str, peer_port: int) -> Optional[Origin]:
        """The origin of the accepted connection whose peer is peer_ip:peer_port, deleted from the map; None when the
        kernel handed no such connection (a client that connected to the gateway port itself)."""
        key = client_key(peer_ip, peer_port)
        value = abi.GatewayOrigin()
        if not bpfsys.map_lookup(self._fd, key, value):
            return None
        bpfsys.map_delete(self._fd, key)
        return origin_of(value)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "OriginTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
