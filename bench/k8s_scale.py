"""What a synthetic 10k-pod list costs the agent: time and memory of the list + ClusterState.

    .venv/bin/python -m bench.k8s_scale [--pods 10000]

The parent serves N pods (tests/data/k8s/pods.json's first pod, varied: names, uids, labels, IPs, container ids, a
managedFields block like a real API server sends) from tests/kube_api.py over HTTP. A child process — so the server's
copy does not count — measures:
- RSS of the agent modules alone, after importing the watch (lightkube, httpx2, msgspec), and after the watch has
  listed the N pods (pages of 500) into a ClusterState, with the wall time to `synced`;
- the same list decoded in-process from bytes (no HTTP): time, tracemalloc peak and what the ClusterState retains;
- json.loads of the same bytes, for comparison with a decoder that builds every field.
Prints one JSON object. Not a test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def synthetic_pods(n: int, node: str = "node-a") -> list[dict[str, Any]]:
    from tests.kube_api import load
    base = load("pods")[0]
    base["metadata"]["managedFields"] = [{
        "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-30T09:12:51Z",
        "fieldsType": "FieldsV1", "subresource": "status",
        "fieldsV1": {"f:status": {"f:conditions": {k: {".": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}
                                                   for k in ('k:{"type":"ContainersReady"}', 'k:{"type":"Ready"}')},
                                  "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {},
                                  "f:podIPs": {".": {}, 'k:{"ip":"10.244.1.17"}': {".": {}, "f:ip": {}}}}}}]
    out = []
    for i in range(n):
        p = copy.deepcopy(base)
        md = p["metadata"]
        md["name"] = f"app-{i // 10:04d}-{i:05d}"
        md["namespace"] = f"ns-{i % 100:03d}"
        md["uid"] = f"{i:08x}-2c1d-4e8f-9a7b-{i:012x}"
        md["labels"] = {"app": f"app-{i // 10:04d}", "tier": ("web", "api", "db")[i % 3],
                        "pod-template-hash": f"{i * 7919 % 16 ** 10:010x}"}
        p["spec"]["nodeName"] = node
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        p["status"]["podIP"] = ip
        p["status"]["podIPs"] = [{"ip": ip}]
        for j, cs in enumerate(p["status"]["containerStatuses"] + p["status"]["initContainerStatuses"]):
            cs["containerID"] = f"containerd://{i:032x}{j:032x}"
        out.append(p)
    return out


def child(url_file: str, n: int) -> dict[str, Any]:
    base = rss_mb()
    import agent.identity.k8s.model  # noqa: F401
    from agent.identity.k8s.convert import decode_list
    from agent.identity.k8s.model import ClusterState
    from agent.identity.k8s.watch import Stream, Watch, connect
    after_import = rss_mb()

    state = ClusterState()
    t0 = time.perf_counter()
    w = Watch(connect(url_file), state, [Stream("pods", "pods", "/api/v1/pods", field_selector="spec.nodeName=node-a")])
    w.start()
    synced = w.wait_synced(600)
    t_http = time.perf_counter() - t0
    gc.collect()
    after_list = rss_mb()
    count = len(state.pods)
    w.stop()

    # in-process: one page of N pods from bytes
    import httpx2
    body = httpx2.get(json.loads(Path(url_file).read_text())["clusters"][0]["cluster"]["server"] + "/api/v1/pods",
                      headers={"Authorization": "Bearer bench"}).content
    del state
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    page = decode_list("pods", body)
    s2 = ClusterState()
    s2.replace("pods", page.items)
    t_decode = time.perf_counter() - t0
    del page
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t0 = time.perf_counter()
    raw = json.loads(body)
    t_json = time.perf_counter() - t0
    del raw
    return {
        "pods": count, "synced": synced, "list_bytes": len(body),
        "rss_mb": {"python": round(base, 1), "after_import_watch": round(after_import, 1),
                   "after_list_over_http": round(after_list, 1)},
        "list_over_http_s": round(t_http, 3),
        "decode_and_replace_s": round(t_decode, 3),
        "json_loads_same_bytes_s": round(t_json, 3),
        "tracemalloc_mb": {"retained_state": round(retained / 2 ** 20, 1), "peak": round(peak / 2 ** 20, 1)},
        "retained_bytes_per_pod": round(retained / max(1, n)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.pods)))
        return 0
    from tests.kube_api import KubeAPI
    api = KubeAPI(token="bench", objects={"pods": synthetic_pods(a.pods), "namespaces": [], "services": [],
                                          "endpointslices": []}).start()
    try:
        with tempfile.TemporaryDirectory() as d:
            kc = api.kubeconfig(Path(d) / "kubeconfig")
            out = subprocess.run([sys.executable, "-m", "bench.k8s_scale", "--pods", str(a.pods), "--child", str(kc)],
                                 capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"k8s_scale: child failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}",
                  file=sys.stderr)
            return 1
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1]), indent=2))
        return 0
    finally:
        api.stop()


if __name__ == "__main__":
    raise SystemExit(main())
