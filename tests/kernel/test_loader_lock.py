"""One build at a time, and none after its agent died: the loader dies with the agent (PR_SET_PDEATHSIG), builds
under the datapath directory's flock, and the next start reaps what a killed loader left half-pinned."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tests.kernel.harness import REPO, free_port
from tests.kernel.test_enforce import base_config

# An "agent" that only runs the loader child the way the daemon does (same lock, same arguments).
_PARENT = """
import sys
from pathlib import Path
from agent.kernel import abi
from agent.kernel.loader import run_child
from agent.kernel.pins import DatapathDir, RootLock
d = DatapathDir(Path(sys.argv[1]))
lock = RootLock(d)
lock.acquire()
print("locked", flush=True)
run_child(d, abi.Limits(), lock=lock)
print("built", flush=True)
"""


def _pins(root: Path):
    from agent.identity.cgroups import cgroup_id
    from agent.kernel.pins import DatapathDir
    return DatapathDir.for_root(cgroup_id(root))


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait(pred, what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit    # a bound on a hang, not a timing assertion
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _loader_cmd(d, extra=()) -> list[str]:
    from agent.kernel import abi
    return [sys.executable, "-m", "agent.kernel.loader", "--dir", str(d.path), "--limits",
            json.dumps(asdict(abi.Limits())), *extra]


def test_a_loader_dies_with_its_agent_and_the_next_start_pins_one_build(cgroups, agents):
    d = _pins(cgroups.root)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(d.path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout.readline().strip() == "locked"
        _wait(lambda: _children(parent.pid), "the loader child did not start")
        loader = _children(parent.pid)[0]
        # kill the "agent" while its loader is building: once bcc has pinned the maps, before the programs are in
        _wait(lambda: d.maps.is_dir() and any(d.maps.iterdir()) or not _alive(loader), "bcc pinned no map")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _wait(lambda: not _alive(loader), "the loader outlived its agent")
    finally:
        parent.kill()
        parent.wait()
    builds = [p.name for p in d.progs.iterdir()] if d.progs.is_dir() else []
    assert not [b for b in builds if not b.startswith("tmp-")], f"a killed loader finished a build: {builds}"
    port = free_port()
    for n in ("chat", "batch", "llama"):
        cgroups.child(n)
    agent = agents(base_config(cgroups, port))
    from agent.kernel.pins import read_manifest
    m = read_manifest(d)
    assert m is not None and m["agent_pid"] == agent.popen.pid
    assert sorted(p.name for p in d.progs.iterdir()) == [m["build"]["build"]]        # one build, the adopted one
    assert sorted(p.name for p in d.maps.iterdir()) == sorted(set(m["build"]["maps"].values()))
    assert "loaded the programs" in agent.log()


def test_two_loaders_cannot_pin_at_once(cgroups):
    d = _pins(cgroups.root)
    first = subprocess.Popen(_loader_cmd(d), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from agent.kernel.pins import agent_attached
        _wait(lambda: agent_attached(d) or first.poll() is not None, "the first loader took no lock")
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGSTOP)          # holds the lock, mid-build, for as long as the second one tries
        try:
            second = subprocess.run(_loader_cmd(d), cwd=REPO, capture_output=True, text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and "holds" in second.stderr, second
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert sorted(p.name for p in d.progs.iterdir()) == [res["build"]]           # only the first one's build
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_loader_whose_agent_is_already_gone_pins_nothing(cgroups):
    d = _pins(cgroups.root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    r = subprocess.run(_loader_cmd(d, ["--parent-pid", str(dead.pid)]), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "is gone" in r.stderr, r
    assert not (d.maps.is_dir() and any(d.maps.iterdir()))
