"""Issue 15: a process identity (identities[].select.processes) cannot be shed or borrowed by making processes.

Policy: alpha (a process selector) and the cgroup chat may reach llama; beta (a process selector) may not; the cgroup
rogue is unmanaged. One agent serves the module; each case is one forker.py run (tests/kernel/hostile/forker.py).
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import CgroupTree, _enter_cgroup, free_port, start_agent, start_server

FORKER = Path(__file__).resolve().parent / "forker.py"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tree = CgroupTree()
    agent = srv = None
    bindir = Path(tempfile.mkdtemp(prefix="aimesh-exe-"))
    try:
        bindir.chmod(0o755)
        allowed, copy, link = bindir / "py-allowed", bindir / "py-copy", bindir / "py-link"
        shutil.copy(os.path.realpath(sys.executable), allowed)
        shutil.copy(os.path.realpath(sys.executable), copy)
        link.symlink_to(allowed)
        port = free_port()
        rogue, chat, llama = (tree.child(n) for n in ("rogue", "chat", "llama"))
        cfg = {
            "mode": "enforce",
            "identities": [
                {"name": "alpha", "kind": "service", "select": {"processes": [{"cmdline": "*forker.py --role alpha *", "uids": [0]}]}},
                {"name": "beta", "kind": "service", "select": {"processes": [{"cmdline": "*forker.py --role beta *", "uids": [0]}]}},
                {"name": "delta", "kind": "service", "select": {"processes": [{"exe": str(allowed), "uids": [0]}]}},
                {"name": "chat", "kind": "service", "select": {"cgroups": [tree.rel(chat)]}},
                {"name": "llama", "kind": "model", "select": {"cgroups": [tree.rel(llama)]}},
            ],
            "policies": [{"from": "alpha", "to": "llama", "ports": [port]},
                         {"from": "delta", "to": "llama", "ports": [port]},
                         {"from": "chat", "to": "llama", "ports": [port]}],
        }
        agent = start_agent(tmp_path_factory.mktemp("procid"), tree.root, cfg)
        srv = start_server(llama, port, name="llama", timeout=300)
        yield {"tree": tree, "agent": agent, "port": port, "rogue": rogue, "chat": chat, "allowed": allowed,
               "copy": copy, "link": link}
    finally:
        if srv is not None:
            srv.popen.kill()
            srv.popen.wait()
        if agent is not None:
            agent.stop()
        tree.cleanup()
        shutil.rmtree(bindir)


def forker(mesh, cgroup: Path, role: str, mode: str, tries: int = 1, script: Path = FORKER,
           uid: int = 0, python: str = sys.executable, wrap: tuple = ()) -> dict[str, dict]:
    """Run forker.py in `cgroup` as `uid`; its connect results by who made them (parent, child, thread, plain, role)."""
    enter = _enter_cgroup(cgroup)

    def pre() -> None:
        enter()
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    cmd = [python, str(script), "--role", role, "--port", str(mesh["port"]), "--mode", mode, "--tries", str(tries)]
    p = subprocess.run([*wrap, *cmd], capture_output=True, text=True, timeout=60, preexec_fn=pre)
    out = {r["who"]: r for r in (json.loads(x) for x in p.stdout.splitlines() if x.startswith("{"))}
    assert out, f"forker printed nothing: {p.stderr}"
    return out


def kernel_process_identity(mesh, pid: int):
    """process_identity[pid] as the kernel holds it (None: no entry)."""
    from agent.identity.cgroups import cgroup_id
    from agent.kernel import bpfsys
    from agent.kernel.pins import DatapathDir
    [path] = DatapathDir.for_root(cgroup_id(mesh["tree"].root)).maps.glob("process_identity-*")
    fd = bpfsys.obj_get(str(path))
    try:
        v = ct.c_uint32()
        return v.value if bpfsys.map_lookup(fd, ct.c_uint32(pid), v) else None
    finally:
        os.close(fd)


def test_a_forked_child_keeps_an_allowing_process_identity(mesh):
    """Old code: the child fell back to its cgroup (rogue, unmanaged) and was denied what its parent may do."""
    r = forker(mesh, mesh["rogue"], "alpha", "fork", tries=50)
    assert r["parent"]["ok"], r
    assert r["child"]["ok"], r
    assert kernel_process_identity(mesh, r["child"]["pid"]) is None   # gone with the child


def test_a_forked_child_keeps_a_denying_process_identity(mesh):
    """Old code: the child of beta fell back to its cgroup (chat) and reached llama, which beta may not."""
    r = forker(mesh, mesh["chat"], "beta", "fork")
    assert r["parent"]["error"] == "EPERM", r
    assert r["child"]["error"] == "EPERM", r
    assert kernel_process_identity(mesh, r["child"]["pid"]) is None
    assert kernel_process_identity(mesh, r["parent"]["pid"]) is None


def test_exec_of_something_else_drops_the_inherited_identity_at_once(mesh):
    """The child of alpha execs a program no selector matches: it is its cgroup's again (rogue, denied) from its
    first connect, with no window where it still passes for alpha."""
    r = forker(mesh, mesh["rogue"], "alpha", "fork-exec", tries=50)
    assert r["parent"]["ok"], r
    assert r["plain"]["error"] == "EPERM", r


def test_a_thread_keeps_the_identity_after_the_main_thread_ends(mesh):
    """Old code: the main thread's exit deleted process_identity[tgid] though the process ran on, so beta's worker
    thread became chat and reached llama. Now the entry goes with the last thread (group_dead)."""
    r = forker(mesh, mesh["chat"], "beta", "thread")
    assert r["thread"]["error"] == "EPERM", r
    assert kernel_process_identity(mesh, r["thread"]["pid"]) is None


def test_argv_spoofing_by_another_user_gets_no_identity(mesh):
    """alpha selects `*forker.py --role alpha *` with uids: [0]. Old code (no uids:): nobody (65534) in the unmanaged
    cgroup wrote that command line and became alpha (allowed). Now it stays unmanaged: denied on every one of 30
    tries over 3 s, where root's alpha process in the same cgroup is allowed (the first test) within them."""
    d = Path(tempfile.mkdtemp(prefix="aimesh-forker-"))
    try:
        d.chmod(0o755)
        script = d / "forker.py"
        shutil.copy(FORKER, script)
        script.chmod(0o644)
        r = forker(mesh, mesh["rogue"], "alpha", "connect", tries=30, script=script, uid=65534)
        assert r["alpha"]["error"] == "EPERM", r
        r = forker(mesh, mesh["rogue"], "alpha", "connect", tries=50, script=script)   # the same, as root
        assert r["alpha"]["ok"], r
    finally:
        shutil.rmtree(d)


def test_exe_is_matched_by_the_file_not_the_path(mesh):
    """delta selects exe: <dir>/py-allowed (a copy of python). Through a symlink it is the same file: delta. A copy
    with the same bytes at another path is not. The copy bind-mounted over the allowed path in a private mount
    namespace shows /proc/PID/exe as the allowed path; the old code matched that path (delta, allowed); now the
    (dev, ino) differs and it stays unmanaged (denied on all 30 tries)."""
    ok = forker(mesh, mesh["rogue"], "plain", "connect", tries=50, python=str(mesh["allowed"]))
    assert ok["plain"]["ok"], ok
    via_link = forker(mesh, mesh["rogue"], "plain", "connect", tries=50, python=str(mesh["link"]))
    assert via_link["plain"]["ok"], via_link
    copy = forker(mesh, mesh["rogue"], "plain", "connect", tries=30, python=str(mesh["copy"]))
    assert copy["plain"]["error"] == "EPERM", copy
    bind = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind {mesh["copy"]} {mesh["allowed"]} && exec "$@"', "sh")
    over = forker(mesh, mesh["rogue"], "plain", "connect", tries=30, python=str(mesh["allowed"]), wrap=bind)
    assert over["plain"]["error"] == "EPERM", over
