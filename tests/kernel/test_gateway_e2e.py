"""Issue 10 end to end: a real agent runs the node gateway; the openai SDK in a governed cgroup dials external
identities on loopback (127.0.0.3-5) and the kernel hands its connections to the gateway, which judges each request
by model policy and forwards what it serves to the real upstream (this module's upstream process, which notes every
request it received and every connection it accepted).

One agent for the module: plaintext `openai` (127.0.0.3, a retired model with a successor), `secure` (127.0.0.4,
HTTPS upstream with its own test CA, tls: intercept), `keyed` (127.0.0.5, HTTPS upstream, tls: originate with the
provider key in a 0600 file). Everything runs on loopback.
"""
from __future__ import annotations

import datetime
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from tests.kernel.harness import REPO, CgroupTree, _enter_cgroup, free_port, run_client, start_agent

KEY = "sk-node-held-provider-key-0123456789"


# -- the upstream: `python -m tests.kernel.test_gateway_e2e upstream SPEC...` (SPEC = host:port[:certfile:keyfile]) --
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_a) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        model, stream = str(body.get("model")), bool(body.get("stream"))
        self.server.note({"port": self.server.server_address[1], "path": self.path, "model": model,
                          "auth": self.headers.get("Authorization"), "stream": stream})
        created = int(time.time())
        if not stream:
            out = json.dumps({"id": "c1", "object": "chat.completion", "created": created, "model": model,
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": "hello"}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = 10 if "slow" in model else 3

        def chunk(obj: dict | str) -> None:
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        for i in range(n):
            chunk({"id": "c1", "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                "finish_reason": "stop" if i == n - 1 else None}]})
            if "slow" in model:
                time.sleep(0.3)
        chunk({"id": "c1", "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, tls: Optional[ssl.SSLContext], log: list, lock: threading.Lock) -> None:
        super().__init__(addr, _Handler)
        self.tls, self.log, self.lock, self.accepts = tls, log, lock, 0

    def get_request(self):
        sock, addr = super().get_request()
        with self.lock:
            self.accepts += 1
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def note(self, call: dict) -> None:
        with self.lock:
            self.log.append(call)


def upstream_main(specs: list[str]) -> None:
    log: list = []
    lock = threading.Lock()
    servers = []
    for spec in specs:
        host, port, *tls = spec.split(",")
        ctx = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls[0], tls[1])
        s = _Upstream((host, int(port)), ctx, log, lock)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    print(json.dumps({"listening": len(servers)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "calls":
            with lock:
                print(json.dumps({"calls": log, "accepts": {s.server_address[1]: s.accepts for s in servers}}),
                      flush=True)


class Upstream:
    def __init__(self, specs: list[str]) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "tests.kernel.test_gateway_e2e", "upstream", *specs],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=REPO)
        if not self.p.stdout.readline():
            raise AssertionError(f"upstream did not start: {self.p.stderr.read()}")

    def state(self) -> dict:
        self.p.stdin.write("calls\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def calls(self) -> list[dict]:
        return self.state()["calls"]

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


# -- the workload: the openai SDK --------------------------------------------------------------------------------
CLIENT = """
import json, sys
import openai
a = json.loads(sys.argv[1])
c = openai.OpenAI(base_url=a["url"], api_key=a.get("key", "sk-workload-0000000000000000"), max_retries=0, timeout=30)
out = {"ok": False}
try:
    msg = [{"role": "user", "content": "hello"}]
    if a.get("stream"):
        n, model = 0, None
        for ch in c.chat.completions.create(model=a["model"], messages=msg, stream=True):
            n += 1
            model = ch.model
        out = {"ok": True, "chunks": n, "model": model}
    else:
        r = c.chat.completions.create(model=a["model"], messages=msg)
        out = {"ok": True, "model": r.model}
except openai.APIStatusError as e:
    out = {"ok": False, "error": type(e).__name__, "status": e.status_code, "message": str(e)}
except openai.APIConnectionError as e:
    out = {"ok": False, "error": type(e).__name__, "cause": repr(e.__cause__)}
print(json.dumps(out))
"""


def sdk(cgroup: Path, url: str, model: str, stream: bool = False, env: Optional[dict] = None,
        background: bool = False):
    args = json.dumps({"url": url, "model": model, "stream": stream})
    p = subprocess.Popen([sys.executable, "-c", CLIENT, args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_enter_cgroup(cgroup), env={**os.environ, **(env or {})})
    if background:
        return p
    return finish(p)


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.strip(), err
    return json.loads(out.strip().splitlines()[-1])


# -- certificates ------------------------------------------------------------------------------------------------
def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A test CA of the upstream's own and a leaf for 127.0.0.4 and 127.0.0.5 signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aimesh e2e upstream CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.4")),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.5"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "upstream-ca.pem", d / "upstream.pem", d / "upstream.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# -- the module's agent ------------------------------------------------------------------------------------------
def config(cg: CgroupTree, ports: dict, tmp: Path, models: list[str]) -> dict:
    def llm(**kw) -> dict:
        return {"protocol": "openai", "gateway": "enforce", **kw}
    sunset = {"sunset": "2020-01-01T00:00:00Z", "successor": "gpt-4o"}
    return {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "governed": True, "select": {"cgroups": [cg.rel(cg.root) + "/chat"]}},
            {"name": "openai", "kind": "external", "endpoints": [f"127.0.0.3:{ports['plain']}"],
             "llm": llm(models=[{"name": "gpt-4-0613", "deprecated": sunset}])},
            {"name": "secure", "kind": "external", "endpoints": [f"127.0.0.4:{ports['secure']}"],
             "llm": llm(tls="intercept", upstream_ca=str(tmp / "upstream-ca.pem"))},
            {"name": "keyed", "kind": "external", "endpoints": ["127.0.0.5"],
             "llm": llm(tls="originate", upstream_ca=str(tmp / "upstream-ca.pem"), api_key_file=str(tmp / "key"))},
        ],
        "policies": [
            {"from": "chat", "to": "openai", "ports": [ports["plain"]], "protocol": "tcp", "models": models},
            {"from": "chat", "to": "secure", "ports": [ports["secure"]], "protocol": "tcp", "models": ["gpt-4o*"]},
            {"from": "chat", "to": "keyed", "ports": [ports["keyed"]], "protocol": "tcp", "models": ["gpt-4o*"]},
        ],
        "gateway": {"listen": f"127.0.0.1:{ports['gateway']}", "ca_dir": str(tmp / "ca")},
    }


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cg = CgroupTree()
        self.chat = self.cg.child("chat")
        self.ports = {"plain": free_port(), "secure": free_port(), "keyed": free_port(), "raw": free_port(),
                      "gateway": free_port()}
        ca, cert, key = make_certs(tmp)
        self.upstream_ca = ca
        kf = tmp / "key"
        kf.write_text(KEY + "\n")
        os.chmod(kf, 0o600)
        self.records = tmp / "records.jsonl"
        self.agent = None
        self.upstream = Upstream([f"127.0.0.3,{self.ports['plain']}",
                                  f"127.0.0.4,{self.ports['secure']},{cert},{key}",
                                  f"127.0.0.5,{self.ports['keyed']},{cert},{key}",
                                  f"127.0.0.5,{self.ports['raw']}"])
        self.agent = start_agent(tmp, self.cg.root, self.config(), ["--records-log", str(self.records)])
        self.wait_log(f"listening 127.0.0.1:{self.ports['gateway']}")

    def config(self, models: tuple[str, ...] = ("gpt-4o*",)) -> dict:
        return config(self.cg, self.ports, self.tmp, list(models))

    def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.agent.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent log has no {text!r}:\n{self.agent.log()[-3000:]}")
            time.sleep(0.05)

    def url(self, name: str, scheme: str = "http") -> str:
        host = {"plain": "127.0.0.3", "secure": "127.0.0.4", "keyed": "127.0.0.5"}[name]
        return f"{scheme}://{host}:{self.ports[name]}/v1"

    def calls(self, pred, want: int = 1, timeout: float = 10) -> list[dict]:
        """Gateway model-call records of the records log matching pred; waits for `want` of them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.records.read_text().splitlines() if self.records.exists() else []
            recs = [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == "model_call" and pred(r)]
            if len(recs) >= want or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        for line in self.agent.get("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def gateway_pids(self) -> list[int]:
        p = self.cg.root / "aimesh-gateway" / "cgroup.procs"
        return [int(x) for x in p.read_text().split()] if p.exists() else []

    def close(self) -> None:
        try:
            if self.agent is not None:
                self.agent.stop()
        finally:
            self.upstream.stop()
            self.cg.cleanup()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("gateway-e2e"))
    try:
        yield e
    finally:
        e.close()


def test_allowed_model_is_served_and_recorded_with_its_policy(env):
    res = sdk(env.chat, env.url("plain"), "gpt-4o")
    assert res == {"ok": True, "model": "gpt-4o"}, res
    assert [c["model"] for c in env.upstream.calls() if c["port"] == env.ports["plain"]] == ["gpt-4o"]
    rec = env.calls(lambda r: r["request_model"] == "gpt-4o" and r["destination"]["name"] == "openai")
    assert rec, env.agent.log()[-2000:]
    r = rec[0]
    assert (r["gateway"], r["policy"], r["decision"], r["sent_model"]) == (True, "policies[0]", "served", "gpt-4o")
    assert r["source"]["name"] == "chat" and r["status"] == 200 and r["input_tokens"] == 5
    assert r["cookie"] > 0                                  # the client socket's, from the kernel's origin record
    assert len(r["request_digest"]) == 64 and int(r["request_digest"], 16) >= 0


def test_disallowed_model_is_refused_and_the_upstream_gets_nothing(env):
    before = len(env.upstream.calls())
    res = sdk(env.chat, env.url("plain"), "o1-preview")
    assert (res["ok"], res.get("error"), res.get("status")) == (False, "PermissionDeniedError", 403), res
    assert "o1-preview" in res["message"] and "chat" in res["message"] and "policies[0]" in res["message"], res
    assert len(env.upstream.calls()) == before
    r = env.calls(lambda r: r["request_model"] == "o1-preview")
    assert r and (r[0]["decision"], r[0]["status"], r[0]["gateway"]) == ("refused", 403, True), r


def test_retired_model_is_rewritten_to_its_successor(env):
    res = sdk(env.chat, env.url("plain"), "gpt-4-0613", stream=True)
    assert res["ok"] and res["chunks"] >= 3, res
    assert env.upstream.calls()[-1]["model"] == "gpt-4o", "the upstream must see the successor"
    r = env.calls(lambda r: r["request_model"] == "gpt-4-0613")
    assert r and (r[0]["sent_model"], r[0]["decision"], r[0]["policy"]) == ("gpt-4o", "served", "policies[0]"), r


def test_intercept_the_sdk_trusts_the_node_ca_and_the_upstream_is_verified(env):
    ca = subprocess.run([sys.executable, "-m", "agent", "ca", "export", "--ca-dir", str(env.tmp / "ca")],
                        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert ca.returncode == 0 and "BEGIN CERTIFICATE" in ca.stdout, ca.stderr
    node_ca = env.tmp / "node-ca.pem"
    node_ca.write_text(ca.stdout)
    res = sdk(env.chat, env.url("secure", "https"), "gpt-4o-mini", env={"SSL_CERT_FILE": str(node_ca)})
    assert res == {"ok": True, "model": "gpt-4o-mini"}, res
    assert env.upstream.calls()[-1]["port"] == env.ports["secure"]
    r = env.calls(lambda r: r["destination"]["name"] == "secure")
    assert r and r[0]["tls"] is True and r[0]["decision"] == "served", r
    # without the node CA the SDK refuses the gateway's certificate: the interception is not silent
    res = sdk(env.chat, env.url("secure", "https"), "gpt-4o-mini", env={"SSL_CERT_FILE": str(env.upstream_ca)})
    assert res["error"] == "APIConnectionError", res


def test_originate_injects_the_key_and_direct_connections_are_denied(env):
    res = sdk(env.chat, env.url("keyed"), "gpt-4o")
    assert res == {"ok": True, "model": "gpt-4o"}, res
    got = [c for c in env.upstream.calls() if c["port"] == env.ports["keyed"]]
    assert got and got[-1]["auth"] == f"Bearer {KEY}", got   # the workload sent its own, the gateway replaced it
    # the provider's other port: no policy, and with tls: originate only the gateway may connect at all
    res = run_client(env.chat, env.ports["raw"], host="127.0.0.5")
    assert res["ok"] == 0 and res["errors"] == {"EPERM": 1}, res
    assert env.upstream.state()["accepts"][str(env.ports["raw"])] == 0


def test_a_client_connecting_straight_to_the_gateway_is_refused(env):
    before = len(env.upstream.calls())
    req = urllib.request.Request(f"http://127.0.0.1:{env.ports['gateway']}/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": "gpt-4o", "messages": []}).encode(),
                                 headers={"Host": f"127.0.0.3:{env.ports['plain']}", "Content-Type": "application/json"})
    with pytest.raises(OSError):   # closed without an answer: no kernel record, no identity (never from a header)
        urllib.request.urlopen(req, timeout=10).read()
    assert len(env.upstream.calls()) == before
    res = run_client(env.chat, env.ports["gateway"])   # and a governed workload may not dial the gateway port
    assert res["ok"] == 0 and res["errors"] == {"EPERM": 1}, res


def test_sighup_changes_model_policy_for_new_requests_while_an_open_stream_finishes(env):
    n = len(env.upstream.calls())
    slow = sdk(env.chat, env.url("plain"), "gpt-4o-slow", stream=True, background=True)
    deadline = time.monotonic() + 20
    while len(env.upstream.calls()) == n:   # the stream is open upstream
        assert time.monotonic() < deadline and slow.poll() is None, "the slow stream did not reach the upstream"
        time.sleep(0.05)
    reloaded = env.agent.log().count("policy reloaded")
    try:
        env.agent.reload(env.config(models=("gpt-4o-mini",)))
        env.wait_log("policy reloaded", reloaded + 1)
        res = sdk(env.chat, env.url("plain"), "gpt-4o")
        assert res.get("error") == "PermissionDeniedError", res
        assert sdk(env.chat, env.url("plain"), "gpt-4o-mini")["ok"]
        out = finish(slow)
        assert out == {"ok": True, "chunks": 11, "model": "gpt-4o-slow"}, out   # 10 words + the usage chunk
        assert env.metric("aimesh_gateway_reloads_total") >= 1
    finally:
        env.agent.reload(env.config())
        env.wait_log("policy reloaded", reloaded + 2)
    # the gateway section itself is set at start
    moved = env.config()
    moved["gateway"]["listen"] = f"127.0.0.1:{free_port()}"
    env.agent.reload(moved, expect="config reload rejected")
    assert "gateway: changed" in env.agent.log() and "restart the agent" in env.agent.log()
    env.agent.reload(env.config())


def test_a_dead_gateway_fails_closed_and_is_restarted(env):
    accepts = env.upstream.state()["accepts"][str(env.ports["plain"])]
    pids = env.gateway_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # until it is back, redirected connects find nothing listening: refused, never passed to the upstream directly
    res = run_client(env.chat, env.ports["plain"], host="127.0.0.3", timeout=1.0)
    assert res["errors"] == {"ECONNREFUSED": 1}, res
    assert env.upstream.state()["accepts"][str(env.ports["plain"])] == accepts
    deadline = time.monotonic() + 30
    while not (env.gateway_pids() and env.metric("aimesh_gateway_restarts_total") >= 1
               and "listening" in env.agent.log().split("gateway exited")[-1]):
        assert time.monotonic() < deadline, env.agent.log()[-2000:]
        time.sleep(0.1)
    assert sdk(env.chat, env.url("plain"), "gpt-4o")["ok"]
    assert env.upstream.state()["accepts"][str(env.ports["plain"])] > accepts   # the restarted gateway's own
    assert env.metric("aimesh_gateway_records_dropped_total") == 0


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "upstream":
    upstream_main(sys.argv[2:])
