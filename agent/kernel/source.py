"""Assemble the BPF program text for bcc: one translation unit with our quoted includes inlined.

bcc rewrites map calls (`map.lookup(...)`) only in the main text, so `#include "..."` of our own headers is inlined
here; system includes (`<linux/...>`) are left to the compiler.
"""
from __future__ import annotations

import re
from pathlib import Path

PROGRAM_FILES = ("sock_create.c", "sock_addr.c", "sock_bind.c", "sock_ingress.c", "sock_egress.c", "sock_ops.c",
                 "sk_msg.c", "watch.c", "capture.c", "tls.c")   # tls.c uses capture.c's capture_data: keep it after
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def bpf_dir() -> Path:
    """bpf/ next to the agent package (source checkout or editable install)."""
    return Path(__file__).resolve().parents[2] / "bpf"


def _inline(path: Path, root: Path, seen: set[Path]) -> list[str]:
    out: list[str] = []
    for line in path.read_text().splitlines():
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if not inc.exists():
            inc = (root / m.group(1)).resolve()
        if not inc.exists():
            raise FileNotFoundError(f"{path}: #include \"{m.group(1)}\" not found")
        if inc not in seen:
            seen.add(inc)
            out.append(f"/* ---- {inc.relative_to(root)} ---- */")
            out.extend(_inline(inc, root, seen))
    return out


def assemble(root: Path | None = None, files: tuple[str, ...] = PROGRAM_FILES) -> str:
    root = root or bpf_dir()
    seen: set[Path] = set()
    lines: list[str] = []
    for f in files:
        lines.append(f"/* ==== {f} ==== */")
        lines.extend(_inline(root / f, root, seen))
    return "\n".join(lines) + "\n"
