"""Socket-semantics conformance workloads: `server PORTS_JSON` serves every scenario on its own port (one thread
each); `client PORTS_JSON` runs every scenario against it and prints one JSON object, scenario -> what the
application saw (data, errors by errno name, readiness events). The same run with the fast path on, off and with no
agent must print the same object (tests/kernel/test_socket_conformance.py compares them)."""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HOST = "127.0.0.1"
WAIT = 10.0    # the longest a client waits for anything that should happen (a hang shows up as a result, not a stall)


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def _recv_all(c: socket.socket) -> bytes:
    out = b""
    while True:
        b = c.recv(65536)
        if not b:
            return out
        out += b


# ---------------------------------------------------------------- servers: one handler per scenario, per connection

def srv_echo_after_eof(c):          # the issue-23 echo server: read to EOF, answer, close
    c.sendall(_recv_all(c))


def srv_reply_on_request(c):        # answer each 1-byte request with 10 bytes, until EOF
    while True:
        b = c.recv(1)
        if not b:
            return
        c.sendall(b"0123456789")


def srv_chunks(c):                  # on a request, 100,000 bytes in 10 writes with pauses, then close
    c.recv(1)
    for i in range(10):
        c.sendall(bytes([65 + i]) * 10000)
        time.sleep(0.01)


def srv_silent(c):                  # reads to EOF, says nothing
    _recv_all(c)


def srv_halfclose_first(c):         # says bye and half-closes, then reads the client's data to EOF
    c.sendall(b"bye")
    c.shutdown(socket.SHUT_WR)
    _recv_all(c)


def srv_rst(c):                     # on a request, close with SO_LINGER 0: a RST
    c.recv(1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def srv_abort_mid_stream(c):        # reads 64 KiB of a big upload, then closes with the rest unread (the peer "exits")
    got = 0
    while got < 65536:
        b = c.recv(65536 - got)
        if not b:
            break
        got += len(b)
    c.close()


def srv_slow_reader(c):             # reads slowly at first (back-pressure), then to EOF; answers the byte count
    time.sleep(0.3)
    n = len(_recv_all(c))
    c.sendall(str(n).encode())


def srv_splice(c):                  # receives with splice(2) through a pipe; answers the byte count
    r, w = os.pipe()
    n = 0
    try:
        while True:
            k = os.splice(c.fileno(), w, 65536)
            if k == 0:
                break
            n += len(os.read(r, k))
    finally:
        os.close(r)
        os.close(w)
    c.sendall(str(n).encode())


SERVERS = {
    "halfclose_echo_300": srv_echo_after_eof,
    "blocking_recv": srv_reply_on_request,
    "nonblocking_recv": srv_reply_on_request,
    "msg_dontwait": srv_reply_on_request,
    "so_rcvtimeo": srv_silent,
    "msg_peek": srv_reply_on_request,
    "msg_waitall": srv_chunks,
    "fionread": srv_reply_on_request,
    "epoll_edge_level": srv_reply_on_request,
    "select_poll": srv_reply_on_request,
    "halfclose_server_first": srv_halfclose_first,
    "rst_linger0": srv_rst,
    "peer_aborts_mid_stream": srv_abort_mid_stream,
    "slow_reader_backpressure": srv_slow_reader,
    "sendfile": srv_echo_after_eof,
    "splice_recv": srv_splice,
    "concurrent_100": srv_echo_after_eof,
    "threads_echo": srv_reply_on_request,
    "asyncio_echo": srv_reply_on_request,
}


def serve(ports: dict) -> None:
    def loop(ls, handler):
        while True:
            c, _ = ls.accept()

            def one(c=c):
                try:
                    handler(c)
                except OSError:
                    pass
                finally:
                    c.close()
            threading.Thread(target=one, daemon=True).start()

    for name, port in ports.items():
        ls = socket.create_server((HOST, port), backlog=512)
        threading.Thread(target=loop, args=(ls, SERVERS[name]), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    threading.Event().wait()


# ---------------------------------------------------------------- clients: what the application sees

def _conn(port) -> socket.socket:
    return socket.create_connection((HOST, port))


def _readable(s, timeout=WAIT) -> bool:
    return bool(select.select([s], [], [], timeout)[0])


def cli_halfclose_echo_300(port):
    """The issue-23 repro: connect, sendall, shutdown(SHUT_WR), recv(100) on a blocking socket, 300 times."""
    seen: dict = {}
    for _ in range(300):
        s = _conn(port)
        try:
            s.sendall(b"y")
            s.shutdown(socket.SHUT_WR)
            k = repr(s.recv(100))
        except OSError as e:
            k = _err(e)
        finally:
            s.close()
        seen[k] = seen.get(k, 0) + 1
    return seen


def cli_blocking_recv(port):
    s = _conn(port)
    out = []
    for _ in range(200):
        s.sendall(b"q")
        got = b""
        while len(got) < 10:
            got += s.recv(10 - len(got))
        out.append(got)
    s.shutdown(socket.SHUT_WR)
    tail = s.recv(100)
    s.close()
    return [sorted(set(x.decode() for x in out)), len(out), repr(tail)]


def cli_nonblocking_recv(port):
    s = _conn(port)
    s.setblocking(False)
    out = []
    try:
        s.recv(10)
        out.append("data before request")
    except OSError as e:
        out.append(_err(e))
    s.sendall(b"q")
    got = b""
    while len(got) < 10 and _readable(s):
        try:
            got += s.recv(10 - len(got))
        except OSError as e:
            out.append(_err(e))
            break
    out.append(got.decode())
    try:
        s.recv(10)
        out.append("data after drain")
    except OSError as e:
        out.append(_err(e))
    s.shutdown(socket.SHUT_WR)
    if _readable(s):
        out.append(repr(s.recv(10)))
    s.close()
    return out


def cli_msg_dontwait(port):
    s = _conn(port)
    out = []
    try:
        s.recv(10, socket.MSG_DONTWAIT)
        out.append("data")
    except OSError as e:
        out.append(_err(e))
    s.sendall(b"q")
    _readable(s)
    got = b""
    while len(got) < 10:
        got += s.recv(10 - len(got), socket.MSG_DONTWAIT) if _readable(s) else b"!"
    out.append(got.decode())
    try:
        s.recv(10, socket.MSG_DONTWAIT)
        out.append("data")
    except OSError as e:
        out.append(_err(e))
    s.close()
    return out


def cli_so_rcvtimeo(port):
    s = _conn(port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    out = []
    for _ in range(3):
        try:
            out.append(repr(s.recv(10)))
        except OSError as e:
            out.append(_err(e))
    s.close()
    return out


def cli_msg_peek(port):
    s = _conn(port)
    s.sendall(b"q")
    got = b""
    while len(got) < 10 and _readable(s):        # wait until all ten are there
        got = s.recv(100, socket.MSG_PEEK)
        if len(got) < 10:
            time.sleep(0.01)
    out = [got.decode(), s.recv(3, socket.MSG_PEEK).decode(), s.recv(4).decode(), s.recv(100, socket.MSG_PEEK).decode(),
           s.recv(100).decode()]
    s.close()
    return out


def cli_msg_waitall(port):
    s = _conn(port)
    s.settimeout(WAIT)
    s.sendall(b"q")
    try:
        got = s.recv(100000, socket.MSG_WAITALL)
        r = [len(got), sorted(set(got))[:1] == [65]]
    except OSError as e:
        r = [_err(e)]
    s.close()
    return r


def cli_fionread(port):
    import fcntl
    import termios
    s = _conn(port)
    s.sendall(b"q")
    _readable(s)
    n = 0
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        n = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        if n >= 10:
            break
        time.sleep(0.01)
    s.recv(4)
    after = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    s.close()
    return [n, after]


def cli_epoll_edge_level(port):
    s = _conn(port)
    s.setblocking(False)
    et, lt = select.epoll(), select.epoll()
    et.register(s.fileno(), select.EPOLLIN | select.EPOLLET)
    lt.register(s.fileno(), select.EPOLLIN)
    out = [et.poll(0), lt.poll(0)]                        # nothing yet
    s.sendall(b"q")
    ev = et.poll(WAIT)
    out.append([e for _, e in ev])
    while True:                                           # all ten bytes there (it is one write)
        if len(s.recv(100, socket.MSG_PEEK)) >= 10:
            break
        time.sleep(0.01)
    s.recv(4)
    out.append([e for _, e in et.poll(0.2)])              # edge: no new data, no event
    out.append([e for _, e in lt.poll(0)])                # level: still readable
    s.recv(100)
    out.append([e for _, e in lt.poll(0)])                # drained
    s.shutdown(socket.SHUT_WR)
    out.append([e for _, e in lt.poll(WAIT)])             # the server's FIN
    out.append(s.recv(10).decode())
    et.close()
    lt.close()
    s.close()
    return out


def cli_select_poll(port):
    s = _conn(port)
    p = select.poll()
    p.register(s.fileno(), select.POLLIN | select.POLLOUT)
    out = [[e for _, e in p.poll(0)], select.select([s], [s], [], 0)[:2] == ([], [s])]
    s.sendall(b"q")
    out.append(_readable(s))
    out.append(sorted(e for _, e in p.poll(0)))
    s.close()
    return out


def _halfclose_server_first_once(port):
    s = _conn(port)
    s.settimeout(WAIT)
    try:
        out = [_recv_all(s).decode()]                     # "bye", then EOF
        try:
            s.sendall(b"z" * 200000)                      # our direction is still open
            out.append("sent")
        except OSError as e:
            out.append(_err(e))
        s.shutdown(socket.SHUT_WR)
        out.append(repr(s.recv(10)))
    except OSError as e:
        out = [_err(e)]
    finally:
        s.close()
    return out


def cli_halfclose_server_first(port):
    """The server half-closes first and then blocks in recv: 100 times (a race shows up as a count)."""
    seen: dict = {}
    for _ in range(100):
        k = json.dumps(_halfclose_server_first_once(port))
        seen[k] = seen.get(k, 0) + 1
    return seen


def cli_rst_linger0(port):
    s = _conn(port)
    s.settimeout(WAIT)
    s.sendall(b"q")
    out = []
    for _ in range(2):
        try:
            out.append(repr(s.recv(10)))
        except OSError as e:
            out.append(_err(e))
    try:
        s.sendall(b"x")
        out.append("sent")
    except OSError as e:
        out.append(_err(e))
    s.close()
    return out


def _reset(e: OSError) -> str:
    """The peer closed with our bytes unread, so it sent RST: a send fails with ECONNRESET when the RST is news, or
    with EPIPE when it came in before the send; which one is timing, without aimesh too."""
    return "reset (ECONNRESET|EPIPE)" if e.errno in (errno.ECONNRESET, errno.EPIPE) else _err(e)


def cli_peer_aborts_mid_stream(port):
    s = _conn(port)
    s.settimeout(WAIT)
    out = []
    try:
        for _ in range(256):
            s.sendall(b"u" * 65536)
        out.append("all sent")
    except OSError as e:
        out.append(_reset(e))
    try:
        out.append(repr(s.recv(10)))
    except OSError as e:
        out.append(_reset(e))
    s.close()
    return out


def cli_slow_reader_backpressure(port):
    s = _conn(port)
    s.setblocking(False)
    sent, blocked = 0, False
    while sent < (64 << 20):
        try:
            sent += s.send(b"b" * 65536)
        except BlockingIOError:
            blocked = True
            break
    s.setblocking(True)
    s.settimeout(WAIT)
    total = sent + (4 << 20)
    s.sendall(b"b" * (4 << 20))
    s.shutdown(socket.SHUT_WR)
    answer = int(_recv_all(s))
    s.close()
    return [blocked, answer == total]


def cli_sendfile(port):
    import tempfile
    data = bytes(range(256)) * 4096                       # 1 MiB
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        s = _conn(port)
        s.settimeout(WAIT)
        n = s.sendfile(f)
        s.shutdown(socket.SHUT_WR)
        back = _recv_all(s)
        s.close()
    return [n, back == data]


def cli_splice_recv(port):
    s = _conn(port)
    s.settimeout(WAIT)
    s.sendall(b"s" * 300000)
    s.shutdown(socket.SHUT_WR)
    try:
        r = [_recv_all(s).decode()]
    except OSError as e:
        r = [_err(e)]
    s.close()
    return r


def cli_concurrent_100(port):
    def one(i):
        s = _conn(port)
        s.settimeout(WAIT)
        msg = (b"%d-" % i) * 1000
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        try:
            ok = _recv_all(s) == msg
        except OSError as e:
            ok = _err(e)
        s.close()
        return ok
    with ThreadPoolExecutor(100) as ex:
        res = list(ex.map(one, range(100)))
    return {str(k): res.count(k) for k in set(res)}


def cli_threads_echo(port):
    def one(_):
        s = _conn(port)
        n = 0
        for _ in range(100):
            s.sendall(b"q")
            got = b""
            while len(got) < 10:
                got += s.recv(10 - len(got))
            n += got == b"0123456789"
        s.close()
        return n
    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, range(8)))


def cli_asyncio_echo(port):
    import asyncio

    async def one():
        r, w = await asyncio.open_connection(HOST, port)
        n = 0
        for _ in range(100):
            w.write(b"q")
            await w.drain()
            n += await r.readexactly(10) == b"0123456789"
        w.write_eof()
        tail = await r.read()
        w.close()
        await w.wait_closed()
        return [n, repr(tail)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(10))), 60)
    return asyncio.run(main())


def run_clients(ports: dict) -> dict:
    out = {}
    for name, port in ports.items():
        try:
            out[name] = globals()["cli_" + name](port)
        except Exception as e:       # what the application would have raised is the result
            out[name] = f"raised {type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    role, ports = sys.argv[1], json.loads(sys.argv[2])
    if role == "server":
        serve(ports)
    else:
        only = sys.argv[3:] or list(ports)
        print(json.dumps(run_clients({k: ports[k] for k in only})), flush=True)
