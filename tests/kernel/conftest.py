import os

import pytest

from tests.kernel.harness import CgroupTree


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests load BPF programs: run as root (make test does)")
        for item in items:
            if "tests/kernel" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture
def cgroups():
    tree = CgroupTree()
    try:
        yield tree
    finally:
        tree.cleanup()


@pytest.fixture
def agents(tmp_path, cgroups):
    """Start agents with start(cfg); all are stopped at teardown (SIGTERM) even if a test fails."""
    from tests.kernel.harness import start_agent
    started = []

    def start(cfg, extra=(), degraded_ok=False, flow_log=True, env=None):
        a = start_agent(tmp_path, cgroups.root, cfg, list(extra), degraded_ok=degraded_ok, flow_log=flow_log,
                        env=env)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()
