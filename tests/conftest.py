"""Session-wide test set-up: markers by directory, the shared build cache of the BPF programs, shared fixtures.

- Everything under tests/kernel is marked `kernel` (it loads BPF programs: root and a real kernel), so
  `pytest -m "not kernel"` is the unit suite and `make unit` needs no root.
- The agents the kernel tests start compile the same sources with the same limits hundreds of times; only their map
  pin paths differ. AIMESH_BUILD_CACHE (agent/kernel/buildcache.py) lets them share one compilation: the first
  agent of a session compiles with bcc, the others load its bytecode on their own fresh maps (each test still gets
  its own cgroup root, datapath directory and maps; the kernel verifies every load). The directory lives for the
  session only; pytest-xdist workers inherit it from the controller.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.kernel.buildcache import ENV as BUILD_CACHE_ENV
from tests.kernel.harness import free_port as _free_port

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or os.environ.get(BUILD_CACHE_ENV):
        return   # an xdist worker (the controller made the cache) or a cache the caller chose
    d = tempfile.mkdtemp(prefix="aimesh-build-cache-")
    os.environ[BUILD_CACHE_ENV] = d
    config.stash[_CACHE_KEY] = d


def pytest_unconfigure(config: pytest.Config) -> None:
    d = config.stash.get(_CACHE_KEY, None)
    if d:
        shutil.rmtree(d, ignore_errors=True)
        os.environ.pop(BUILD_CACHE_ENV, None)


_CACHE_KEY = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture
def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    return _free_port()
