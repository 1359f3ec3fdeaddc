"""The capture's settings (limits: chunk size, per-request budgets) and its kernel counters as Prometheus metrics.
No kernel: the config is parsed, the collector fed a counter array."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from agent.config import (DEFAULT_CAPTURE_REQUEST_BYTES, DEFAULT_CAPTURE_RESPONSE_BYTES, ConfigError, limits_of,
                          parse_config)
from agent.export.metrics import CAPTURE_COUNTERS, AgentCollector, build_registry
from agent.kernel import abi


def test_the_budgets_default_and_are_runtime_settings_not_capacities():
    cfg = parse_config("{}")
    assert cfg.limits.capture_max_request_bytes == DEFAULT_CAPTURE_REQUEST_BYTES == 1 << 20
    assert cfg.limits.capture_max_response_bytes == DEFAULT_CAPTURE_RESPONSE_BYTES == 4 << 20
    changed = parse_config("limits: {capture_max_request_bytes: 4096, capture_max_response_bytes: 8192}")
    assert limits_of(changed) == limits_of(cfg)     # a reload may change them: the maps stay as they are
    assert changed.limits.capture_max_request_bytes == 4096
    # one call copies at most CAPTURE_CHUNKS_PER_CALL chunks: at the default chunk a 200 KB body fits in one write
    assert abi.CAPTURE_CHUNKS_PER_CALL * abi.Limits().capture_chunk >= 200_000
    assert "-DCAPTURE_CHUNK=1024" in limits_of(parse_config("limits: {capture_chunk: 1024}")).cflags()


@pytest.mark.parametrize("text,field", [
    ("limits: {capture_max_request_bytes: 0}", "limits.capture_max_request_bytes"),
    ("limits: {capture_max_response_bytes: 4294967296}", "limits.capture_max_response_bytes"),
    ("limits: {capture_chunk: 16}", "limits.capture_chunk"),
])
def test_bad_capture_settings_name_the_field(text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(text)


def test_every_kernel_capture_counter_is_a_metric_with_help():
    slots = {abi.COUNTER_CAPTURE_CHUNKS, abi.COUNTER_CAPTURE_TRUNCATED, abi.COUNTER_CAPTURE_TRUNCATED_BYTES,
             abi.COUNTER_CAPTURE_EVENTS_LOST, abi.COUNTER_CAPTURE_READ_FAILED, abi.COUNTER_CAPTURE_SOCKETS_FULL,
             abi.COUNTER_CAPTURE_TLS_SOCKETS, abi.COUNTER_CAPTURE_NOT_CAPTURED}
    assert {slot for slot, _, _ in CAPTURE_COUNTERS} == slots
    counters = [0] * abi.COUNTER_SLOTS
    for slot in slots:
        counters[slot] = 1000 + slot
    col = AgentCollector(lambda: counters, lambda: {}, lambda: {},
                         lambda: {"capture_undecoded": {"http2": 2, "grpc": 1}})
    text = generate_latest(build_registry(col)).decode()
    for slot, name, help_text in CAPTURE_COUNTERS:
        assert f"{name}_total {1000 + slot}.0" in text, name
        assert f"# HELP {name}_total {help_text}" in text
    assert 'aimesh_capture_undecoded_connections_total{reason="http2"} 2.0' in text
    assert 'aimesh_capture_undecoded_connections_total{reason="grpc"} 1.0' in text
