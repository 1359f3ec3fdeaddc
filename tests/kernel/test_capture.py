"""Plaintext capture end to end: the official openai SDK in a governed cgroup calls a local OpenAI-compatible server in
another; the kernel copies the socket's bytes (bpf/capture.c), the agent decodes them into model-call records."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tests.kernel.harness import REPO, _enter_cgroup

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


def _value(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line.split("}")[0] for w in want):
                total += float(line.split()[-1])
    return total


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
            assert c["source"]["pid"] > 0 and c["cookie"] > 0
            assert c["protocol"] == "openai" and c["operation"] == "chat" and c["status"] == 200
            assert not c["incomplete"] and not c["truncated"] and c["finish_reasons"] == ["stop"]
        assert calls[0]["cookie"] == calls[1]["cookie"]     # one keep-alive connection, two requests in order

        _, m = agent.get("/metrics")
        assert _value(m, "aimesh_model_calls_total", source="chat", destination="llama", protocol="openai",
                      operation="chat", status_class="2xx") == 2
        chunks = _value(m, "aimesh_capture_chunks_total")
        assert chunks > 0

        # the same calls from a process outside the governed root, and to an identity with capture off
        assert len(run_openai(None, llama_url)) == 2
        assert len(run_openai(chat, store_url)) == 2
        _, m = agent.get("/metrics")
        assert _value(m, "aimesh_capture_chunks_total") == chunks   # counted in the syscall itself: no waiting
        # a captured call after them: once its records are in, anything the others made would be in too (ring order)
        assert len(run_openai(chat, llama_url)) == 2
        calls = model_calls(records, want=4)
        assert len(calls) == 4 and all(c["source"]["name"] == "chat" and c["destination"]["name"] == "llama"
                                       for c in calls)
        _, m = agent.get("/metrics")
        assert _value(m, "aimesh_model_calls_total") == 4
    finally:
        for p in (llama_srv, store_srv):
            p.kill()
            p.wait()
