"""agent/kernel/buildcache.py's key: two datapaths of one build share it; any other input changes it."""
from __future__ import annotations

from agent.kernel import abi, registry
from agent.kernel.buildcache import cache_key

PROGS = [("aimesh_connect4", 18, 10)]


def _flags(map_dir: str, limits: abi.Limits = abi.Limits()) -> list[str]:
    return limits.cflags() + registry.pin_cflags(map_dir, limits)


def test_the_map_directory_is_not_part_of_the_key():
    a = cache_key(b"text", _flags("/sys/fs/bpf/aimesh/1/maps"), "/sys/fs/bpf/aimesh/1/maps", PROGS)
    b = cache_key(b"text", _flags("/sys/fs/bpf/aimesh/22/maps"), "/sys/fs/bpf/aimesh/22/maps", PROGS)
    assert a == b


def test_text_limits_and_programs_are():
    d = "/sys/fs/bpf/aimesh/1/maps"
    base = cache_key(b"text", _flags(d), d, PROGS)
    assert cache_key(b"text2", _flags(d), d, PROGS) != base
    assert cache_key(b"text", _flags(d, abi.Limits(max_policies=1024)), d, PROGS) != base
    assert cache_key(b"text", _flags(d), d, [("aimesh_connect4", 18, 11)]) != base
