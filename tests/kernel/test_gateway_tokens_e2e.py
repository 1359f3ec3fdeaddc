"""Issue 22 items 3 and 4 end to end: the openai SDK in a governed cgroup dials an external identity on 127.0.0.6,
the kernel redirects its connections to the real agent's gateway, and the gateway judges token limits and budgets
against a real upstream process (tests/unit/test_gateway_limits.py's PackingUpstream: it honours `n`, packs each
choice's tokens into one SSE chunk and sends usage only when asked for; it counts what it generated).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.harness import REPO, CgroupTree, _enter_cgroup, free_port, start_agent

BUDGET = 2000
CAP = 40
HOST = "127.0.0.6"


def upstream_main(host: str, port: int) -> None:
    from tests.unit.test_gateway_limits import PackingUpstream
    up = PackingUpstream(usage=True, host=host, port=port)
    print(json.dumps({"listening": up.port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "state":
            with up.lock:
                print(json.dumps({"spent": up.spent, "bodies": up.bodies}), flush=True)
    up.close()


class Upstream:
    def __init__(self, port: int) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "tests.kernel.test_gateway_tokens_e2e", "upstream", HOST,
                                   str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=REPO)
        if not self.p.stdout.readline():
            raise AssertionError(f"upstream did not start: {self.p.stderr.read()}")

    def state(self) -> dict:
        self.p.stdin.write("state\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


# -- the workload: the openai SDK (one process; `streams` concurrent n=8 streams with asyncio) -----------------------
CLIENT = """
import asyncio, json, sys
import openai
a = json.loads(sys.argv[1])
msg = [{"role": "user", "content": "hello"}]

async def one(c):
    try:
        s = await c.chat.completions.create(model="gpt-4o", messages=msg, max_tokens=a["cap"], n=8, stream=True)
        chunks = [ch async for ch in s]
        return "served" if all(ch.choices for ch in chunks) else "usage-chunk-seen"
    except openai.RateLimitError as e:
        return "429"

async def streams():
    async with openai.AsyncOpenAI(base_url=a["url"], api_key="none", max_retries=0, timeout=60) as c:
        return list(await asyncio.gather(*(one(c) for _ in range(a["streams"]))))

if a.get("streams"):
    print(json.dumps(asyncio.run(streams())))
else:
    c = openai.OpenAI(base_url=a["url"], api_key="none", max_retries=0, timeout=30)
    try:
        c.chat.completions.create(model="gpt-4o", messages=msg, extra_body=a["extra"])
        print(json.dumps({"ok": True}))
    except openai.APIStatusError as e:
        print(json.dumps({"ok": False, "status": e.status_code, "code": getattr(e, "code", None),
                          "message": str(e)}))
"""


def sdk(cgroup: Path, args: dict) -> object:
    p = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(args)], capture_output=True, text=True, timeout=120,
                       preexec_fn=_enter_cgroup(cgroup), env=dict(os.environ))
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-tokens-e2e")
    cg = CgroupTree()
    chat = cg.child("chat")
    ports = {"up": free_port(), "gateway": free_port()}
    up = agent = None
    try:
        up = Upstream(ports["up"])
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "chat", "kind": "service", "governed": True,
                 "select": {"cgroups": [cg.rel(cg.root) + "/chat"]}},
                {"name": "packed", "kind": "external", "endpoints": [f"{HOST}:{ports['up']}"],
                 "llm": {"protocol": "openai", "gateway": "enforce"}}],
            "policies": [{"from": "chat", "to": "packed", "ports": [ports["up"]], "protocol": "tcp",
                          "models": ["gpt-4o*"], "max_tokens": CAP, "tokens_per_minute": BUDGET}],
            "gateway": {"listen": f"127.0.0.1:{ports['gateway']}", "ca_dir": str(tmp / "ca")}}
        agent = start_agent(tmp, cg.root, cfg, ["--records-log", str(tmp / "records.jsonl")])
        deadline = time.monotonic() + 30
        while f"listening 127.0.0.1:{ports['gateway']}" not in agent.log():
            assert time.monotonic() < deadline, agent.log()[-3000:]
            time.sleep(0.05)
        yield {"chat": chat, "up": up, "url": f"http://{HOST}:{ports['up']}/v1", "records": tmp / "records.jsonl"}
    finally:
        try:
            if agent is not None:
                agent.stop()
        finally:
            if up is not None:
                up.stop()
            cg.cleanup()


def records(path: Path, want: int) -> list[dict]:
    deadline = time.monotonic() + 15
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        recs = [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == "model_call" and r.get("gateway")]
        if len(recs) >= want or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


@pytest.mark.parametrize("extra,code", [
    ({"max_tokens": 30, "max_completion_tokens": 5000}, "max_tokens_exceeded"),   # the largest field is judged
    ({"max_tokens": 5000.0}, "invalid_token_limit"), ({"max_tokens": "30"}, "invalid_token_limit"),
    ({"max_tokens": 30, "n": 2.0}, "invalid_token_limit")])
def test_token_limit_fields_judged_through_the_redirect(env, extra, code):
    before = len(env["up"].state()["bodies"])
    res = sdk(env["chat"], {"url": env["url"], "extra": extra})
    assert (res["ok"], res["status"], res["code"]) == (False, 400, code), res
    assert len(env["up"].state()["bodies"]) == before             # the upstream got nothing


def test_50_concurrent_n8_streams_through_the_redirect_stay_in_budget(env):
    # one budget minute for the whole burst: start with at least 30 s of the UTC minute left (no assertion on time)
    while time.time() % 60 > 30:
        time.sleep(0.5)
    results = sdk(env["chat"], {"url": env["url"], "streams": 50, "cap": CAP})
    assert isinstance(results, list) and set(results) <= {"served", "429"}, results
    assert results.count("served") > 0 and results.count("429") > 0
    st = env["up"].state()
    streamed = [b for b in st["bodies"] if b.get("stream")]
    assert len(streamed) == results.count("served")
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed)   # asked for by the gateway
    recs = [r for r in records(env["records"], 50) if r.get("stream")]
    reservation = max(math.ceil(r["request_bytes"] / 4) + 8 * CAP for r in recs)
    assert st["spent"] <= BUDGET + reservation, (st["spent"], reservation)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "upstream":
    upstream_main(sys.argv[2], int(sys.argv[3]))
