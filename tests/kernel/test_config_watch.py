"""The agent re-reads its config when a kubelet-mounted ConfigMap changes: no SIGHUP, no rollout.

kubelet (pkg/volume/util/atomic_writer.go) lays a ConfigMap volume out as
    ..2026_12_01_11_00_00.000000001/aimesh.yaml     the files of one version
    ..data -> ..2026_12_01_11_00_00.000000001        renamed over atomically on every update
    aimesh.yaml -> ..data/aimesh.yaml                the path the agent is given
and updates it by writing a new timestamped directory, making a `..data_tmp` symlink to it, renaming that onto
`..data` and removing the old directory. KubeletDir does exactly that on a real directory.
"""
from __future__ import annotations

import os
import signal
import shutil
import time
from pathlib import Path

import yaml

from agent.config_watch import ConfigWatch, kubelet_mounted
from tests.kernel.harness import free_port, run_client, start_server
from tests.kernel.test_enforce import base_config

KEY = "aimesh.yaml"


class KubeletDir:
    """A ConfigMap volume as kubelet writes it, with kubelet's update sequence."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.path.mkdir()
        self._n = 0
        self._current = self._version(text)
        os.symlink(self._current, self.path / "..data")
        os.symlink(f"..data/{KEY}", self.path / KEY)

    @property
    def file(self) -> Path:
        return self.path / KEY

    def _version(self, text: str) -> str:
        self._n += 1
        name = f"..2026_12_01_11_00_00.{self._n:09d}"
        (self.path / name).mkdir()
        (self.path / name / KEY).write_text(text)
        return name

    def update(self, cfg: dict | str) -> None:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        new = self._version(text)
        os.symlink(new, self.path / "..data_tmp")
        os.rename(self.path / "..data_tmp", self.path / "..data")   # the one atomic step
        shutil.rmtree(self.path / self._current)
        self._current = new


def wait_log(agent, text: str, before: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while agent.log().count(text) <= before:
        if time.monotonic() > deadline:
            raise AssertionError(f"agent did not log {text!r}:\n{agent.log()[-2000:]}")
        time.sleep(0.05)


def swap(agent, cm: KubeletDir, cfg: dict | str, expect: str) -> None:
    before = agent.log().count(expect)
    cm.update(cfg)
    wait_log(agent, expect, before)


# ---- the watch alone (no agent, no root) ----

def test_a_kubelet_swap_is_one_change_even_with_the_same_bytes(tmp_path):
    cm = KubeletDir(tmp_path / "cm", "mode: audit\n")
    assert kubelet_mounted(cm.file)
    w = ConfigWatch(cm.file)
    assert not w.changed()
    cm.update("mode: audit\n")            # kubelet rewrote it (e.g. another key of the ConfigMap changed)
    assert w.changed()
    assert not w.changed(), "one swap is one change"
    os.rename(cm.path / "..data", cm.path / "..gone")   # mid-swap / removed: no change, look again later
    assert not w.changed()
    os.rename(cm.path / "..gone", cm.path / "..data")
    assert not w.changed()


def test_a_plain_file_is_not_kubelet_mounted_and_a_rename_over_it_is_a_change(tmp_path):
    f = tmp_path / "aimesh.yaml"
    f.write_text("mode: audit\n")
    assert not kubelet_mounted(f)
    w = ConfigWatch(f)
    tmp = tmp_path / "aimesh.yaml.tmp"
    tmp.write_text("mode: enforce\n")
    tmp.replace(f)
    assert w.changed()
    w.seen_now()
    assert not w.changed()


# ---- a real agent ----

def test_the_agent_follows_configmap_swaps_and_keeps_the_old_policy_on_a_bad_one(cgroups, agents, tmp_path):
    port = free_port()
    batch, llama = cgroups.child("batch"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cm = KubeletDir(tmp_path / "configmap", yaml.safe_dump(cfg, sort_keys=False))
    agent = agents(cfg, extra=["--config", str(cm.file)])   # the last --config wins: the kubelet-style one
    assert f"watching {cm.file} for changes" in agent.log(), "auto must turn the watch on for a ConfigMap volume"
    srv = start_server(llama, port, name="llama")
    assert run_client(batch, port)["errors"] == {"EPERM": 1}

    good = base_config(cgroups, port)
    good["policies"].append({"from": "batch", "to": "llama", "ports": [port]})
    swap(agent, cm, good, "config reloaded")
    assert run_client(batch, port)["ok"] == 1

    bad = base_config(cgroups, port)
    bad["identities"][1]["kind"] = "servce"
    swap(agent, cm, bad, "config reload rejected")
    assert "identities.1.kind" in agent.log()
    assert run_client(batch, port)["ok"] == 1, "the previous policy must stay in force"

    swap(agent, cm, cfg, "config reloaded")   # back to the first: batch denied again
    assert run_client(batch, port)["errors"] == {"EPERM": 1}
    _, metrics = agent.get("/metrics")
    assert 'aimesh_config_reloads_total{result="ok"} 2.0' in metrics
    assert 'aimesh_config_reloads_total{result="failed"} 1.0' in metrics
    assert agent.log().count("changed: reloading") == 3
    srv.popen.kill()


def test_watch_off_leaves_a_configmap_swap_to_sighup(cgroups, agents, tmp_path):
    port = free_port()
    batch, llama = cgroups.child("batch"), cgroups.child("llama")
    cfg = base_config(cgroups, port)
    cm = KubeletDir(tmp_path / "configmap", yaml.safe_dump(cfg, sort_keys=False))
    agent = agents(cfg, extra=["--config", str(cm.file), "--watch-config", "off"])
    assert "for changes" not in agent.log()
    srv = start_server(llama, port, name="llama")
    good = base_config(cgroups, port)
    good["policies"].append({"from": "batch", "to": "llama", "ports": [port]})
    cm.update(good)
    assert run_client(batch, port)["errors"] == {"EPERM": 1}, "no watch: the swap alone changes nothing yet"
    before = agent.log().count("config reloaded")
    agent.popen.send_signal(signal.SIGHUP)
    wait_log(agent, "config reloaded", before)
    assert run_client(batch, port)["ok"] == 1
    assert "changed: reloading" not in agent.log()
    srv.popen.kill()
