"""Tells the agent when this host's addresses change, so the kernel's local_address map follows them.

An rtnetlink socket subscribed to the IPv4 and IPv6 address groups (RTM_NEWADDR / RTM_DELADDR). The messages only
wake the agent: it then rescans every address (agent/identity/host.py), so a message it cannot parse, or a burst the
socket buffer lost (ENOBUFS), still ends in the right map. Plain `socket` (the stdlib speaks AF_NETLINK): importing
pyroute2 for one subscription would cost the agent ~20 MB.
"""
from __future__ import annotations

import errno
import socket
import struct

RTMGRP_IPV4_IFADDR = 0x10     # <linux/rtnetlink.h>
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWADDR = 20
RTM_DELADDR = 21
NLMSG_HDR = struct.Struct("=IHHII")   # struct nlmsghdr: len, type, flags, seq, pid
RCVBUF = 1 << 20


def address_messages(data: bytes) -> int:
    """How many RTM_NEWADDR/RTM_DELADDR messages one netlink datagram holds (a truncated tail is ignored)."""
    n, off = 0, 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size:
            break
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            n += 1
        off += (length + 3) & ~3   # NLMSG_ALIGN
    return n


class AddressWatch:
    """A non-blocking subscription; `changed()` is polled from the agent loop."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError:
            self.sock.close()
            raise
        self.overflows = 0     # times the kernel dropped messages for us (each forced a rescan)

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        """True when an address came or went (or messages were lost) since the last call; reads all queued."""
        changed = False
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return changed
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                changed = True
                continue
            if address_messages(data):
                changed = True

    def close(self) -> None:
        self.sock.close()
