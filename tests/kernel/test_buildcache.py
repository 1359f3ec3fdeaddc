"""agent/kernel/buildcache.py: a second datapath of the same sources and limits loads the first one's compiled
programs, on maps of its own, and the kernel sees the same code (same program tags) as bcc's compile gives."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agent.kernel import bpfsys, buildcache, loader, registry
from agent.kernel.abi import Limits
from agent.kernel.pins import BPFFS, DatapathDir, remove_tree


@pytest.fixture
def two_dirs():
    base = BPFFS / f"aimesh-test-cache-{uuid.uuid4().hex[:8]}"
    yield DatapathDir(base / "a"), DatapathDir(base / "b")
    remove_tree(base)


def _progs(res: dict) -> dict[str, bpfsys.ProgInfo]:
    out = {}
    for name in os.listdir(res["progs"]):
        fd = bpfsys.obj_get(str(Path(res["progs"]) / name))
        try:
            out[name] = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
    return out


def _map_ids(d: DatapathDir) -> dict[str, int]:
    out = {}
    for name in os.listdir(d.maps):
        fd = bpfsys.obj_get(str(d.maps / name))
        try:
            out[name] = bpfsys.map_info(fd).id
        finally:
            os.close(fd)
    return out


def test_a_cached_build_loads_the_same_programs_on_fresh_maps(two_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(buildcache.ENV, str(tmp_path / "cache"))
    a, b = two_dirs
    limits = Limits()
    first = loader.load(a, limits)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1          # bcc compiled it and the build was saved
    calls = []
    monkeypatch.setattr(buildcache, "load", lambda *args, f=buildcache.load: calls.append(1) or f(*args))
    second = loader.load(b, limits)
    assert calls, "the second load did not consult the cache"
    pa, pb = _progs(first), _progs(second)
    assert set(pa) == set(pb) == {p.name for p in registry.PROGRAMS} | set(registry.UPROBE_PROGRAMS)
    for name in pa:
        assert (pa[name].type, pa[name].tag, pa[name].name) == (pb[name].type, pb[name].tag, pb[name].name), name
        assert not set(pa[name].map_ids) & set(pb[name].map_ids), f"{name} shares maps with the first datapath"
    ma, mb = _map_ids(a), _map_ids(b)
    assert set(ma) == set(mb) == {m.pin_name(limits) for m in registry.MAPS}
    assert not set(ma.values()) & set(mb.values())
    for name in ma:                                                       # the same attributes, BTF included
        fa, fb = bpfsys.obj_get(str(a.maps / name)), bpfsys.obj_get(str(b.maps / name))
        try:
            ia, ib = buildcache._map_attrs(buildcache._lib(), fa), buildcache._map_attrs(buildcache._lib(), fb)
        finally:
            os.close(fa)
            os.close(fb)
        assert {k: v for k, v in ia.items() if k != "btf_id"} == {k: v for k, v in ib.items() if k != "btf_id"}
        assert bool(ia["btf_id"]) == bool(ib["btf_id"])


def test_without_the_cache_variable_nothing_is_cached(two_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv(buildcache.ENV, raising=False)
    monkeypatch.setattr(buildcache, "save", lambda *a: pytest.fail("saved without AIMESH_BUILD_CACHE"))
    monkeypatch.setattr(buildcache, "load", lambda *a: pytest.fail("loaded without AIMESH_BUILD_CACHE"))
    res = loader.load(two_dirs[0], Limits())
    assert len(os.listdir(res["progs"])) == len(registry.PROGRAMS) + len(registry.UPROBE_PROGRAMS)
