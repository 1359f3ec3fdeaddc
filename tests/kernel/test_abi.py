"""Every ctypes mirror in agent/kernel/abi.py has the size the compiler gives the C struct in bpf/include/abi.h."""
from __future__ import annotations

import ctypes as ct
import re

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


def test_the_loaded_program_uses_the_same_map_layouts():
    """The maps of the real program (not a probe) have the mirrored key and value sizes."""
    from agent.kernel.datapath import Datapath, _map_specs
    dp = Datapath(abi.Limits(max_policies=1024, max_endpoints=1024, max_cgroups=1024, max_processes=1024))
    try:
        for name, (kt, vt, _, _) in _map_specs(dp.limits).items():
            t = dp.bpf[name.encode()]
            assert ct.sizeof(t.Key) == ct.sizeof(kt), name
            assert ct.sizeof(t.Leaf) == ct.sizeof(vt), name
    finally:
        dp.close()
