"""`aimesh check` says why the fast path is off by default, and warns when a config turns it on."""
import subprocess
import sys

from agent.config import FAST_PATH_CAVEAT, Config


def _check(tmp_path, text):
    p = tmp_path / "aimesh.yaml"
    p.write_text(text)
    return subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(p)], capture_output=True, text=True)


def test_fast_path_is_off_by_default_and_check_says_why(tmp_path):
    assert Config().fast_path is False
    r = _check(tmp_path, "mode: enforce\n")
    assert r.returncode == 0, r.stderr
    assert f"note: fast_path is off (the default): {FAST_PATH_CAVEAT}" in r.stdout
    assert "EAGAIN" in FAST_PATH_CAVEAT


def test_check_warns_when_a_config_turns_it_on(tmp_path):
    r = _check(tmp_path, "fast_path: true\n")
    assert r.returncode == 0, r.stderr
    assert f"warning: fast_path: true: {FAST_PATH_CAVEAT}" in r.stdout


def test_check_warns_for_a_policy_that_opts_in(tmp_path):
    r = _check(tmp_path, "identities:\n  - {name: a, kind: service}\n  - {name: b, kind: model}\n"
                         "policies:\n  - {from: a, to: b, ports: [80], fast_path: true}\n")
    assert r.returncode == 0, r.stderr
    assert "warning: policy a -> b has fast_path: true" in r.stdout
