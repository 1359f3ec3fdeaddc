"""agent/identity/addrwatch.py: which netlink datagrams mean "this host's addresses changed"."""
from __future__ import annotations

import struct

from agent.identity.addrwatch import NLMSG_HDR, RTM_DELADDR, RTM_NEWADDR, address_messages

RTM_NEWLINK = 16


def msg(kind: int, payload: bytes = b"") -> bytes:
    body = NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), kind, 0, 0, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def test_counts_address_messages_only():
    data = msg(RTM_NEWADDR, b"\1\2\3") + msg(RTM_NEWLINK, b"x" * 8) + msg(RTM_DELADDR)
    assert address_messages(data) == 2
    assert address_messages(msg(RTM_NEWLINK)) == 0


def test_truncated_or_bogus_lengths_stop_the_walk():
    assert address_messages(b"") == 0
    assert address_messages(msg(RTM_NEWADDR)[:10]) == 0
    # a zero length would loop forever if trusted
    assert address_messages(struct.pack("=IHHII", 0, RTM_NEWADDR, 0, 0, 0) + msg(RTM_NEWADDR)) == 0
