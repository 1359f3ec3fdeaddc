"""At capacity the datapath fails closed: a full map never turns a governed identity's traffic into allowed; it is
counted, logged and turns /healthz degraded. Real kernel, small limits."""
from __future__ import annotations

import ctypes as ct
import json
import os
import time

from tests.kernel.harness import free_port, run_client, start_server
from tests.kernel.test_enforce import base_config


def _metric(agent, series: str) -> float:
    _, text = agent.get("/metrics")
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_degraded(agent, reason: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = agent.get("/healthz")
        if code == 503 and reason in body:
            return json.loads(body)
        assert time.monotonic() < deadline, f"/healthz did not turn degraded for {reason!r}: {code} {body}"
        time.sleep(0.2)


def test_a_full_local_endpoint_map_refuses_the_bind_and_nothing_opens(cgroups, agents):
    port = free_port()
    chat, batch, llama = (cgroups.child(n) for n in ("chat", "batch", "llama"))
    cfg = base_config(cgroups, port, limits={"max_local_endpoints": 8})
    agent = agents(cfg)
    # a governed model server binding 20 ports: what the map cannot hold must not become an open, unmanaged port
    script = ("import json, socket\nout = {}\nsocks = []\n"
              "for _ in range(20):\n"
              "    s = socket.socket()\n"
              "    try:\n"
              "        s.bind(('127.0.0.1', 0)); s.listen(8); socks.append(s); out[s.getsockname()[1]] = 'ok'\n"
              "    except OSError as e:\n"
              "        out.setdefault('errors', []).append(e.errno)\n"
              "print(json.dumps(out), flush=True)\n"
              "import time; time.sleep(30)\n")
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: (llama / "cgroup.procs").write_text("0"))
    try:
        res = json.loads(p.stdout.readline())
        bound = [int(k) for k in res if k != "errors"]
        assert res.get("errors") and set(res["errors"]) == {1}, res      # EPERM, not a silent open port
        assert len(bound) <= 8
        for bp in bound:                                                   # a denied client tries every port
            assert run_client(batch, bp)["errors"] == {"EPERM": 1}, bp
        assert _metric(agent, 'aimesh_map_full_total{map="local_endpoint_identity"}') >= len(res["errors"])
        body = _wait_degraded(agent, "local_endpoint_identity")
        assert body["status"] == "degraded"
        assert "map local_endpoint_identity is full" in agent.log()
    finally:
        p.kill()
        p.wait()


def test_a_full_cgroup_map_fails_closed_for_the_workloads_it_could_not_label(cgroups, agents):
    port = free_port()
    chat, batch = cgroups.child("chat"), cgroups.child("batch")
    cfg = base_config(cgroups, port, limits={"max_cgroups": 8})
    cfg["identities"][2]["select"] = {"cgroups": [cgroups.rel(cgroups.root) + "/llama*"]}
    models = [cgroups.child(f"llama{i}") for i in range(10)]
    agent = agents(cfg, degraded_ok=True)
    body = _wait_degraded(agent, "cgroup_identity")
    assert any("cgroup_identity" in r for r in body["reasons"])
    assert _metric(agent, 'aimesh_map_full_total{map="cgroup_identity"}') >= 1
    # every model server, labelled or not, is closed to a client without a policy to it
    for i, cg in enumerate(models):
        p = free_port()
        srv = start_server(cg, p, name=f"m{i}", count=0, timeout=20)
        try:
            assert run_client(batch, p)["errors"] == {"EPERM": 1}, f"llama{i} reachable"
        finally:
            srv.popen.kill()
    # a model the map could hold keeps its allowed path
    from agent.identity.cgroups import cgroup_id
    labelled = set(_cgroup_map(cgroups.root))
    held = [cg for cg in models if cgroup_id(cg) in labelled]
    assert held and len(held) < len(models)
    srv = start_server(held[0], port, name="held", count=0, timeout=20)
    try:
        assert run_client(chat, port)["ok"] == 1
    finally:
        srv.popen.kill()


def _cgroup_map(root) -> dict[int, int]:
    from agent.identity.cgroups import cgroup_id
    from agent.kernel import bpfsys
    from agent.kernel.maps import MapHandle
    from agent.kernel.pins import DatapathDir
    d = DatapathDir.for_root(cgroup_id(root))
    pin = next(p for p in d.maps.iterdir() if p.name.startswith("cgroup_identity-"))
    fd = bpfsys.obj_get(str(pin))
    try:
        return {int(k.value): int(v.value) for k, v in MapHandle(fd, "cgroup_identity", ct.c_uint64, ct.c_uint32,
                                                                  8).items()}
    finally:
        os.close(fd)


def test_an_identity_number_the_live_policy_does_not_know_is_denied(cgroups, agents):
    """A stale entry (a cgroup labelled with a number the live generation has no identity_info for) fails closed."""
    from agent.identity.cgroups import cgroup_id
    from agent.kernel import bpfsys
    from agent.kernel.pins import DatapathDir
    port = free_port()
    chat, stale = cgroups.child("chat"), cgroups.child("stale")
    agent = agents(base_config(cgroups, port))
    srv = start_server(cgroups.child("open"), port, name="open", count=0, timeout=20)   # an unmanaged server
    try:
        assert run_client(stale, port)["ok"] == 1                  # unmanaged -> unmanaged: allowed
        d = DatapathDir.for_root(cgroup_id(cgroups.root))
        pin = next(p for p in d.maps.iterdir() if p.name.startswith("cgroup_identity-"))
        fd = bpfsys.obj_get(str(pin))
        try:
            assert bpfsys.map_update(fd, ct.c_uint64(cgroup_id(stale)), ct.c_uint32(4000)) == 0
        finally:
            os.close(fd)
        assert run_client(stale, port)["errors"] == {"EPERM": 1}   # unknown number: governed, enforced, no policy
    finally:
        srv.popen.kill()
