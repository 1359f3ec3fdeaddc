"""Keep a ClusterState current from the Kubernetes API server: list, then watch from the list's resourceVersion.

One thread per stream (local pods, namespaces, services, endpointslices, and optionally remote pods), so nothing here
ever blocks the agent loop; the ClusterState's `on_change` is called from these threads.

Each stream follows client-go's reflector:
- list (pages of 500, `resourceVersion=0` so the API server answers from its watch cache, not etcd), replace the table;
- watch from the list's resourceVersion with `allowWatchBookmarks=true` and a server-side timeout of 5-10 min;
  an ended watch resumes from the last resourceVersion seen (object or bookmark);
- 410 Gone (HTTP status or an ERROR event with code 410): list again; the replace drops what was deleted meanwhile;
- any other error (refused, reset, dropped mid-stream, 5xx, 401/403, bad JSON): count it, keep the state, wait with
  exponential back-off and full jitter (0.5 s doubling to 30 s), then resume from the last resourceVersion.

lightkube supplies the configuration (in-cluster service account, or a kubeconfig with token, client certificate or exec
plugin) and the authenticated httpx client; the list/watch protocol is done here because lightkube's own watch restarts
without a resourceVersion on 410 (objects deleted meanwhile would stay) and cannot ask for bookmarks.
"""
from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import httpx2 as httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.identity.k8s.convert import (
    SERVICE_NAME_LABEL,
    Record,
    decode_event,
    decode_list,
    decode_status,
    label_selector,
)
from agent.identity.k8s.model import ClusterState

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PAGE_SIZE = 500


class WatchConfigError(Exception):
    """The API server cannot be reached as configured (no in-cluster account, bad kubeconfig, empty node name)."""


@dataclass(frozen=True)
class PodScope:
    """Which remote pods one `pods:` endpoint needs: a namespace ("" = all) and a labelSelector string
    ("" = all pods; build it with convert.label_selector)."""
    namespace: str = ""
    label_selector: str = ""


@dataclass(frozen=True)
class Stream:
    """One list/watch: `name` is the metrics label, `kind` the ClusterState table it fills."""
    name: str
    kind: str
    path: str
    field_selector: str = ""
    label_selector: str = ""


def pod_scope(namespace: str | None, match_labels: Mapping[str, str] | None = None,
              match_expressions: Sequence[object] | None = None) -> PodScope:
    """The watch scope of one `pods:` endpoint: its namespace (None when it selects namespaces by label: all
    namespaces are watched and the identity side filters by namespace labels) and its podSelector."""
    return PodScope(namespace or "", label_selector(match_labels, match_expressions))


_PATHS = {"pods": "/api/v1/pods", "namespaces": "/api/v1/namespaces", "services": "/api/v1/services",
          "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices"}


def streams_for(node_name: str, need_all_pods: bool = False, pod_scopes: Sequence[PodScope] = (),
                service_names: Sequence[str] | None = None) -> list[Stream]:
    """The watches one agent needs.
    Remote pods: one watch per scope when the config's selectors name them (a namespace and/or labels: the API server
    filters, the agent holds only matching pods); all pods of the cluster when `need_all_pods` comes without scopes
    (or one scope is everything).
    Services and EndpointSlices: all of them (as kube-proxy watches) unless `service_names` lists the Services the
    config's `service:` endpoints name: then EndpointSlices only with `kubernetes.io/service-name in (...)` (the
    slices churn with every pod readiness change), and an empty list watches neither."""
    if not node_name:
        raise WatchConfigError("kubernetes.node_name: empty (set it from the downward API: spec.nodeName)")
    out = [Stream("pods", "pods", _PATHS["pods"], field_selector=f"spec.nodeName={node_name}"),
           Stream("namespaces", "namespaces", _PATHS["namespaces"])]
    if service_names is None or service_names:
        names = sorted(set(service_names or ()))
        out += [Stream("services", "services", _PATHS["services"]),
                Stream("endpointslices", "endpointslices", _PATHS["endpointslices"],
                       label_selector=f"{SERVICE_NAME_LABEL} in ({','.join(names)})" if names else "")]
    if need_all_pods:
        scopes = list(dict.fromkeys(pod_scopes)) or [PodScope()]
        if PodScope() in scopes:
            scopes = [PodScope()]
        for i, s in enumerate(scopes):
            path = f"/api/v1/namespaces/{s.namespace}/pods" if s.namespace else _PATHS["pods"]
            name = "remote_pods" if len(scopes) == 1 else f"remote_pods_{i}"
            out.append(Stream(name, "pods", path, label_selector=s.label_selector))
    return out


@dataclass
class StreamStats:
    events: int = 0            # ADDED, MODIFIED, DELETED applied
    bookmarks: int = 0
    lists: int = 0             # successful lists (the first one included)
    relists: int = 0           # lists after the first (410 Gone)
    errors: int = 0
    synced: bool = False       # listed, and watching (or about to resume from a known resourceVersion)
    last_sync: float = 0.0     # time.time() of the last successful list
    last_error: str = ""


class _Gone(Exception):
    pass


class _ApiError(Exception):
    pass


class Backoff:
    """Exponential back-off with full jitter (AWS architecture blog "Exponential Backoff And Jitter")."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rand: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self._rand, self.attempt = base, cap, rand, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt += 1
        return delay * (0.5 + 0.5 * self._rand())   # half fixed, half jitter: never a hot retry loop

    def reset(self) -> None:
        self.attempt = 0


class _PodTables:
    """Several pod streams (local, remote scopes) fill one ClusterState.pods: each keeps what it saw, so a re-list
    of one never drops another's pods and a pod leaves the state only when no stream still has it."""

    def __init__(self, state: ClusterState) -> None:
        self._state, self._lock, self._seen = state, threading.Lock(), {}  # type: dict[str, dict[str, Record]]

    def replace(self, stream: str, items: Iterable[Record]) -> None:
        with self._lock:
            self._seen[stream] = {o.uid: o for o in items}      # type: ignore[union-attr]
            union: dict[str, Record] = {}
            for table in self._seen.values():
                union.update(table)
            self._state.replace("pods", union.values())

    def upsert(self, stream: str, obj: Record) -> None:
        with self._lock:
            self._seen.setdefault(stream, {})[obj.uid] = obj   # type: ignore[union-attr]
            self._state.upsert("pods", obj)

    def delete(self, stream: str, obj: Record) -> None:
        with self._lock:
            self._seen.setdefault(stream, {}).pop(obj.uid, None)   # type: ignore[union-attr]
            other = next((t[obj.uid] for t in self._seen.values() if obj.uid in t), None)   # type: ignore[union-attr]
            if other is None:
                self._state.delete("pods", obj)
            else:
                self._state.upsert("pods", other)


class _Runner:
    def __init__(self, stream: Stream, client: httpx.Client, state: ClusterState, pods: _PodTables,
                 stop: threading.Event, backoff: Backoff, rand: Callable[[], float]) -> None:
        self.stream, self.client, self.state, self.pods, self._stop = stream, client, state, pods, stop
        self.backoff, self._rand = backoff, rand
        self.stats = StreamStats()
        self._lock = threading.Lock()
        self._resp: httpx.Response | None = None
        self.thread = threading.Thread(target=self._run, name=f"k8s-watch-{stream.name}", daemon=True)

    # -- state ---------------------------------------------------------------------------------------------------
    def _replace(self, items: list[Record]) -> None:
        if self.stream.kind == "pods":
            self.pods.replace(self.stream.name, items)
        else:
            self.state.replace(self.stream.kind, items)

    def _apply(self, type_: str, rec: Record) -> None:
        if self.stream.kind == "pods":
            (self.pods.delete if type_ == "DELETED" else self.pods.upsert)(self.stream.name, rec)
        elif type_ == "DELETED":
            self.state.delete(self.stream.kind, rec)
        else:
            self.state.upsert(self.stream.kind, rec)

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _params(self, **extra: str) -> dict[str, str]:
        p = {k: v for k, v in (("fieldSelector", self.stream.field_selector),
                               ("labelSelector", self.stream.label_selector)) if v}
        p.update(extra)
        return p

    def _check(self, resp: httpx.Response, body: bytes) -> None:
        if resp.status_code == 200:
            return
        st = decode_status(body)
        if resp.status_code == 410 or st.code == 410:
            raise _Gone()
        hint = {401: " (the service account token is missing, expired or not accepted)",
                403: " (RBAC: the ClusterRole must allow get/list/watch on it)"}.get(resp.status_code, "")
        raise _ApiError(f"HTTP {resp.status_code} {st.reason or resp.reason_phrase}{hint}"
                        + (f": {st.message}" if st.message else ""))

    def _list(self) -> str:
        items: list[Record] = []
        cont, rv = "", ""
        while True:
            params = self._params(limit=str(PAGE_SIZE))
            if cont:
                params["continue"] = cont
            else:
                params["resourceVersion"] = "0"
            resp = self.client.get(self.stream.path, params=params)
            self._check(resp, resp.content)
            page = decode_list(self.stream.kind, resp.content)
            items.extend(page.items)
            rv, cont = page.resource_version, page.cont
            if not cont:
                break
        self._replace(items)
        with self._lock:
            s = self.stats
            s.relists += s.lists > 0
            s.lists += 1
            s.synced, s.last_sync = True, time.time()
        return rv

    def _watch(self, rv: str) -> str:
        timeout = int(300 * (1 + self._rand()))       # like client-go: spread the reconnects of many agents
        params = self._params(watch="1", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds=str(timeout))
        req = self.client.build_request("GET", self.stream.path, params=params,
                                        timeout=httpx.Timeout(10.0, read=timeout + 30.0))
        resp = self.client.send(req, stream=True)
        with self._lock:
            self._resp = resp
        try:
            if self._stop.is_set():
                return rv
            if resp.status_code != 200:
                self._check(resp, resp.read())
            with self._lock:
                self.stats.synced = True
            for line in resp.iter_lines():
                if not line:
                    continue
                ev = decode_event(self.stream.kind, line.encode())
                if ev.type == "ERROR":
                    st = ev.status
                    if st is not None and st.code == 410:
                        raise _Gone()
                    raise _ApiError(f"watch ERROR {st.code if st else ''} {st.reason if st else ''}: "
                                    f"{st.message if st else ''}")
                if ev.record is not None:
                    self._apply(ev.type, ev.record)
                with self._lock:
                    if ev.type == "BOOKMARK":
                        self.stats.bookmarks += 1
                    else:
                        self.stats.events += 1
                rv = ev.resource_version or rv
                self.backoff.reset()
            return rv
        finally:
            with self._lock:
                self._resp = None
            resp.close()

    # -- loop ----------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._list()
                    self.backoff.reset()
                rv = self._watch(rv)
                self.backoff.reset()      # ended cleanly (timeoutSeconds): resume at once
            except _Gone:
                rv = ""
                with self._lock:
                    self.stats.synced = False
            except Exception as e:    # noqa: BLE001 -- a watch thread must outlive every failure, counted
                if self._stop.is_set():
                    break
                msg = _one_line(e)
                with self._lock:
                    self.stats.errors += 1
                    self.stats.synced = False
                    self.stats.last_error = msg
                log.warning("kubernetes %s %s: %s", self.stream.name, self.stream.path, msg)
                self._stop.wait(self.backoff.next())

    def interrupt(self) -> None:
        """Unblock a watch read from another thread: shut the socket down (closing alone does not wake a recv)."""
        with self._lock:
            resp = self._resp
        if resp is None:
            return
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _one_line(e: BaseException) -> str:
    if isinstance(e, _ApiError):
        return str(e)
    text = " ".join(str(e).split()) or "connection closed"
    return f"{type(e).__name__}: {text}"


class WatchCollector(Collector):
    """aimesh_k8s_* metrics, read from the streams' stats at scrape time."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch

    def collect(self) -> Iterator:
        stats = self._watch.stats()
        fams = [
            (CounterMetricFamily("aimesh_k8s_watch_events", "Watch events applied (ADDED, MODIFIED, DELETED)",
                                 labels=["kind"]), lambda s: s.events),
            (CounterMetricFamily("aimesh_k8s_relists", "Lists after the first one (410 Gone)", labels=["kind"]),
             lambda s: s.relists),
            (CounterMetricFamily("aimesh_k8s_watch_errors", "List/watch failures (each followed by a back-off)",
                                 labels=["kind"]), lambda s: s.errors),
            (GaugeMetricFamily("aimesh_k8s_synced", "1 when the kind is listed and watched", labels=["kind"]),
             lambda s: float(s.synced)),
            (GaugeMetricFamily("aimesh_k8s_last_sync_timestamp_seconds", "Time of the last successful list",
                               labels=["kind"]), lambda s: s.last_sync),
        ]
        for fam, get in fams:
            for name, s in stats.items():
                fam.add_metric([name], get(s))
            yield fam


class Watch:
    """The running watches. `stats()` is a snapshot per stream name; `stop()` ends every thread."""

    def __init__(self, client: httpx.Client, state: ClusterState, streams: Sequence[Stream],
                 rand: Callable[[], float] = random.random,
                 backoff: Callable[[], Backoff] | None = None) -> None:
        self._client, self._stop = client, threading.Event()
        pods = _PodTables(state)
        make = backoff or (lambda: Backoff(rand=rand))
        self._runners = [_Runner(s, client, state, pods, self._stop, make(), rand) for s in streams]

    def start(self) -> Watch:
        for r in self._runners:
            r.thread.start()
        return self

    def stats(self) -> dict[str, StreamStats]:
        out = {}
        for r in self._runners:
            with r._lock:
                out[r.stream.name] = StreamStats(**vars(r.stats))
        return out

    def synced(self) -> bool:
        return all(s.synced for s in self.stats().values())

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.synced():
                return True
            self._stop.wait(0.05)
        return self.synced()

    def collector(self) -> WatchCollector:
        return WatchCollector(self)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for r in self._runners:
            r.interrupt()
        deadline = time.monotonic() + timeout
        for r in self._runners:
            r.thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()


def connect(kubeconfig: str | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> httpx.Client:
    """An authenticated client for the API server: in-cluster (service account token + CA, token re-read when the
    kubelet rotates it) unless `kubeconfig` names a file (development). WatchConfigError names what is missing."""
    from lightkube.config.client_adapter import Client as _adapter_client
    from lightkube.config.client_adapter import ConnectionParams
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    try:
        if kubeconfig:
            cfg = KubeConfig.from_file(kubeconfig)
        else:
            cfg = KubeConfig.from_service_account(service_account_dir)
        single = cfg.get()
        if single is None:
            raise WatchConfigError(f"kubernetes.kubeconfig: {kubeconfig}: no current-context")
        return _adapter_client(single, ConnectionParams(timeout=httpx.Timeout(10.0, read=60.0)))
    except WatchConfigError:
        raise
    except KeyError as e:
        raise WatchConfigError(f"kubernetes: not in a pod ({e.args[0]} unset) and no kubeconfig given") from None
    except (ConfigError, OSError, ValueError, AssertionError) as e:
        where = f"kubernetes.kubeconfig: {kubeconfig}" if kubeconfig else f"kubernetes: {service_account_dir}"
        raise WatchConfigError(f"{where}: {' '.join(str(e).split()) or type(e).__name__}") from None


def start_watch(state: ClusterState, node_name: str, kubeconfig: str | None = None, need_all_pods: bool = False,
                pod_scopes: Sequence[PodScope] = (), service_names: Sequence[str] | None = None) -> Watch:
    """The daemon's hook: connect (in-cluster unless `kubeconfig`), start every stream (streams_for), return at once
    (the first lists happen in the threads: use `.wait_synced(t)` / `.synced()`). Raises WatchConfigError, one line,
    before any thread starts."""
    streams = streams_for(node_name, need_all_pods, pod_scopes, service_names)
    return Watch(connect(kubeconfig), state, streams).start()
