"""Every ctypes mirror in agent/kernel/abi.py has the size the compiler gives the C struct in bpf/include/abi.h."""
from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

from bcc import BPF

from agent.kernel import abi
from agent.kernel.source import bpf_dir


def test_mirrors_match_compiled_sizes():
    header = (bpf_dir() / "include" / "abi.h").read_text()
    c_structs = set(re.findall(r"^struct (\w+) \{", header, re.M))
    assert c_structs == set(abi.MIRRORS), "every struct in abi.h needs a mirror in abi.py and back"
    # One array map per struct: bcc reports the compiled layout of its value type.
    probe = '#include "include/abi.h"\n' + "".join(
        f"BPF_ARRAY(size_{name}, struct {name}, 1);\n" for name in sorted(c_structs))
    b = BPF(text=assemble_probe(probe))
    try:
        for name, mirror in abi.MIRRORS.items():
            leaf = b[f"size_{name}".encode()].Leaf
            assert ct.sizeof(leaf) == ct.sizeof(mirror), f"struct {name}: C {ct.sizeof(leaf)} != ctypes {ct.sizeof(mirror)}"
            c_fields = [f[0] for f in leaf._fields_ if not f[0].startswith("__pad")]
            py_fields = [f[0] for f in mirror._fields_]
            assert c_fields == py_fields, f"struct {name}: field order differs"
    finally:
        b.cleanup()


def assemble_probe(probe: str) -> str:
    abi_h = (bpf_dir() / "include" / "abi.h").read_text()
    return "#include <uapi/linux/bpf.h>\n" + abi_h + probe.replace('#include "include/abi.h"\n', "")


def test_the_loaded_program_uses_the_registry_map_layouts(tmp_path):
    """The maps the real program pinned (not a probe) have the type, key and value sizes, capacity and flags that
    agent/kernel/registry.py declares (and digests into their pin names)."""
    import os
    import uuid

    from agent.kernel import bpfsys, registry
    from agent.kernel.loader import load
    from agent.kernel.pins import DatapathDir, remove_tree
    limits = abi.Limits(max_policies=1024, max_endpoints=1024, max_cgroups=1024, max_processes=1024)
    d = DatapathDir(Path("/sys/fs/bpf") / f"aimesh-test-{uuid.uuid4().hex[:8]}")
    try:
        res = load(d, limits)
        assert set(res["maps"]) == {m.name for m in registry.MAPS}
        assert sorted(os.listdir(Path(res["progs"]))) == sorted(p.name for p in registry.PROGRAMS)
        for spec in registry.MAPS:
            fd = bpfsys.obj_get(str(d.maps / res["maps"][spec.name]))
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            assert info.type == spec.map_type, spec.name
            assert info.max_entries == spec.capacity(limits), spec.name
            assert info.flags == spec.flags, spec.name
            if spec.key is not None:
                assert info.key_size == ct.sizeof(spec.key), spec.name
                assert info.value_size == ct.sizeof(spec.value), spec.name
    finally:
        remove_tree(d.path)
