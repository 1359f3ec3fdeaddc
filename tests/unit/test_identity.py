"""Pure identity helpers: cgroup2 mount detection, selector matching, BPF source assembly."""
from __future__ import annotations

from pathlib import Path

from agent.config import parse_config
from agent.identity.cgroups import cgroup2_mount_from
from agent.identity.selectors import cgroup_match, descendants_identity, process_match
from agent.kernel.abi import Limits
from agent.kernel.source import assemble


def test_cgroup2_mount_detection():
    hybrid = ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_mount_from(hybrid) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount_from("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n") == Path("/sys/fs/cgroup")
    assert cgroup2_mount_from("cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n") == Path("/mnt/my cg")
    assert cgroup2_mount_from("proc /proc proc rw 0 0\n") is None


CFG = parse_config("""
identities:
  - {name: chat, kind: service, select: {cgroups: ["/demo/chat*"], processes: [{cmdline: "*chat_app*", uids: [1000]}]}}
  - {name: llama, kind: model, select: {cgroups: ["/demo/*"], processes: [{exe: "*/llama-server", cmdline: "*--v3*", allow_any_user: true}]}}
""")


def test_cgroup_globs_first_match_wins():
    assert cgroup_match("/demo/chat-1", CFG.identities) == "chat"
    assert cgroup_match("/demo/chat-1/sub", CFG.identities) == "chat"
    assert cgroup_match("/demo/llama", CFG.identities) == "llama"
    assert cgroup_match("/other", CFG.identities) is None


def test_process_selectors_need_every_given_field():
    assert process_match("/usr/bin/python3", "python3 chat_app.py", CFG.identities, (1000, 1000)) == "chat"
    assert process_match("/usr/bin/python3", "python3 chat_app.py", CFG.identities, (65534, 65534)) is None
    assert process_match("/usr/bin/python3", "python3 chat_app.py", CFG.identities, (65534, 1000)) is None
    assert process_match("/usr/bin/python3", "python3 chat_app.py", CFG.identities) is None   # uids unknown
    assert process_match("/opt/llama-server", "llama-server --v3", CFG.identities) == "llama"
    assert process_match("/opt/llama-server", "llama-server --v2", CFG.identities) is None


def test_a_literal_exe_matches_the_file_by_inode(tmp_path):
    """issue 15: exe without a glob is the file it names (dev, ino): a symlink to it is the same file, a copy is not,
    and a file replaced at the path is matched as the new file (re-resolved at every match)."""
    import os
    import shutil
    from agent.identity.selectors import file_id
    allowed, copy, link = tmp_path / "allowed", tmp_path / "copy", tmp_path / "link"
    shutil.copy("/usr/bin/true", allowed)
    shutil.copy("/usr/bin/true", copy)
    link.symlink_to(allowed)
    cfg = parse_config(f"identities: [{{name: a, kind: model, select: {{processes: [{{exe: '{allowed}'}}]}}}}]")
    assert process_match(str(allowed), "x", cfg.identities, (0, 0), file_id(str(allowed))) == "a"
    assert process_match(str(allowed), "x", cfg.identities, (0, 0), file_id(str(link))) == "a"
    assert process_match(str(allowed), "x", cfg.identities, (0, 0), file_id(str(copy))) is None   # same path shown
    old = file_id(str(allowed))
    os.replace(copy, allowed)
    assert process_match(str(allowed), "x", cfg.identities, (0, 0), old) is None
    assert process_match(str(allowed), "x", cfg.identities, (0, 0), file_id(str(allowed))) == "a"


def test_source_assembly_inlines_our_headers_once():
    text = assemble()
    assert text.count("#define AIMESH_ABI_H") == 1
    assert '#include "' not in text
    for fn in ("aimesh_connect4", "aimesh_post_bind6", "aimesh_ingress", "cgroup_mkdir"):
        assert fn in text


def test_limits_become_defines():
    flags = Limits(max_policies=10).cflags()
    assert "-DMAX_POLICIES=10" in flags and "-DRINGBUF_PAGES=256" in flags


def test_descendants_identity_is_only_what_every_cgroup_below_gets():
    """cgroup_inherit: the kernel gives an unclassified cgroup this; it must agree with cgroup_match for any child."""
    cfg = parse_config("""
identities:
  - {name: batch, kind: service, select: {cgroups: ["/r/app/batch", "/r/tools/x*"]}}
  - {name: app, kind: service, select: {cgroups: ["/r/app", "/r/app/*"]}}
  - {name: solo, kind: service, select: {cgroups: ["/r/solo"]}}
  - {name: web, kind: service, select: {cgroups: ["/r/web*"]}}
""")
    ids = cfg.identities
    assert descendants_identity("/r/web", ids) == "web"
    assert descendants_identity("/r/web-1/a", ids) == "web"
    assert descendants_identity("/r/solo", ids) is None          # only the cgroup itself is `solo`
    assert descendants_identity("/r/app", ids) is None           # /r/app/batch is `batch`, listed first
    assert descendants_identity("/r/app/other", ids) == "app"
    assert descendants_identity("/r/tools", ids) is None         # /r/tools/x... is `batch`, the rest nothing
    for parent in ("/r/web", "/r/app/other", "/r/web-1/a"):
        for child in ("c", "batch", "x/y", "a*b"):
            assert cgroup_match(f"{parent}/{child}", ids) == descendants_identity(parent, ids)
