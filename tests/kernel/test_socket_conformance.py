"""Socket-semantics conformance (issue 23): every scenario of tests/kernel/conformance.py runs between a governed
client (chat) and a governed server (llama) on this node three times — agent with the fast path on, agent with it
off, no agent — and what the application saw must be identical. One agent per mode for the whole module."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import CgroupTree, _enter_cgroup, free_port, start_agent
from tests.kernel.test_enforce import base_config

WORKLOAD = Path(__file__).resolve().parent / "conformance.py"
MODES = ("fastpath", "normal", "no_agent")


def _run_mode(tree: CgroupTree, tmp: Path, mode: str) -> dict:
    from tests.kernel.conformance import SERVERS
    ports = {name: free_port() for name in SERVERS}
    agent = None
    if mode != "no_agent":
        cfg = base_config(tree, 0, fast_path=mode == "fastpath")
        cfg["policies"] = [{"from": "chat", "to": "llama", "ports": sorted(ports.values())}]
        tmp.mkdir(parents=True, exist_ok=True)
        agent = start_agent(tmp, tree.root, cfg)
    srv = subprocess.Popen([sys.executable, str(WORKLOAD), "server", json.dumps(ports)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=_enter_cgroup(tree.child("llama")))
    try:
        assert json.loads(srv.stdout.readline()) == {"ready": True}
        cli = subprocess.run([sys.executable, str(WORKLOAD), "client", json.dumps(ports)], capture_output=True,
                             text=True, timeout=300, preexec_fn=_enter_cgroup(tree.child("chat")))
        assert cli.returncode == 0, cli.stderr
        results = json.loads(cli.stdout.splitlines()[-1])
        if agent is not None and mode == "fastpath":     # the fast path was really taken
            from tests.kernel.harness import metric_value
            results["_fastpath_messages"] = metric_value(agent.get("/metrics")[1], "aimesh_fastpath_messages_total")
        return results
    finally:
        srv.kill()
        srv.wait()
        if agent is not None:
            agent.stop()


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = {}
    for m in MODES:     # a tree per mode: a stopped agent leaves its programs on its tree (fail closed)
        tree = CgroupTree()
        try:
            out[m] = _run_mode(tree, tmp_path_factory.mktemp(m), m)
        finally:
            tree.cleanup()
    return out


def test_the_fast_path_was_taken(seen):
    assert seen["fastpath"]["_fastpath_messages"] > 1000


# Where the fast path differs on this kernel (6.18), and why: the sockmap itself, which no BPF program can change
# (README "Same-node fast path"); why fast_path is off by default. A scenario that starts to agree fails (strict), so
# the list cannot go stale.
KNOWN_FASTPATH_DIFFERENCES = {
    "halfclose_echo_300": "tcp_bpf_recvmsg waits once (tcp_msg_wait_data) and returns EAGAIN on any wakeup without "
                          "data, even on a blocking socket: here the state change when the socket's own FIN is "
                          "ACKed (FIN_WAIT1 -> FIN_WAIT2) while recv waits; tcp_recvmsg would wait on. Leaving the "
                          "sockhash at half-close would purge the bytes already queued in the psock",
    "splice_recv": "splice(2) reads sk_receive_queue through tcp_read_sock; redirected bytes sit in the psock's "
                   "ingress_msg, which it never sees: it reads nothing and then EOF",
    "slow_reader_backpressure": "no back-pressure: a BPF_F_INGRESS redirect charges the reader with sk_wmem_schedule "
                                "(tcp_mem only, not its receive buffer) and gives the writer its memory back at "
                                "once, so a non-blocking writer never gets EAGAIN: all 64 MiB go into the reader's "
                                "psock queue, which this reader (bytes += chunk) then takes longer than the "
                                "client's 10 s to drain (TimeoutError)",
}


def test_issue_23_repro_no_eagain_on_a_blocking_socket(seen):
    """connect, sendall, shutdown(SHUT_WR), recv(100), 300 times: always the echo, never EAGAIN."""
    for m in ("normal", "no_agent"):
        assert seen[m]["halfclose_echo_300"] == {"b'y'": 300}, (m, seen[m]["halfclose_echo_300"])


# Differences of the same causes that show up only under some timing (seen once in three full runs on this 2-CPU VM):
# not strict, since most runs agree; a difference anywhere else still fails.
RACY_FASTPATH_DIFFERENCES = {
    "halfclose_server_first": "the server half-closes and then blocks in recv: when its own FIN's ACK comes while it "
                              "waits, tcp_bpf_recvmsg returns EAGAIN (as in halfclose_echo_300), the server gives up "
                              "and closes, and the client's later shutdown fails with ENOTCONN",
    "peer_aborts_mid_stream": "no back-pressure (above): all 16 MiB are accepted; the reader's close purges its "
                              "psock queue and, its own receive queue being empty, sends FIN, not RST: the writer "
                              "sees all 16 MiB sent and then EOF instead of a reset (when a send comes after the "
                              "close, EPIPE: the same as without aimesh, hence racy)",
}

from tests.kernel.conformance import SERVERS   # noqa: E402


@pytest.mark.parametrize("scenario", sorted(SERVERS))
def test_same_as_without_aimesh(seen, scenario):
    assert seen["normal"][scenario] == seen["no_agent"][scenario], {m: seen[m][scenario] for m in MODES}
    same = seen["fastpath"][scenario] == seen["no_agent"][scenario]
    if scenario in KNOWN_FASTPATH_DIFFERENCES:
        assert not same, f"{scenario} now agrees with the fast path on: remove it from KNOWN_FASTPATH_DIFFERENCES"
        pytest.xfail(f"fast path differs: {seen['fastpath'][scenario]!r}: {KNOWN_FASTPATH_DIFFERENCES[scenario]}")
    if scenario in RACY_FASTPATH_DIFFERENCES and not same:
        pytest.xfail(f"fast path differs: {seen['fastpath'][scenario]!r}: {RACY_FASTPATH_DIFFERENCES[scenario]}")
    assert same, {m: seen[m][scenario] for m in MODES}
