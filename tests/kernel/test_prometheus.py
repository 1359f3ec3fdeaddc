"""A real Prometheus server (Debian's package) scrapes the agent; its query API returns identity-labelled series."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.kernel.harness import free_port, run_client, start_server
from tests.kernel.test_enforce import base_config


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: make setup installs Debian's prometheus package")
    port = free_port()

    def start(target_port: int):
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: aimesh
    static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]
""")
        proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        return f"http://127.0.0.1:{port}"

    started: list[subprocess.Popen] = []
    yield start
    for p in started:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _query(base: str, q: str) -> list[dict]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(q)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_identity_labelled_series(cgroups, agents, prometheus):
    port = free_port()
    chat, rogue, llama = cgroups.child("chat"), cgroups.child("rogue"), cgroups.child("llama")
    agent = agents(base_config(cgroups, port))
    srv = start_server(llama, port, name="llama")
    assert run_client(chat, port, count=3)["ok"] == 3
    assert run_client(rogue, port)["errors"] == {"EPERM": 1}
    base = prometheus(agent.metrics_port)

    deadline = time.monotonic() + 60
    allowed = denied = flows = []
    while time.monotonic() < deadline:
        try:
            allowed = _query(base, 'aimesh_connections_total{source="chat",destination="llama",verdict="allowed"}')
            denied = _query(base, 'aimesh_connections_total{source="unmanaged",destination="llama",verdict="denied"}')
            flows = _query(base, 'aimesh_flows_total{source="chat",destination="llama",protocol="tcp"}')
        except OSError:
            pass  # not listening yet
        if allowed and denied and flows:
            break
        time.sleep(0.5)
    assert allowed and float(allowed[0]["value"][1]) == 3
    assert allowed[0]["metric"]["destination_kind"] == "model" and allowed[0]["metric"]["destination_version"] == "3.1-8b"
    assert denied and float(denied[0]["value"][1]) == 1
    assert flows and float(flows[0]["value"][1]) == 3
    up = _query(base, 'up{job="aimesh"}')
    assert up and up[0]["value"][1] == "1"
    # no address or port ever becomes a label
    series = _query(base, '{job="aimesh", __name__=~"aimesh_.*"}')
    labels = {k for s in series for k in s["metric"]}
    assert not labels & {"address", "port", "ip", "source_address", "destination_port"}
    srv.popen.kill()
