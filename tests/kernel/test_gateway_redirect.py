"""Issue 10, the kernel half: connects that need L7 policy land on the node gateway with their origin recorded.

A real agent; a plain TCP server stands in as the gateway (in the gateway cgroup <root>/aimesh-gateway, on the
gateway listen address) and looks each accepted connection up in the pinned gateway_origin map (OriginTable). The
upstream `openai` is an external identity on a loopback address. Everything runs on loopback.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.identity.cgroups import cgroup_id
from agent.kernel.pins import DatapathDir, read_manifest
from tests.kernel.harness import REPO, _enter_cgroup, free_port, run_client, start_server


def _cfg(cg, gw: str, gw_port: int, up: str, up_port: int, plain: str, plain_port: int,
         tls: str | None = None) -> dict:
    def ep(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    llm = {"protocol": "openai", "gateway": "enforce", **({"tls": tls} if tls else {})}
    return {
        "mode": "enforce",
        "identities": [
            {"name": "chat", "kind": "service", "governed": True, "select": {"cgroups": [cg.rel(cg.root) + "/chat"]}},
            {"name": "openai", "kind": "external", "endpoints": [ep(up, up_port)], "llm": llm},
            # gateway: enforce but no model policy to it: the kernel path
            {"name": "local-llm", "kind": "external", "endpoints": [ep(plain, plain_port)],
             "llm": {"protocol": "openai", "gateway": "enforce"}},
        ],
        "policies": [
            {"from": "chat", "to": "openai", "ports": [up_port], "protocol": "tcp", "models": ["gpt-4o*"]},
            {"from": "chat", "to": "local-llm", "ports": [plain_port]},
        ],
        "gateway": {"listen": ep(gw, gw_port)},
    }


def _pin(root: Path, name: str) -> str:
    d = DatapathDir.for_root(cgroup_id(root))
    return str(d.maps / read_manifest(d)["build"]["maps"][name])


class StandIn:
    """`python -m tests.kernel.test_gateway_redirect standin HOST PORT PIN COUNT`: the gateway stand-in, one JSON line per connection."""

    def __init__(self, cgroup: Path, host: str, port: int, pin: str, count: int) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "tests.kernel.test_gateway_redirect", "standin", host, str(port), pin, str(count)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                  preexec_fn=_enter_cgroup(cgroup))
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"stand-in did not start: {self.p.stderr.read()}")

    def next(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"stand-in ended: {self.p.stderr.read()}")
        return json.loads(line)

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def standin(host: str, port: int, pin: str, count: int) -> None:
    from agent.gateway.origin import OriginTable
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    s.settimeout(30)
    print(json.dumps({"listening": port}), flush=True)
    with OriginTable(pin) as table:
        for _ in range(count):
            c, peer = s.accept()
            first, second = table.lookup(peer[0], peer[1]), table.lookup(peer[0], peer[1])
            c.sendall(b"gateway")
            c.close()
            out = {"peer": list(peer[:2]), "second": second is not None, "origin": None}
            if first is not None:
                out["origin"] = {"address": first.address, "port": first.port, "family": int(first.family),
                                 "src_id": first.src_id, "dst_id": first.dst_id, "tls": first.tls_expected,
                                 "cookie": first.cookie}
            print(json.dumps(out), flush=True)


def _ids(root: Path) -> dict[str, int]:
    d = DatapathDir.for_root(cgroup_id(root))
    return read_manifest(d)["identities"]["ids"]


@pytest.mark.parametrize("gw, up, client_host", [
    ("127.0.0.1", "127.0.0.3", "127.0.0.3"),
    ("127.0.0.1", "127.0.0.3", "::ffff:127.0.0.3"),   # an IPv6 socket dialing the v4-mapped address
    ("::1", "::1", "::1"),
])
def test_connect_is_handed_to_the_gateway_with_its_origin(cgroups, agents, gw, up, client_host):
    fam = socket.AF_INET6 if ":" in up else socket.AF_INET
    up_port, plain_port = free_port(family=fam), free_port(family=fam)
    gw_port = free_port(family=socket.AF_INET6 if ":" in gw else socket.AF_INET)
    chat, gwcg = cgroups.child("chat"), cgroups.child("aimesh-gateway")
    plain = up   # the kernel-path destination listens on the same loopback address, its own port
    agent = agents(_cfg(cgroups, gw, gw_port, up, up_port, plain, plain_port), extra=["--no-gateway-process"])
    upstream = start_server(None, up_port, name="upstream", host=up, timeout=30)
    direct = start_server(None, plain_port, name="plain", host=plain, timeout=30)
    gateway = StandIn(gwcg, gw, gw_port, _pin(cgroups.root, "gateway_origin"), count=2)
    try:
        ids = _ids(cgroups.root)
        # 1. chat's connect to openai lands on the gateway; the client still sees the address it dialed
        res = run_client(chat, up_port, host=client_host)
        assert res["ok"] == 1 and res["answers"] == {"gateway": 1}, res
        assert res["peers"][0] == [client_host, up_port], "getpeername must report the dialed address"
        seen = gateway.next()
        o = seen["origin"]
        assert o is not None, seen
        assert (o["address"], o["port"]) == (up if ":" in up else "127.0.0.3", up_port)
        assert o["family"] == fam and o["tls"] is False and o["cookie"] != 0
        assert (o["src_id"], o["dst_id"]) == (ids["chat"], ids["openai"])
        assert seen["second"] is False, "a lookup takes the entry: the second finds nothing"

        # 2. a client connecting straight to the gateway port (from outside the governed tree) has no origin
        with socket.create_connection((gw, gw_port), timeout=5) as s:
            assert s.recv(16) == b"gateway"
        seen = gateway.next()
        assert seen["origin"] is None and seen["second"] is False
        # a governed workload may not reach the gateway port itself: no policy names it
        res = run_client(chat, gw_port, host=gw)
        assert res["ok"] == 0 and res["errors"] == {"EPERM": 1}, res

        # 3. the gateway's own connect to the real endpoint is not redirected
        res = run_client(gwcg, up_port, host=up)
        assert res["ok"] == 1 and res["answers"] == {"upstream": 1}, res

        # 4. a pair without L7 needs keeps the kernel path
        res = run_client(chat, plain_port, host=plain)
        assert res["ok"] == 1 and res["answers"] == {"plain": 1}, res

        recs = agent.records_where(lambda r: r["destination"]["port"] == up_port and r["source"]["name"] == "chat")
        assert recs and all(r["verdict"] == "redirected" and r["redirected"] for r in recs), recs
    finally:
        gateway.stop()
        upstream.popen.kill()
        direct.popen.kill()


def test_originate_destination_is_reached_by_the_gateway_only(cgroups, agents):
    up_port, other_port = free_port(), free_port()
    gw_port = free_port()
    chat, gwcg = cgroups.child("chat"), cgroups.child("aimesh-gateway")
    cfg = _cfg(cgroups, "127.0.0.1", gw_port, "127.0.0.3", up_port, "127.0.0.5", free_port(), tls="originate")
    # openai is every port of 127.0.0.3; chat may reach it on up_port (through the gateway: tls: originate needs L7)
    # and, without model fields, on other_port: still through the gateway, never directly
    cfg["identities"][1]["endpoints"] = ["127.0.0.3"]
    cfg["policies"].append({"from": "chat", "to": "openai", "ports": [other_port], "protocol": "tcp"})
    cfg["mode"] = "audit"   # audit would let a policy-less connect pass: originate still refuses it
    agents(cfg, extra=["--no-gateway-process"])   # the stand-in is the gateway
    upstream = start_server(None, up_port, name="upstream", host="127.0.0.3", timeout=30)
    third = free_port()
    raw = start_server(None, third, name="raw", host="127.0.0.3", timeout=30)
    gateway = StandIn(gwcg, "127.0.0.1", gw_port, _pin(cgroups.root, "gateway_origin"), count=2)
    try:
        for port in (up_port, other_port):
            res = run_client(chat, port, host="127.0.0.3")
            assert res["answers"] == {"gateway": 1}, res
            assert gateway.next()["origin"]["port"] == port
        # no policy for this port: audit mode would allow it; with tls: originate only the gateway may connect
        res = run_client(chat, third, host="127.0.0.3")
        assert res["ok"] == 0 and res["errors"] == {"EPERM": 1}, res
        res = run_client(gwcg, third, host="127.0.0.3")
        assert res["ok"] == 1 and res["answers"] == {"raw": 1}, res
        res = run_client(gwcg, up_port, host="127.0.0.3")
        assert res["ok"] == 1 and res["answers"] == {"upstream": 1}, res
    finally:
        gateway.stop()
        upstream.popen.kill()
        raw.popen.kill()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "standin":
    standin(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
