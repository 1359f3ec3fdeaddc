"""A small OTLP/HTTP traces receiver for tests: POST /v1/traces with an application/x-protobuf body (gzip or not),
decoded as a real opentelemetry.proto ExportTraceServiceRequest (the package the OTLP exporters are built on), spans
kept in memory and answered with an ExportTraceServiceResponse, as the OTLP/HTTP specification says.

    with OtlpReceiver() as rx:
        ... export to rx.url ...
        spans = rx.wait_spans(2)      # [{"name":..., "kind":..., "attributes": {...}, "resource": {...}, ...}]
"""
from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2


def any_value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def attributes(kvs) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self.bad_requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def wait_spans(self, want: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.spans) >= want or time.monotonic() > deadline:
                    return list(self.spans)
            time.sleep(0.05)

    def _take(self, body: bytes) -> None:
        req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        out = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({"name": s.name, "kind": s.kind, "scope": ss.scope.name, "resource": resource,
                                "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                "status": s.status.code, "attributes": attributes(s.attributes)})
        with self._lock:
            self.requests += 1
            self.spans.extend(out)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                        raise ValueError(f"{self.path} {self.headers.get('Content-Type')}")
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    rx._take(body)
                except Exception:  # noqa: BLE001 - a test receiver: count it, answer 400
                    with rx._lock:
                        rx.bad_requests += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        return Handler
