"""TLS capture end to end: the official openai SDK and curl, in a governed cgroup, call a local HTTPS OpenAI-compatible
server; the uprobes on libssl (bpf/tls.c, attached by agent/kernel/uprobes.py) hand the plaintext to the decoder,
the ciphertext is never copied. A client that makes its TLS bytes outside a probed SSL_* call is reported as "TLS not
visible"."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tests.kernel.harness import REPO, _enter_cgroup, metric_value
from tests.kernel.test_capture import CLIENT, model_calls

TLS_SERVER = """
import json, ssl, sys
sys.path.insert(0, sys.argv[1])
from tests.llm_server import LLMServer
srv = LLMServer()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv._httpd.socket = ctx.wrap_socket(srv._httpd.socket, server_side=True)
srv.__enter__()
print(srv.url.replace("http://", "https://"), flush=True)
for _ in sys.stdin:   # each line asks for the plaintext bytes the server read per connection
    print(json.dumps([sum(len(b) for d, _, b in log if d.value == "request") for log in srv.connections.values()]),
          flush=True)
"""

# A TLS stack aimesh does not probe, in effect: the ClientHello is made in memory and sent with a plain send().
HIDDEN_TLS = """
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inc, out, server_hostname="llama")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection((host, port))
s.sendall(out.read())
s.recv(65536)
s.close()
print("sent", flush=True)
sys.stdin.read()   # alive until the test has seen the report: the agent names the process from /proc
"""


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem", "ext"))

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=aimesh test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def start_tls_server(cgroup: Optional[Path], cert: Path, key: Path) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", TLS_SERVER, str(REPO), str(cert), str(key)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(cgroup))
    url = p.stdout.readline().strip()
    if not url:
        raise AssertionError(f"TLS llm server did not start: {p.stderr.read()}")
    return p, url


def server_read(srv: subprocess.Popen) -> list[int]:
    srv.stdin.write("stats\n")
    srv.stdin.flush()
    return json.loads(srv.stdout.readline())


def run_openai_tls(cgroup: Optional[Path], url: str, ca: Path) -> list[dict]:
    env = {**os.environ, "SSL_CERT_FILE": str(ca)}
    p = subprocess.run([sys.executable, "-c", CLIENT, url], capture_output=True, text=True, timeout=60, env=env,
                       preexec_fn=_enter_cgroup(cgroup))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_curl(cgroup: Optional[Path], url: str, ca: Path) -> dict:
    body = json.dumps({"model": "curl-model", "messages": [{"role": "user", "content": "hello from curl"}]})
    p = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(ca), "-H", "content-type: application/json",
                        "-d", body, url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60,
                       preexec_fn=_enter_cgroup(cgroup))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_openai_sdk_and_curl_over_tls_become_model_call_records(cgroups, agents, tmp_path):
    ca, cert, key = make_certs(tmp_path)
    chat, llama = cgroups.child("chat"), cgroups.child("llama")
    records = tmp_path / "records.jsonl"
    cfg = {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
            {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(llama)]}},
        ],
        "policies": [{"from": "chat", "to": ["llama"]}],
    }
    agent = agents(cfg, extra=["--records-log", str(records)])
    assert "TLS capture: " in agent.log() and "libssl files probed" in agent.log(), agent.log()
    srv, url = start_tls_server(llama, cert, key)
    try:
        seen = run_openai_tls(chat, url, ca)
        calls = model_calls(records, want=2)
        assert len(calls) == 2, (calls, agent.log()[-3000:])
        got = [{"model": c["response_model"], "in": c["input_tokens"], "out": c["output_tokens"],
                "stream": c["stream"]} for c in calls]
        assert got == seen
        assert [c["request_model"] for c in calls] == ["llama-3.1-8b", "llama-3.1-8b-s"]
        for c in calls:
            assert c["tls"] is True
            assert c["source"]["name"] == "chat" and c["destination"]["name"] == "llama"
            assert c["protocol"] == "openai" and c["operation"] == "chat" and c["status"] == 200
            assert not c["incomplete"] and not c["truncated"] and c["finish_reasons"] == ["stop"]
        assert calls[0]["cookie"] == calls[1]["cookie"]
        # the decoder saw exactly the plaintext the server read: no handshake or record bytes (a ciphertext byte
        # first would have left the connection undecoded, with no record at all)
        assert sum(c["request_bytes"] for c in calls) == server_read(srv)[0]

        answer = run_curl(chat, url, ca)
        calls = model_calls(records, want=3)
        assert len(calls) == 3, calls
        c = calls[2]
        assert c["tls"] is True and c["request_model"] == "curl-model"
        assert c["response_model"] == answer["model"] and c["input_tokens"] == answer["usage"]["prompt_tokens"]
        assert c["output_tokens"] == answer["usage"]["completion_tokens"] and c["status"] == 200
        assert c["request_bytes"] == server_read(srv)[1]

        _, m = agent.get("/metrics")
        assert metric_value(m, "aimesh_model_calls_total", source="chat", destination="llama") == 3
        assert metric_value(m, "aimesh_tls_not_visible_total") == 0
        # every record the decoder made is one of the three calls: no record of garbage
        recs = [json.loads(x) for x in records.read_text().splitlines() if x.strip()]
        assert len([r for r in recs if r.get("kind") == "model_call"]) == 3

        # TLS bytes sent outside any probed SSL_* call: "TLS not visible", counted and logged with the process
        host, port = url.removeprefix("https://").split(":")
        hidden = subprocess.Popen([sys.executable, "-c", HIDDEN_TLS, host, port], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=_enter_cgroup(chat))
        try:
            assert hidden.stdout.readline().strip() == "sent", hidden.stderr.read()
            deadline = time.monotonic() + 5
            while metric_value(agent.get("/metrics")[1], "aimesh_tls_not_visible_total", source="chat") < 1:
                assert time.monotonic() < deadline, agent.log()[-3000:]
                time.sleep(0.05)
            named = f"TLS not visible: {Path(sys.executable).name[:15]} (pid {hidden.pid}, " \
                    f"exe {os.path.realpath(sys.executable)})"
            assert named in agent.log(), agent.log()
        finally:
            hidden.kill()
            hidden.wait()
    finally:
        srv.kill()
        srv.wait()


def _uprobe_links(root: Path) -> dict[str, int]:
    from agent.identity.cgroups import cgroup_id
    from agent.kernel.install import status
    from agent.kernel.pins import DatapathDir
    st = status(DatapathDir.for_root(cgroup_id(root)))
    return {li.name: li.prog_id for li in st.links if li.target == "uprobe"}


def test_uprobe_links_outlive_the_agent_are_adopted_and_go_with_uninstall(cgroups, agents):
    from agent.identity.cgroups import uninstall_datapath
    from agent.kernel import registry
    chat = cgroups.child("chat")
    cfg = {"identities": [{"name": "chat", "kind": "service", "select": {"cgroups": [cgroups.rel(chat)]}},
                          {"name": "llama", "kind": "model", "select": {"cgroups": [cgroups.rel(cgroups.child("l"))]}}],
           "policies": [{"from": "chat", "to": ["llama"]}]}
    first = agents(cfg)
    links = _uprobe_links(cgroups.root)
    assert links and len(links) % len(registry.UPROBES) == 0, links     # every probe, per libssl file
    assert all(li.startswith("tls-") for li in links)
    assert first.stop() == 0
    assert _uprobe_links(cgroups.root) == links                         # still pinned: still in force
    second = agents(cfg)
    assert _uprobe_links(cgroups.root) == links                         # adopted: the same programs, no new link
    assert f"0 links created, {len(links)} kept" in second.log(), second.log()
    second.stop()
    removed = uninstall_datapath(cgroups.root)
    assert sum("/links/tls-" in r for r in removed) == len(links)
    assert _uprobe_links(cgroups.root) == {}
