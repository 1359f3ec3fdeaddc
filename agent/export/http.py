"""The agent's HTTP endpoint: GET /metrics (Prometheus text format), /readyz, /livez and /healthz.

  /readyz   200 when the agent is ready (`healthy()`: datapath in force, maps filled) and not degraded (`health()`
            says ok); else 503 with {"status": "not ready" | "degraded", "reasons": [...]}.
  /healthz  the same as /readyz (kept for probes and scripts written against it).
  /livez    200 while the main loop ticked within `live_bound_s` (`loop_age_s()`); else 503 with
            {"status": "stalled", "reasons": [...]}. Without a `loop_age_s`, 200 while this server answers.

Every answer but /metrics is a small JSON object. The default listen address is loopback (the CLI's
`--metrics-addr 127.0.0.1:9464`): metrics name workloads and peers, so exposing them is an explicit choice.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("aimesh.http")

DEFAULT_LIVE_BOUND_S = 5.0
JSON_TYPE = "application/json"

Health = Callable[[], tuple[bool, list[str]]]


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {addr!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _json(code: int, status: str, reasons: list[str]) -> tuple[int, bytes]:
    body: dict[str, object] = {"status": status}
    if reasons:
        body["reasons"] = reasons
    return code, json.dumps(body, separators=(",", ":")).encode() + b"\n"


def readiness(healthy: Callable[[], bool], health: Optional[Health]) -> tuple[int, bytes]:
    """(HTTP code, JSON body) of /readyz. A callable that raises counts as not ready, with its error as the reason."""
    try:
        if not healthy():
            return _json(503, "not ready", ["datapath not in force (starting or stopping)"])
    except Exception as e:  # noqa: BLE001 - a probe answers, whatever the agent's state
        return _json(503, "not ready", [f"readiness check failed: {type(e).__name__}: {e}"])
    if health is None:
        return _json(200, "ok", [])
    try:
        ok, reasons = health()
    except Exception as e:  # noqa: BLE001
        return _json(503, "degraded", [f"health check failed: {type(e).__name__}: {e}"])
    if ok and not reasons:
        return _json(200, "ok", [])
    if ok:
        return _json(200, "ok", [str(r) for r in reasons])   # notes that do not stop readiness
    return _json(503, "degraded", [str(r) for r in reasons] or ["degraded"])


def liveness(loop_age_s: Optional[Callable[[], float]], bound_s: float) -> tuple[int, bytes]:
    """(HTTP code, JSON body) of /livez."""
    if loop_age_s is None:
        return _json(200, "ok", [])
    try:
        age = float(loop_age_s())
    except Exception as e:  # noqa: BLE001
        return _json(503, "stalled", [f"liveness check failed: {type(e).__name__}: {e}"])
    if math.isnan(age) or math.isinf(age):
        return _json(503, "stalled", ["main loop not running"])
    if age > bound_s:
        return _json(503, "stalled", [f"main loop last ticked {age:.1f} s ago (bound {bound_s:g} s)"])
    return _json(200, "ok", [])


class MetricsServer:
    """MetricsServer(addr, registry, healthy[, health=..., loop_age_s=..., live_bound_s=...]).

    `healthy() -> bool`: the datapath is in force and the maps are filled. `health() -> (ok, reasons)`: not
    degraded (a map full, the cgroup root gone, a failed checkpoint...). `loop_age_s() -> float`: seconds since the
    main loop last ticked (inf before it first does)."""

    def __init__(self, addr: str, registry: CollectorRegistry, healthy: Callable[[], bool], *,
                 health: Optional[Health] = None, loop_age_s: Optional[Callable[[], float]] = None,
                 live_bound_s: float = DEFAULT_LIVE_BOUND_S) -> None:
        if not live_bound_s > 0:
            raise ValueError(f"live_bound_s {live_bound_s!r} must be positive")
        host, port = parse_listen(addr)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                ctype = JSON_TYPE
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path in ("/readyz", "/healthz"):
                    code, body = readiness(healthy, health)
                elif path == "/livez":
                    code, body = liveness(loop_age_s, live_bound_s)
                else:
                    code, body = _json(404, "not found", [])
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args) -> None:
                log.debug(fmt, *args)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("AgentHTTPServer", (ThreadingHTTPServer,),
                          {"address_family": family, "allow_reuse_address": True, "daemon_threads": True})
        try:
            self.server = server_cls((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {addr}: {e.strerror}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
