"""The DaemonSet's least privilege, proven on this kernel with a real agent: exactly the capabilities the manifest
adds, no_new_privs (allowPrivilegeEscalation: false), and every mount read-only but bpffs and a scratch directory
(readOnlyRootFilesystem and the read-only hostPaths). Then each capability is shown to be needed.

The agent runs in a private mount namespace (unshare -m) where every mount is remounted read-only (a bind remount:
only this namespace's view changes), under `setpriv --bounding-set` with the manifest's list: for a uid-0 process
the bounding set is what exec leaves it. No container runtime is involved, so seccomp is not exercised here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from tests.kernel import harness
from tests.kernel.harness import REPO, free_port, run_client, start_agent, start_server
from tests.kernel.test_enforce import base_config

DAEMONSET = REPO / "deploy/k8s/base/agent-daemonset.yaml"
TLS_COMPONENT = REPO / "deploy/k8s/components/tls-capture/kustomization.yaml"
WRITABLE_FS = {"bpf", "proc", "devtmpfs", "devpts", "mqueue"}   # bpffs: pins; the rest is what any container has


def manifest_caps() -> list[str]:
    ds = yaml.safe_load(DAEMONSET.read_text())
    return ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


def tls_component_caps() -> list[str]:
    comp = yaml.safe_load(TLS_COMPONENT.read_text())
    ops = [op for p in comp["patches"] for op in yaml.safe_load(p["patch"])]
    return [op["value"] for op in ops if op["path"].endswith("/capabilities/add/-")]


def bounded(caps: list[str], scratch: Path) -> str:
    """A wrapper to use as the Python executable: a private mount namespace where every mount but bpffs (and the
    kernel's own proc/dev) is read-only and scratch stays writable, then exec with exactly caps and no_new_privs."""
    bset = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    inner = scratch / "in-namespace.sh"
    inner.write_text(f"""#!/bin/sh
set -e
mount --bind "{scratch}" "{scratch}"
while read -r _dev mnt fstype _rest; do
  case " {' '.join(sorted(WRITABLE_FS))} " in *" $fstype "*) continue ;; esac
  [ "$mnt" = "{scratch}" ] && continue
  mount -o remount,bind,ro "$mnt" 2>/dev/null || true
done < /proc/self/mounts
if touch /aimesh-rw-probe 2>/dev/null; then rm -f /aimesh-rw-probe; echo "the root is still writable" >&2; exit 97; fi
exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set={bset} -- {sys.executable} "$@"
""")
    outer = scratch / "python-bounded"
    outer.write_text(f'#!/bin/sh\nexec unshare --mount --propagation private -- /bin/sh "{inner}" "$@"\n')
    for f in (inner, outer):
        f.chmod(0o755)
    return str(outer)


@pytest.fixture
def scratch(tmp_path):
    d = tmp_path / "rw"
    d.mkdir()
    return d


def start_bounded(monkeypatch, scratch: Path, cgroups, caps: list[str], cfg: dict, **kw):
    monkeypatch.setattr(harness, "sys", types.SimpleNamespace(executable=bounded(caps, scratch)))
    env = {"PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(scratch)}
    return start_agent(scratch, cgroups.root, cfg, env=env, **kw)


def test_the_manifest_lists_the_four_capabilities_and_the_component_adds_sys_admin():
    assert sorted(manifest_caps()) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE"]
    assert tls_component_caps() == ["SYS_ADMIN"]


def test_an_agent_with_exactly_the_manifests_capabilities_and_read_only_mounts_enforces(
        monkeypatch, scratch, cgroups):
    port = free_port()
    chat, batch, llama = cgroups.child("chat"), cgroups.child("batch"), cgroups.child("llama")
    agent = start_bounded(monkeypatch, scratch, cgroups, manifest_caps(), base_config(cgroups, port))
    try:
        status = Path(f"/proc/{agent.popen.pid}/status").read_text()   # the wrappers exec: this is the agent
        eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
        want = sum(1 << n for n in (39, 38, 12, 19))   # CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE
        assert eff == want, f"CapEff {eff:#x}, expected {want:#x}"
        assert "NoNewPrivs:\t1" in status
        srv = start_server(llama, port, name="llama")
        assert run_client(chat, port)["ok"] == 1
        assert run_client(batch, port)["errors"] == {"EPERM": 1}
        _, health = agent.get("/healthz")
        assert '"ok"' in health
        srv.popen.kill()
    finally:
        agent.stop()
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN"])
def test_without_each_bpf_capability_the_agent_cannot_start(monkeypatch, scratch, cgroups, missing):
    caps = [c for c in manifest_caps() if c != missing]
    with pytest.raises(AssertionError, match="agent exited with 2") as e:
        start_bounded(monkeypatch, scratch, cgroups, caps, base_config(cgroups, free_port()), timeout=120)
    assert "aimesh: error:" in str(e.value) and "Traceback" not in str(e.value)


def _probe(caps: list[str], code: str, pid: int) -> subprocess.CompletedProcess:
    bset = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    return subprocess.run(["setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all",
                           f"--bounding-set={bset}", "--", sys.executable, "-c", code, str(pid)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_sys_ptrace_is_what_reads_another_users_proc_exe_and_root():
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
    try:
        code = ("import os, sys; p = sys.argv[1]\n"
                "for f in ('exe', 'root'):\n"
                "    try: os.readlink(f'/proc/{p}/{f}'); print(f, 'ok')\n"
                "    except PermissionError: print(f, 'EACCES')\n")
        without = [c for c in manifest_caps() if c != "SYS_PTRACE"]
        for _ in range(100):   # until the child has switched uid and exec'd sleep
            if "Uid:\t65534" in Path(f"/proc/{other.pid}/status").read_text() and \
                    os.readlink(f"/proc/{other.pid}/exe").endswith("/sleep"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the uid-65534 process did not start")
        assert _probe(without, code, other.pid).stdout.split() == ["exe", "EACCES", "root", "EACCES"]
        assert _probe(manifest_caps(), code, other.pid).stdout.split() == ["exe", "ok", "root", "ok"]
    finally:
        other.kill()
        other.wait()


def test_the_tls_uprobes_need_sys_admin():
    """perf_event_open on the uprobe PMU: EACCES with the base capabilities, a perf fd with the component's."""
    code = ("import sys\n"
            "from agent.kernel import bpfsys, uprobes\n"
            "libs = [p for p in ('/lib/x86_64-linux-gnu/libssl.so.3', '/usr/lib/x86_64-linux-gnu/libssl.so.3',\n"
            "        '/lib/aarch64-linux-gnu/libssl.so.3') if __import__('os').path.exists(p)]\n"
            "try:\n"
            "    fd = bpfsys.uprobe_perf_fd(libs[0], 0, False, bpfsys.uprobe_pmu()); print('ok')\n"
            "except bpfsys.BpfError as e: print('errno', e.errno)\n")
    base = _probe(manifest_caps(), code, 0)
    assert base.stdout.split() == ["errno", "13"], base.stderr
    full = _probe(manifest_caps() + tls_component_caps(), code, 0)
    assert full.stdout.split() == ["ok"], full.stderr


def test_opening_a_program_by_id_needs_sys_admin():
    """What the base capabilities cost on an upgrade: the agent cannot open the program in force by its id."""
    from bcc import BPF

    from agent.kernel import bpfsys
    b = BPF(text=b"int aimesh_k8s_cap_probe(void *ctx) { return 0; }")
    try:
        prog_id = bpfsys.prog_info(b.load_func(b"aimesh_k8s_cap_probe", BPF.SOCKET_FILTER).fd).id
        code = ("import sys\nfrom agent.kernel import bpfsys\n"
                "try: bpfsys.prog_fd_by_id(int(sys.argv[1])); print('ok')\n"
                "except bpfsys.BpfError as e: print('errno', e.errno)\n")
        assert _probe(manifest_caps(), code, prog_id).stdout.split() == ["errno", "1"]
        assert _probe(manifest_caps() + tls_component_caps(), code, prog_id).stdout.split() == ["ok"]
    finally:
        b.cleanup()
