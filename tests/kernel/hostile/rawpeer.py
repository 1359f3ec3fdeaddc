"""A hostile root workload: sends one datagram or TCP SYN to S without connect() or sendmsg() on an inet socket of
the kind the cgroup sock_addr hooks judge. Prints one JSON line: {"error": errno name or None, "answer": what S sent
back or None}.

    rawpeer.py MODE PORT [HOST [SOURCE IFACE MAC]]
                             MODE: udp4 (SOCK_RAW, IPPROTO_UDP), hdrincl4 (SOCK_RAW, IPPROTO_RAW: the caller writes the
                             IPv4 header), udp6 (SOCK_RAW over IPv6), syn4 (SOCK_RAW, IPPROTO_TCP: a bare SYN; the answer
                             is "syn-ack" when S's listener answered), packet (AF_PACKET: a whole Ethernet frame from
                             SOURCE out of IFACE to MAC; default lo). HOST defaults to the loopback address.
    rawpeer.py listen PORT HOST SECONDS
                             a UDP sink (run in the test's network namespace): prints {"listening": PORT}, then after
                             SECONDS {"got": [source address of each datagram]}
"""
from __future__ import annotations

import errno
import json
import random
import select
import socket
import struct
import sys
import time

LO4, LO6 = "127.0.0.1", "::1"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_header(proto: int, payload_len: int, src: str = LO4, dst: str = LO4) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, random.randrange(1 << 16), 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def udp_header(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)   # IPv4: checksum 0 means none


def answer_on(sock: socket.socket, timeout: float) -> str | None:
    if not select.select([sock], [], [], timeout)[0]:
        return None
    return sock.recv(2048).decode(errors="replace")


def send_udp(mode: str, port: int, host: str | None, link: list[str]) -> dict:
    """The reply comes back to an ordinary UDP socket bound to the source port the raw datagram claims."""
    v6 = mode == "udp6"
    host = host or (LO6 if v6 else LO4)
    source, iface, mac = link or [LO4, "lo", "00:00:00:00:00:00"]
    rx = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((LO6 if v6 else (source if mode == "packet" else LO4), 0))
    sport = rx.getsockname()[1]
    payload = b"raw ping"
    dgram = udp_header(sport, port, payload) + payload
    if mode == "udp4":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        send = lambda: s.sendto(dgram, (host, 0))
    elif mode == "hdrincl4":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)   # IP_HDRINCL implied
        send = lambda: s.sendto(ipv4_header(socket.IPPROTO_UDP, len(dgram), src="0.0.0.0", dst=host) + dgram,
                                    (host, 0))   # source 0: the kernel fills it in
    elif mode == "udp6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s.setsockopt(socket.IPPROTO_IPV6, 7, 6)   # IPV6_CHECKSUM: the kernel fills the UDP checksum at offset 6
        send = lambda: s.sendto(dgram, (host, 0))
    elif mode == "packet":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((iface, 0))
        frame = (bytes.fromhex(mac.replace(":", "")) + b"\0" * 6 + b"\x08\x00" +
                 ipv4_header(socket.IPPROTO_UDP, len(dgram), src=source, dst=host) + dgram)
        send = lambda: s.send(frame)
    else:
        raise SystemExit(f"unknown mode {mode}")
    try:
        send()
    except OSError as e:
        return {"error": errno.errorcode[e.errno], "answer": answer_on(rx, 0.5)}
    return {"error": None, "answer": answer_on(rx, 1.0)}


def send_syn(port: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)   # also receives a copy of TCP input
    sport = random.randrange(40000, 60000)
    seq = random.randrange(1 << 32)
    tcp = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(LO4) * 2 + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    try:
        s.sendto(tcp, (LO4, 0))
    except OSError as e:
        return {"error": errno.errorcode[e.errno], "answer": None}
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        pkt = s.recv(2048)
        ihl = (pkt[0] & 0xF) * 4
        src, dst, _, ack, _, flags = struct.unpack("!HHIIBB", pkt[ihl:ihl + 14])
        if src == port and dst == sport and flags & 0x12 == 0x12 and ack == (seq + 1) & 0xFFFFFFFF:
            return {"error": None, "answer": "syn-ack"}
    return {"error": None, "answer": None}


def listen(port: int, host: str, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print(json.dumps({"listening": port}), flush=True)
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            got.append(s.recvfrom(2048)[1][0])
    print(json.dumps({"got": got}), flush=True)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "listen":
        return listen(port, sys.argv[3], float(sys.argv[4]))
    host = sys.argv[3] if len(sys.argv) > 3 else None
    print(json.dumps(send_syn(port) if mode == "syn4" else send_udp(mode, port, host, sys.argv[4:7])), flush=True)


if __name__ == "__main__":
    main()
