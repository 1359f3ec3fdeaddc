"""Issue 22 items 1, 2 and 5 through the real kernel redirect and the gateway, with a real upstream nobody here wrote:
the LiteLLM proxy (PyPI `litellm[proxy]`, in its own venv: $AIMESH_LITELLM, <repo>/.venv-litellm from
deploy/host/setup.sh, or /work/venv-litellm) with `mock_response` models, offline. Each mock answers with its own text, so the client sees
which model the upstream really ran, whatever the response's `model` field says (LiteLLM echoes the body's).

The workloads are the official openai SDK (OpenAI with path models in base_url, AzureOpenAI for deployment paths,
extra_query for ?model=), httpx for raw bodies, and a raw socket for an absolute-form request line, all in a governed
cgroup dialing the external identity `litellm` (127.0.0.6), which the kernel hands to the gateway. The policy allows
gpt-4o* only; LiteLLM also serves o1-preview, which must never run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.harness import REPO, CgroupTree, _enter_cgroup, free_port, start_agent

def _litellm() -> Path:
    """$AIMESH_LITELLM (a venv), else <repo>/.venv-litellm (deploy/host/setup.sh), else /work/venv-litellm."""
    cands = [os.environ.get("AIMESH_LITELLM"), str(REPO / ".venv-litellm"), "/work/venv-litellm"]
    for c in filter(None, cands):
        if (Path(c) / "bin" / "litellm").exists():
            return Path(c) / "bin" / "litellm"
    return REPO / ".venv-litellm" / "bin" / "litellm"


LITELLM = _litellm()
MASTER = "sk-aimesh-test-master-key-0123456789"
HOST = "127.0.0.6"
TEXT = {"gpt-4o": "hello from gpt-4o", "gpt-4o-mini": "hello from mini", "o1-preview": "hello from o1"}

pytestmark = pytest.mark.skipif(not LITELLM.exists(), reason=f"LiteLLM proxy not installed at {LITELLM} "
                                "(deploy/host/setup.sh installs it)")


class LiteLLM:
    def __init__(self, tmp: Path, port: int) -> None:
        cfg = tmp / "litellm.yaml"
        models = "".join(f"  - model_name: {m}\n    litellm_params: {{model: openai/{m}, api_key: sk-unused, "
                         f"mock_response: \"{t}\"}}\n" for m, t in TEXT.items())
        cfg.write_text("model_list:\n" + models + "litellm_settings: {telemetry: false}\n")
        self.log = tmp / "litellm.log"
        env = {**os.environ, "LITELLM_MASTER_KEY": MASTER, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_TELEMETRY": "False", "NO_PROXY": "*"}
        env.pop("PYTHONPATH", None)
        with open(self.log, "wb") as out:
            self.p = subprocess.Popen([str(LITELLM), "--config", str(cfg), "--host", HOST, "--port", str(port)],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 120
        while "Uvicorn running" not in self.log.read_text(errors="replace"):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"LiteLLM did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def requests(self) -> list[str]:
        """The request lines uvicorn logged: what reached the upstream."""
        return [ln.split('"')[1] for ln in self.log.read_text(errors="replace").splitlines()
                if ' - "' in ln and "HTTP/1.1" in ln]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


CLIENT = """
import json, socket, sys
import httpx, openai
a = json.loads(sys.argv[1])
case, url, key = a["case"], a["url"], a["key"]
msg = [{"role": "user", "content": "hi"}]
out = {}
try:
    if case == "azure":
        c = openai.AzureOpenAI(azure_endpoint=url, api_version="2024-06-01", api_key=key, max_retries=0, timeout=30,
                               **({"azure_deployment": a["deployment"]} if a.get("deployment") else {}))
        r = c.chat.completions.create(model=a["model"], messages=msg)
        out = {"status": 200, "content": r.choices[0].message.content}
    elif case == "chat":
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        r = c.chat.completions.create(model=a["model"], messages=msg, extra_query=a.get("query"))
        out = {"status": 200, "content": r.choices[0].message.content}
    elif case == "completion":
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        r = c.completions.create(model=a["model"], prompt="hi")
        out = {"status": 200, "content": r.choices[0].text}
    elif case == "images":
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        c.images.generate(model=a["model"], prompt="a cat")
        out = {"status": 200}
    elif case == "raw":
        r = httpx.request(a["method"], url + a["path"], content=a.get("body", "").encode(), timeout=30,
                          headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        content = None
        if r.status_code == 200 and isinstance(body.get("choices"), list) and body["choices"]:
            content = (body["choices"][0].get("message") or {}).get("content")
        out = {"status": r.status_code, "content": content, "message": json.dumps(body)[:500]}
    elif case == "absolute":
        host, port = a["host"], a["port"]
        body = json.dumps({"model": a["model"], "messages": msg}).encode()
        s = socket.create_connection((host, port), timeout=30)
        s.sendall((f"POST http://{host}:{port}/v1/chat/completions HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n"
                   f"Authorization: Bearer {key}\\r\\nContent-Type: application/json\\r\\n"
                   f"Content-Length: {len(body)}\\r\\nConnection: close\\r\\n\\r\\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        head, _, rest = data.partition(b"\\r\\n\\r\\n")
        status = int(head.split()[1])
        content = None
        try:
            j = json.loads(rest)
            content = j["choices"][0]["message"]["content"] if status == 200 else None
        except Exception:
            pass
        out = {"status": status, "content": content, "message": rest[:500].decode("utf-8", "replace")}
except openai.APIStatusError as e:
    out = {"status": e.status_code, "error": type(e).__name__, "message": f"{e} (code {e.code})"}
except openai.APIConnectionError as e:
    out = {"status": None, "error": type(e).__name__, "message": repr(e.__cause__)}
print(json.dumps(out))
"""


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cg = CgroupTree()
        self.chat = self.cg.child("chat")
        self.port, self.gw = free_port(), free_port()
        self.records = tmp / "records.jsonl"
        self.agent = None
        self.upstream = LiteLLM(tmp, self.port)
        try:
            self.agent = start_agent(tmp, self.cg.root, self.config(), ["--records-log", str(self.records)])
            deadline = time.monotonic() + 30
            while f"listening 127.0.0.1:{self.gw}" not in self.agent.log():
                assert time.monotonic() < deadline, self.agent.log()[-3000:]
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def config(self) -> dict:
        return {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "governed": True,
                 "select": {"cgroups": [self.cg.rel(self.cg.root) + "/chat"]}},
                {"name": "litellm", "kind": "external", "endpoints": [f"{HOST}:{self.port}"],
                 "llm": {"protocol": "openai", "gateway": "enforce"}},
            ],
            "policies": [{"from": "chat", "to": "litellm", "ports": [self.port], "protocol": "tcp",
                          "models": ["gpt-4o*"]}],
            "gateway": {"listen": f"127.0.0.1:{self.gw}", "ca_dir": str(self.tmp / "ca")},
        }

    def run(self, case: str, **kw) -> dict:
        args = json.dumps({"case": case, "key": MASTER, "url": f"http://{HOST}:{self.port}", "host": HOST,
                           "port": self.port, **kw})
        p = subprocess.run([sys.executable, "-c", CLIENT, args], capture_output=True, text=True, timeout=90,
                           preexec_fn=_enter_cgroup(self.chat))
        assert p.returncode == 0 and p.stdout.strip(), p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    def record(self, pred, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.records.read_text().splitlines() if self.records.exists() else []
            recs = [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == "model_call" and pred(r)]
            if recs:
                return recs[-1]
            assert time.monotonic() < deadline, f"no such record; agent log:\n{self.agent.log()[-2000:]}"
            time.sleep(0.05)

    def close(self) -> None:
        try:
            if self.agent is not None:
                self.agent.stop()
        finally:
            self.upstream.stop()
            self.cg.cleanup()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("gateway-endpoints"))
    try:
        yield e
    finally:
        e.close()


def _refused_unseen(env: Env, res: dict, status: int, reason: str, before: int) -> None:
    assert res["status"] == status and reason in res.get("message", ""), res
    assert len(env.upstream.requests()) == before, env.upstream.requests()[before:]
    r = env.record(lambda r: r.get("reason") == reason)
    assert (r["decision"], r["status"], r["gateway"]) == ("refused", status, True), r


# -- item 1 ---------------------------------------------------------------------------------------------------------
def test_azure_deployment_path_is_judged_as_the_model_the_upstream_runs(env):
    ok = env.run("azure", model="gpt-4o")                      # AzureOpenAI puts the model in the path
    assert ok == {"status": 200, "content": TEXT["gpt-4o"]}, ok
    r = env.record(lambda r: r.get("path") == "/openai/deployments/gpt-4o/chat/completions" or
                   (r.get("request_model") == "gpt-4o" and r.get("decision") == "served"))
    assert (r["request_model"], r["decision"]) == ("gpt-4o", "served"), r
    before = len(env.upstream.requests())
    # the deployment o1-preview with an allowed body model: LiteLLM runs the deployment (the path wins there)
    res = env.run("azure", model="gpt-4o", deployment="o1-preview")
    _refused_unseen(env, res, 400, "model_mismatch", before)
    before = len(env.upstream.requests())
    res = env.run("azure", model="o1-preview")                  # path and body agree on a disallowed model
    assert res["status"] == 403 and "o1-preview" in res["message"], res
    assert len(env.upstream.requests()) == before


def test_query_and_engines_models_are_judged(env):
    before = len(env.upstream.requests())
    res = env.run("chat", url=f"http://{HOST}:{env.port}/v1", model="gpt-4o", query={"model": "o1-preview"})
    _refused_unseen(env, res, 400, "model_mismatch", before)
    res = env.run("completion", url=f"http://{HOST}:{env.port}/engines/o1-preview", model="gpt-4o")
    assert res["status"] == 400 and "model_mismatch" in res["message"], res
    res = env.run("chat", url=f"http://{HOST}:{env.port}/v1", model="gpt-4o-mini", query={"model": "gpt-4o-mini"})
    assert res == {"status": 200, "content": TEXT["gpt-4o-mini"]}, res
    assert len(env.upstream.requests()) == before + 1


# -- item 2 ---------------------------------------------------------------------------------------------------------
def test_model_endpoints_outside_v1_and_other_apis_are_judged(env):
    before = len(env.upstream.requests())
    res = env.run("completion", url=f"http://{HOST}:{env.port}", model="o1-preview")    # POST /completions
    assert res["status"] == 403 and "o1-preview" in res["message"], res
    res = env.run("images", url=f"http://{HOST}:{env.port}/v1", model="o1-preview")
    assert res["status"] == 403 and "o1-preview" in res["message"], res
    assert len(env.upstream.requests()) == before
    ok = env.run("completion", url=f"http://{HOST}:{env.port}", model="gpt-4o")
    assert ok == {"status": 200, "content": TEXT["gpt-4o"]}, ok


def test_unknown_endpoints_batches_and_other_methods_are_refused_by_default(env):
    before = len(env.upstream.requests())
    res = env.run("raw", method="POST", path="/v1/batches",
                  body=json.dumps({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                                   "completion_window": "24h"}))
    _refused_unseen(env, res, 403, "batch_not_judged", before)
    res = env.run("raw", method="POST", path="/v1/some/new/api", body=json.dumps({"model": "o1-preview"}))
    _refused_unseen(env, res, 403, "endpoint_not_understood", before)
    assert "/v1/some/new/api" in res["message"] and "unknown_endpoints" in res["message"], res
    res = env.run("raw", method="PUT", path="/v1/chat/completions",
                  body=json.dumps({"model": "o1-preview", "messages": []}))
    _refused_unseen(env, res, 400, "method_not_judged", before)
    res = env.run("raw", method="GET", path="/v1/models")                  # understood, runs no model: served
    assert res["status"] == 200, res
    assert len(env.upstream.requests()) == before + 1


# -- item 5 ---------------------------------------------------------------------------------------------------------
def test_duplicate_keys_and_encoded_slashes_are_refused(env):
    before = len(env.upstream.requests())
    res = env.run("raw", method="POST", path="/v1/chat/completions",
                  body='{"model": "o1-preview", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}')
    _refused_unseen(env, res, 400, "duplicate_key", before)
    res = env.run("raw", method="POST", path="/v1/chat%2Fcompletions",
                  body=json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
    _refused_unseen(env, res, 400, "ambiguous_path", before)
    res = env.run("raw", method="POST", path="/v1/chat/completions",        # an escape is judged decoded
                  body='{"model": "o1\\u002dpreview", "messages": [{"role": "user", "content": "hi"}]}')
    assert res["status"] == 403 and "o1-preview" in res["message"], res
    assert len(env.upstream.requests()) == before
    ok = env.run("raw", method="POST", path="/v1/chat/completions",
                 body='{"model": "gpt\\u002d4o", "messages": [{"role": "user", "content": "hi"}]}')
    assert (ok["status"], ok["content"]) == (200, TEXT["gpt-4o"]), ok


def test_absolute_form_request_target_is_judged_by_its_path(env):
    before = len(env.upstream.requests())
    res = env.run("absolute", model="o1-preview")
    assert res["status"] == 403 and "o1-preview" in res["message"], res
    assert len(env.upstream.requests()) == before
    ok = env.run("absolute", model="gpt-4o")
    assert (ok["status"], ok["content"]) == (200, TEXT["gpt-4o"]), ok
    assert env.upstream.requests()[-1] == "POST /v1/chat/completions HTTP/1.1"     # forwarded in origin form
