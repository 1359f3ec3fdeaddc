"""Plaintext capture end to end: the official openai SDK in a governed cgroup calls a local OpenAI-compatible server in
another; the kernel copies the socket's bytes (bpf/capture.c), the agent decodes them into model-call records."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tests.kernel.harness import REPO, _enter_cgroup, metric_value

SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.llm_server import LLMServer
srv = LLMServer().__enter__()
print(srv.url, flush=True)
sys.stdin.read()
"""

CLIENT = """
import json, sys
import openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-test", max_retries=0)
msg = [{"role": "user", "content": "say hello to the kernel"}]
r = c.chat.completions.create(model="llama-3.1-8b", messages=msg)
out = [{"model": r.model, "in": r.usage.prompt_tokens, "out": r.usage.completion_tokens, "stream": False}]
usage, model = None, None
for ch in c.chat.completions.create(model="llama-3.1-8b-s", messages=msg, stream=True,
                                    stream_options={"include_usage": True}):
    model = ch.model
    usage = ch.usage or usage
out.append({"model": model, "in": usage.prompt_tokens, "out": usage.completion_tokens, "stream": True})
c.close()
print(json.dumps(out))
"""


def start_llm_server(cgroup: Optional[Path]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(cgroup))
    url = p.stdout.readline().strip()
    if not url:
        raise AssertionError(f"llm server did not start: {p.stderr.read()}")
    return p, url


def run_openai(cgroup: Optional[Path], url: str) -> list[dict]:
    p = subprocess.run([sys.executable, "-c", CLIENT, url], capture_output=True, text=True, timeout=60,
                       preexec_fn=_enter_cgroup(cgroup))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def model_calls(path: Path, want: int = 0, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        calls = [r for r in recs if r.get("kind") == "model_call"]
        if len(calls) >= want or time.monotonic() > deadline:
            return calls
        time.sleep(0.05)


def test_openai_sdk_calls_become_model_call_records(cgroups, agents, tmp_path):
    chat, llama, store = cgroups.child("chat"), cgroups.child("llama"), cgroups.child("store")
    records = tmp_path / "records.jsonl"
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
            {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(llama)]}},
            {"name": "store", "kind": "dataset", "select": {"cgroups": [cgroups.rel(store)]}},   # llm capture off
        ],
        "policies": [{"from": "chat", "to": ["llama", "store"]}],
    }
    agent = agents(cfg, extra=["--records-log", str(records)])
    llama_srv, llama_url = start_llm_server(llama)
    store_srv, store_url = start_llm_server(store)
    try:
        seen = run_openai(chat, llama_url)
        calls = model_calls(records, want=2)
        assert len(calls) == 2, calls
        got = [{"model": c["response_model"], "in": c["input_tokens"], "out": c["output_tokens"],
                "stream": c["stream"]} for c in calls]
        assert got == seen
        assert [c["request_model"] for c in calls] == ["llama-3.1-8b", "llama-3.1-8b-s"]
        assert [c["response_model"] for c in calls] == ["llama-3.1-8b-served", "llama-3.1-8b-s-served"]
        for c in calls:
            assert c["source"]["name"] == "chat" and c["destination"]["name"] == "llama"
            # the address as dialed, from the connect's OPEN record
            assert (c["destination"]["address"], c["destination"]["port"]) == \
                (llama_url.rsplit("/", 1)[-1].split(":")[0], int(llama_url.rsplit(":", 1)[-1])), c["destination"]
            assert c["source"]["pid"] > 0 and c["cookie"] > 0
            assert c["protocol"] == "openai" and c["operation"] == "chat" and c["status"] == 200
            assert not c["incomplete"] and not c["truncated"] and c["finish_reasons"] == ["stop"]
        assert calls[0]["cookie"] == calls[1]["cookie"]     # one keep-alive connection, two requests in order

        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_model_calls_total", source="chat", destination="llama", protocol="openai",
                            operation="chat", status_class="2xx") == 2
        chunks = metric_value(m, "aimesh_capture_chunks_total")
        assert chunks > 0

        # the same calls from a process outside the governed root, and to an identity with capture off
        assert len(run_openai(None, llama_url)) == 2
        assert len(run_openai(chat, store_url)) == 2
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_chunks_total") == chunks   # counted in the syscall itself: no waiting
        # a captured call after them: once its records are in, anything the others made would be in too (ring order)
        assert len(run_openai(chat, llama_url)) == 2
        calls = model_calls(records, want=4)
        assert len(calls) == 4 and all(c["source"]["name"] == "chat" and c["destination"]["name"] == "llama"
                                       for c in calls)
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_model_calls_total") == 4
    finally:
        for p in (llama_srv, store_srv):
            p.kill()
            p.wait()


# ---- the capture datapath: optional links, iovecs, TLS, skip, per-request budget ----

RAW = r'''
import json, os, socket, sys
import openai

def conn(url):
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)))

def request(model, extra=""):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi there" + extra}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body

def parse(buf):
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    return (json.loads(rest[:n[0]]) if n and len(rest) >= n[0] else None), head

def read_with(recv):
    buf = b""
    while True:
        got = recv()
        if not got:
            raise SystemExit("connection closed early")
        buf += got
        obj, _ = parse(buf)
        if obj is not None:
            return obj

mode, url = sys.argv[1], sys.argv[2]
out = {}
if mode == "sink":   # a TCP server that reads and discards until the peer closes
    ls = socket.create_server(("127.0.0.1", 0))
    print(f"http://127.0.0.1:{ls.getsockname()[1]}", flush=True)
    c, _ = ls.accept()
    while c.recv(65536):
        pass
    sys.exit(0)
if mode == "big":   # openai-python: "model" after a 200 KB "messages"
    c = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    r = c.chat.completions.create(model="big-model", messages=[{"role": "user", "content": "word " * 40000}])
    out = {"model": r.model, "in": r.usage.prompt_tokens}
elif mode == "vector":   # sendmsg + recvmsg (2 iovecs), then writev + readv, on one keep-alive connection
    s = conn(url)
    head, body = request("vec-1")
    s.sendmsg([head, body[:10], body[10:]])
    def recvmsg():
        a, b = bytearray(64), bytearray(8192)
        n = s.recvmsg_into([a, b])[0]
        return (bytes(a) + bytes(b))[:n]
    r1 = read_with(recvmsg)
    head, body = request("vec-2")
    os.writev(s.fileno(), [head, body[:7], body[7:20], body[20:]])
    def readv():
        a, b = bytearray(100), bytearray(8192)
        n = os.readv(s.fileno(), [a, b])
        return (bytes(a) + bytes(b))[:n]
    r2 = read_with(readv)
    s.close()
    out = {"models": [r1["model"], r2["model"]]}
elif mode == "tls":   # a TLS ClientHello's record header on a captured socket
    s = conn(url)
    s.sendall(b"\x16\x03\x01\x00\x30" + b"\x01" * 48)
    s.sendall(b"\x17\x03\x03\x00\x10" + b"\x02" * 16)
    s.close()
elif mode == "h2":   # the HTTP/2 preface: the agent gives up, the kernel stops copying
    s = conn(url)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    print("sent", flush=True)
    sys.stdin.readline()
    for _ in range(5):
        s.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    s.close()
elif mode == "partial":   # non-blocking, a small send buffer: the kernel takes each send in part
    import select
    s = conn(url)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    head, body = request("partial-model", " pad" * 225000)   # 900 KB: more than the peer takes at once
    data, off, sends, short = head + body, 0, 0, 0
    s.setblocking(False)
    while off < len(data):
        try:
            n = s.send(data[off:])
        except BlockingIOError:
            select.select([], [s], [], 5)
            continue
        sends += 1
        short += n < len(data) - off
        off += n
    s.setblocking(True)
    r = read_with(lambda: s.recv(65536))
    s.close()
    out = {"model": r["model"], "bytes": len(data), "sends": sends, "short": short}
elif mode == "budget":   # model first (as curl users write it), a body past a 4 KiB request budget
    s = conn(url)
    head, body = request("budget-model", " pad" * 3000)
    s.sendall(head)
    s.sendall(body)
    first = len(head) + len(body)
    r = read_with(lambda: s.recv(65536))
    head, body = request("after-budget")     # the next request on the connection is still decoded
    s.sendall(head + body)
    r2 = read_with(lambda: s.recv(65536))
    s.close()
    out = {"models": [r["model"], r2["model"]], "bytes": first}
print(json.dumps(out), flush=True)
'''


def run_raw(cgroup: Optional[Path], mode: str, url: str) -> dict:
    p = subprocess.run([sys.executable, "-c", RAW, mode, url], capture_output=True, text=True, timeout=60,
                       preexec_fn=_enter_cgroup(cgroup))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def capture_config(cgroups, chat: Path, llama: Path, capture: bool, **limits) -> dict:
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
            {"name": "llama", "kind": "service", "select": {"cgroups": [cgroups.rel(llama)]},
             "llm": {"protocol": "auto" if capture else "off"}},
        ],
        "policies": [{"from": "chat", "to": ["llama"]}],
    }
    if limits:
        cfg["limits"] = limits
    return cfg


def _capture_prog_ids(root: Path) -> dict[str, int]:
    """Program id of each capture raw tracepoint program of the build in force (from the pinned build)."""
    import os as _os

    from agent.identity.cgroups import cgroup_id
    from agent.kernel import bpfsys, registry
    from agent.kernel.pins import DatapathDir, read_manifest
    d = DatapathDir.for_root(cgroup_id(root))
    progs = Path(read_manifest(d)["build"]["progs"])
    out = {}
    for p in registry.PROGRAMS:
        if p.group == registry.GROUP_CAPTURE:
            fd = bpfsys.obj_get(str(progs / p.name))
            try:
                out[p.link] = bpfsys.prog_info(fd).id
            finally:
                _os.close(fd)
    return out


def _kernel_links_to(prog_ids: set[int]) -> list[int]:
    """Ids of every bpf link in the kernel (BPF_LINK_GET_NEXT_ID) whose program is one of prog_ids."""
    import ctypes as ct
    import os as _os

    from agent.kernel import bpfsys
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    found, cur = [], ct.c_uint32(0)
    while lib.bpf_link_get_next_id(cur, ct.byref(cur)) == 0:
        fd = lib.bpf_link_get_fd_by_id(cur)
        if fd < 0:
            continue
        try:
            if bpfsys.link_info(fd).prog_id in prog_ids:
                found.append(cur.value)
        finally:
            _os.close(fd)
    return found


def _capture_links(root: Path) -> tuple[set[str], list[int]]:
    from agent.identity.cgroups import cgroup_id
    from agent.kernel import registry
    from agent.kernel.pins import DatapathDir
    d = DatapathDir.for_root(cgroup_id(root))
    ids = _capture_prog_ids(root)
    pinned = {p.link for p in registry.PROGRAMS if p.group == registry.GROUP_CAPTURE and (d.links / p.link).exists()}
    return pinned, _kernel_links_to(set(ids.values()))


def test_capture_tracepoints_are_linked_only_while_an_identity_has_capture_on(cgroups, agents, tmp_path):
    from agent.kernel import registry
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    records = tmp_path / "records.jsonl"
    everyone = {p.link for p in registry.PROGRAMS if p.group == registry.GROUP_CAPTURE}
    assert len(everyone) == 2        # raw_tracepoint sys_enter and sys_exit
    agent = agents(capture_config(cgroups, chat, llama, False), extra=["--records-log", str(records)])
    srv, url = start_llm_server(llama)
    try:
        assert _capture_links(cgroups.root) == (set(), [])     # no capture identity: no raw tracepoint
        run_openai(chat, url)
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_chunks_total") == 0

        agent.reload(capture_config(cgroups, chat, llama, True))
        pinned, live = _capture_links(cgroups.root)
        assert pinned == everyone and len(live) == 2
        assert len(run_openai(chat, url)) == 2
        assert len(model_calls(records, want=2)) == 2

        agent.reload(capture_config(cgroups, chat, llama, False))
        assert _capture_links(cgroups.root) == (set(), [])

        # on again, then a restart adopts the links (same kernel links, nothing re-created)
        agent.reload(capture_config(cgroups, chat, llama, True))
        _, before = _capture_links(cgroups.root)
        agent.stop()
        agent2 = agents(capture_config(cgroups, chat, llama, True), extra=["--records-log", str(records)])
        assert _capture_links(cgroups.root) == (everyone, before)
        assert "0 links created" in agent2.log()
        assert len(run_openai(chat, url)) == 2
        assert len(model_calls(records, want=4)) == 4
        # a restart with capture off unlinks them at start
        agent2.stop()
        agents(capture_config(cgroups, chat, llama, False))
        assert _capture_links(cgroups.root) == (set(), [])
    finally:
        srv.kill()
        srv.wait()


def test_iovecs_tls_undecoded_and_the_request_budget(cgroups, agents, tmp_path):
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    records = tmp_path / "records.jsonl"
    agent = agents(capture_config(cgroups, chat, llama, True), extra=["--records-log", str(records)])
    srv, url = start_llm_server(llama)
    try:
        # a 200 KB request in one write is copied whole by default: the model after "messages" is found
        seen = run_raw(chat, "big", url)
        calls = model_calls(records, want=1)
        assert len(calls) == 1 and calls[0]["request_model"] == "big-model", calls
        assert calls[0]["input_tokens"] == seen["in"] and not calls[0]["truncated"]
        assert calls[0]["request_bytes"] > 200_000
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_truncated_calls_total") == 0

        # sendmsg/recvmsg and writev/readv are copied across their iovecs
        assert run_raw(chat, "vector", url)["models"] == ["vec-1-served", "vec-2-served"]
        calls = model_calls(records, want=3)
        assert [c["request_model"] for c in calls[1:]] == ["vec-1", "vec-2"], calls
        assert [c["response_model"] for c in calls[1:]] == ["vec-1-served", "vec-2-served"]
        assert calls[1]["cookie"] == calls[2]["cookie"] and not calls[2]["truncated"]

        # partial sends (non-blocking, a 4 KiB send buffer, through the TCP stack: the fast path's sk_msg takes a
        # send whole): each copies what the kernel took, so the request is whole, in order, and request_bytes is its
        # exact size on the wire
        agent.reload({**capture_config(cgroups, chat, llama, True), "fast_path": False})
        seen = run_raw(chat, "partial", url)
        agent.reload(capture_config(cgroups, chat, llama, True))
        assert seen["short"] >= 1, seen       # the kernel did take some sends in part
        calls = model_calls(records, want=4)
        assert calls[3]["request_model"] == "partial-model" and calls[3]["response_model"] == "partial-model-served"
        assert not calls[3]["truncated"] and calls[3]["request_bytes"] == seen["bytes"], calls[3]

        # a TLS record: flagged and never copied
        _, m = agent.get("/metrics")
        chunks = metric_value(m, "aimesh_capture_chunks_total")
        skipped = metric_value(m, "aimesh_capture_not_captured_calls_total")
        run_raw(chat, "tls", url)
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_tls_sockets_total") == 1
        assert metric_value(m, "aimesh_capture_chunks_total") == chunks
        assert metric_value(m, "aimesh_capture_not_captured_calls_total") >= skipped + 2

        # HTTP/2 (to a server that reads it all): the agent counts it undecoded and flags the socket; what follows
        # is not copied
        sink = subprocess.Popen([sys.executable, "-c", RAW, "sink", ""], stdout=subprocess.PIPE, text=True,
                                preexec_fn=_enter_cgroup(llama))
        sink_url = sink.stdout.readline().strip()
        p = subprocess.Popen([sys.executable, "-c", RAW, "h2", sink_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(chat))
        try:
            assert p.stdout.readline().strip() == "sent"
            deadline = time.monotonic() + 10
            while metric_value(agent.get("/metrics")[1], "aimesh_capture_undecoded_connections_total",
                               reason="http2") < 1:
                assert time.monotonic() < deadline, "HTTP/2 connection not counted undecoded"
                time.sleep(0.05)
            _, m = agent.get("/metrics")
            chunks, skipped = metric_value(m, "aimesh_capture_chunks_total"), \
                metric_value(m, "aimesh_capture_not_captured_calls_total")
            p.stdin.write("more\n")
            p.stdin.flush()
            assert p.wait(30) == 0, p.stderr.read()
        finally:
            for proc in (p, sink):
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_chunks_total") == chunks
        assert metric_value(m, "aimesh_capture_not_captured_calls_total") == skipped + 5

        # a 4 KiB request budget (a runtime setting: a reload): the rest is a counted gap, the record says truncated,
        # and the next request on the connection is decoded again
        agent.reload(capture_config(cgroups, chat, llama, True, capture_max_request_bytes=4096))
        seen = run_raw(chat, "budget", url)
        assert seen["models"] == ["budget-model-served", "after-budget-served"]
        calls = model_calls(records, want=6)
        assert [c["request_model"] for c in calls[4:]] == ["budget-model", "after-budget"], calls
        assert calls[4]["truncated"] and calls[4]["response_model"] == "budget-model-served"
        assert calls[4]["request_bytes"] == seen["bytes"]     # the hole is exact: counted on the wire
        assert not calls[5]["truncated"] and calls[5]["response_model"] == "after-budget-served"
        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_capture_truncated_calls_total") >= 1
        assert metric_value(m, "aimesh_capture_truncated_bytes_total") >= 12_000 - 4096
        for name in ("aimesh_capture_ring_lost_total", "aimesh_capture_ring_lost_bytes_total",
                     "aimesh_capture_read_failures_total",
                     "aimesh_capture_sockets_full_total"):
            assert name in m and metric_value(m, name) == 0, name
    finally:
        srv.kill()
        srv.wait()
