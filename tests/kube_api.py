"""A local Kubernetes API server for tests: list and watch of pods, namespaces, services and endpointslices over real HTTP.

It serves the objects of tests/data/k8s/*.json (shaped like a real cluster's), speaks the API's list/watch protocol the
way kube-apiserver does, and lets a test play a script on it:
- list: `GET /api/v1/pods` (and `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`, `/api/v1/services`,
  `/apis/discovery.k8s.io/v1/endpointslices`, namespaced variants) with `fieldSelector`, `labelSelector`, `limit` +
  `continue`; the list's `metadata.resourceVersion` is the store's current one;
- watch: `?watch=1&resourceVersion=N` streams `{"type", "object"}` JSON lines (chunked) for every change after N,
  BOOKMARK events when `allowWatchBookmarks=true` and the test calls `bookmark()`, and an ERROR event with a 410
  Expired Status for a resourceVersion older than the compacted history (`expire()`); a change that moves an object
  in or out of a selector arrives as ADDED / DELETED, like the real watch cache;
- `drop()` cuts every open watch mid-stream (no final chunk); `fail(n, status)` answers the next n requests with it;
- a Bearer token is required: without it (or with another) the answer is 401 with the Status body kube-apiserver sends.
"""
from __future__ import annotations

import copy
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

DATA = Path(__file__).parent / "data" / "k8s"
KINDS = ("pods", "namespaces", "services", "endpointslices")
_LIST_KIND = {"pods": ("PodList", "v1"), "namespaces": ("NamespaceList", "v1"), "services": ("ServiceList", "v1"),
              "endpointslices": ("EndpointSliceList", "discovery.k8s.io/v1")}
_KIND = {"pods": ("Pod", "v1"), "namespaces": ("Namespace", "v1"), "services": ("Service", "v1"),
         "endpointslices": ("EndpointSlice", "discovery.k8s.io/v1")}
_PATH = re.compile(r"^/(?:api/v1|apis/discovery\.k8s\.io/v1)(?:/namespaces/(?P<ns>[^/]+))?/(?P<kind>[a-z]+)$")

Obj = dict[str, Any]


def load(kind: str) -> list[Obj]:
    return json.loads((DATA / f"{kind}.json").read_text())["items"]


def key(obj: Obj) -> tuple[str, str]:
    md = obj["metadata"]
    return (md.get("namespace", ""), md["name"])


# -- selectors (the API's string forms) --------------------------------------------------------------------------
def _split_selector(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label_match(selector: str, labels: dict[str, str]) -> bool:
    for req in _split_selector(selector):
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", req)
        if m:
            k, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in" and labels.get(k) not in vals:
                return False
            if op == "notin" and k in labels and labels[k] in vals:
                return False
        elif "!=" in req:
            k, v = req.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in req:
            k, v = req.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def field_match(selector: str, obj: Obj) -> bool:
    for req in _split_selector(selector):
        neg = "!=" in req
        path, value = re.split(r"!=|==|=", req, maxsplit=1)
        cur: Any = obj
        for part in path.strip().split("."):
            cur = cur.get(part, "") if isinstance(cur, dict) else ""
        if (str(cur) == value.strip()) == neg:
            return False
    return True


@dataclass
class _Change:
    rv: int
    type: str               # ADDED | MODIFIED | DELETED | BOOKMARK
    old: Obj | None
    new: Obj


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    authorization: str
    status: int = 0
    at: float = field(default_factory=time.monotonic)


class KubeAPI:
    """The store, its history and the HTTP server (start() / stop(); `url` once started)."""

    def __init__(self, token: str = "test-token", objects: dict[str, list[Obj]] | None = None,
                 start_rv: int = 1000) -> None:
        self.token = token
        self._cv = threading.Condition()
        self._rv = start_rv
        self._compacted = 0                 # a watch from rv < this gets 410
        self._drop_gen = 0
        self._fail: list[int] = []
        self.store: dict[str, dict[tuple[str, str], Obj]] = {}
        self.history: dict[str, list[_Change]] = {k: [] for k in KINDS}
        self.requests: list[Request] = []
        for kind in KINDS:
            items = objects[kind] if objects is not None and kind in objects else load(kind)
            self.store[kind] = {}
            for o in items:
                o = copy.deepcopy(o)
                self._rv += 1
                o["metadata"]["resourceVersion"] = str(self._rv)
                self.store[kind][key(o)] = o
        self._compacted = self._rv
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()

    # -- the script ------------------------------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cv:
            return self._rv

    def _record(self, kind: str, type_: str, old: Obj | None, new: Obj) -> None:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        self.history[kind].append(_Change(self._rv, type_, old, new))
        self._cv.notify_all()

    def add(self, kind: str, obj: Obj) -> Obj:
        with self._cv:
            obj = copy.deepcopy(obj)
            self.store[kind][key(obj)] = obj
            self._record(kind, "ADDED", None, obj)
            return obj

    def modify(self, kind: str, k: tuple[str, str], change: Callable[[Obj], None]) -> Obj:
        with self._cv:
            old = self.store[kind][k]
            new = copy.deepcopy(old)
            change(new)
            self.store[kind][k] = new
            self._record(kind, "MODIFIED", old, new)
            return new

    def delete(self, kind: str, k: tuple[str, str]) -> None:
        with self._cv:
            old = self.store[kind].pop(k)
            self._record(kind, "DELETED", old, copy.deepcopy(old))

    def delete_quietly(self, kind: str, k: tuple[str, str]) -> None:
        """Delete without a watch event the client could still get: what etcd compaction loses."""
        with self._cv:
            self.store[kind].pop(k)
            self._rv += 1
            self._compacted = self._rv

    def bookmark(self) -> None:
        with self._cv:
            for kind in KINDS:
                self._rv += 1
                self.history[kind].append(_Change(self._rv, "BOOKMARK", None, {"metadata": {}}))
            self._cv.notify_all()

    def expire(self) -> None:
        """Compact the history: every open watch gets ERROR 410 Expired and ends, every resume from an older
        resourceVersion gets it too (so the client must list again)."""
        with self._cv:
            self._rv += 1
            self._compacted = self._rv
            for h in self.history.values():
                h.clear()
            self._cv.notify_all()

    def drop(self) -> None:
        """Cut every open watch connection mid-stream."""
        with self._cv:
            self._drop_gen += 1
            self._cv.notify_all()

    def fail(self, n: int, status: int = 500) -> None:
        with self._cv:
            self._fail.extend([status] * n)

    def watches(self, kind: str) -> list[Request]:
        return [r for r in list(self.requests) if r.query.get("watch") in ("1", "true") and r.path.endswith(kind)]

    def lists(self, kind: str) -> list[Request]:
        return [r for r in list(self.requests) if r.query.get("watch") not in ("1", "true") and r.path.endswith(kind)]

    # -- server ----------------------------------------------------------------------------------------------------
    def start(self, cert: Path | None = None, key: Path | None = None) -> KubeAPI:
        """Serve HTTP, or HTTPS with `cert`/`key` (as kube-apiserver does, on 127.0.0.1)."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._scheme = "http"
        if cert is not None and key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(cert), str(key))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        threading.Thread(target=self._server.serve_forever, name="kube-api", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self.drop()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": self.token if token is None else token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return path

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code}).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        u = urlsplit(h.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        req = Request("GET", u.path, q, h.headers.get("Authorization", ""))
        self.requests.append(req)
        if req.authorization != f"Bearer {self.token}":
            req.status = 401
            return self._status(h, 401, "Unauthorized", "Unauthorized")
        with self._cv:
            injected = self._fail.pop(0) if self._fail else 0
        if injected:
            req.status = injected
            return self._status(h, injected, "InternalError", f"injected failure {injected}")
        m = _PATH.match(u.path)
        if not m or m.group("kind") not in KINDS or (m.group("kind") == "namespaces" and m.group("ns")):
            req.status = 404
            return self._status(h, 404, "NotFound", f"the server could not find the requested resource ({u.path})")
        kind, ns = m.group("kind"), m.group("ns") or ""
        lsel, fsel = q.get("labelSelector", ""), q.get("fieldSelector", "")

        def visible(o: Obj | None) -> bool:
            if o is None:
                return False
            md = o["metadata"]
            return ((not ns or md.get("namespace") == ns) and label_match(lsel, md.get("labels") or {})
                    and field_match(fsel, o))

        req.status = 200
        if q.get("watch") in ("1", "true"):
            return self._watch(h, kind, q, visible)
        self._list(h, kind, q, visible)

    def _list(self, h: BaseHTTPRequestHandler, kind: str, q: dict[str, str], visible: Callable[[Obj], bool]) -> None:
        with self._cv:     # stored objects are replaced, never changed in place: no copy needed
            items = [o for _, o in sorted(self.store[kind].items()) if visible(o)]
            rv = self._rv
        offset = 0
        if q.get("continue"):
            rv_s, off_s = q["continue"].split(":")
            rv, offset = int(rv_s), int(off_s)
        limit = int(q.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{rv}:{offset + limit}"
            items = items[offset:offset + limit]
        else:
            items = items[offset:]
        list_kind, api_version = _LIST_KIND[kind]
        body = json.dumps({"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": items}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _watch(self, h: BaseHTTPRequestHandler, kind: str, q: dict[str, str],
               visible: Callable[[Obj | None], bool]) -> None:
        since = int(q.get("resourceVersion") or 0)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        conn: socket.socket = h.connection

        def send(obj: Any) -> None:
            data = json.dumps(obj).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        kind_name, api_version = _KIND[kind]
        with self._cv:
            gen = self._drop_gen
            if since and since < self._compacted:
                send({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": f"too old resource version: {since} ({self._compacted})", "reason": "Expired",
                    "code": 410}})
                h.wfile.write(b"0\r\n\r\n")
                return
            if not since:       # watch without a resourceVersion: synthetic ADDED for what exists
                pending = [_Change(int(o["metadata"]["resourceVersion"]), "ADDED", None, o)
                           for o in self.store[kind].values()]
                since = self._rv
            else:
                pending = []
            compacted = self._compacted
        try:
            while True:
                for c in pending:
                    if c.type == "BOOKMARK":
                        if bookmarks:
                            send({"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": api_version,
                                  "metadata": {"resourceVersion": str(c.rv)}}})
                        continue
                    was, now = visible(c.old), visible(c.new)
                    type_ = c.type
                    if c.type == "MODIFIED" and was != now:
                        type_ = "ADDED" if now else "DELETED"
                    elif c.type == "MODIFIED" and not now or c.type in ("ADDED", "DELETED") and not now and not was:
                        continue
                    obj = dict(copy.deepcopy(c.new), kind=kind_name, apiVersion=api_version)
                    send({"type": type_, "object": obj})
                with self._cv:
                    while True:
                        if self._drop_gen != gen:
                            conn.shutdown(socket.SHUT_RDWR)      # mid-stream: no terminating chunk
                            return
                        if self._compacted != compacted:
                            send({"type": "ERROR", "object": {
                                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": "The resourceVersion for the provided watch is too old.",
                                "reason": "Expired", "code": 410}})
                            h.wfile.write(b"0\r\n\r\n")
                            return
                        pending = [c for c in self.history[kind] if c.rv > since]
                        if pending:
                            since = pending[-1].rv
                            break
                        left = deadline - time.monotonic()
                        if left <= 0:
                            h.wfile.write(b"0\r\n\r\n")      # timeoutSeconds: a clean end
                            return
                        self._cv.wait(min(left, 0.5))
        except (BrokenPipeError, ConnectionResetError, OSError):
            return
