"""The agent's HTTP endpoint: GET /metrics (Prometheus text format) and GET /healthz."""
from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("aimesh.http")


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {addr!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    def __init__(self, addr: str, registry: CollectorRegistry, healthy: Callable[[], bool]) -> None:
        host, port = parse_listen(addr)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok = healthy()
                    body, ctype, code = (b"ok\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
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
