"""ketchd's Prometheus metrics: ``[metrics] address`` serves them over HTTP, at ``/v1/metrics``
(containerd's path) and ``/metrics``, in Prometheus' text format (or OpenMetrics, if asked).

ketchd imports this module (and prometheus_client) only when the address is set: its start-up
time is measured. The core keeps plain counters (``Exchange.published``, ``TaskManager.takeovers``,
``Collector.runs``, ``ContentStore.ingested``...) that cost nothing when nobody scrapes; this
module reads them, and the gRPC calls, into metric families:

- ``ketchd_grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`` and the histogram
  ``ketchd_grpc_server_handling_seconds{grpc_service, grpc_method}`` (go-grpc-prometheus' names,
  which containerd exports unprefixed), from a server interceptor: every gRPC call, the CRI too;
- ``ketchd_tasks{namespace, state}``: tasks by their process' state, asked of the shims at scrape;
- ``ketchd_shims`` and ``ketchd_shim_groups`` (shims connected to; those shared by a group of
  tasks), ``ketchd_shims_lost_total``, ``ketchd_shim_takeovers_total``, ``ketchd_tasks_buried_total``;
- ``ketchd_events_published_total{topic}``, ``ketchd_events_dropped_total{reason}``,
  ``ketchd_event_subscribers``;
- ``ketchd_content_stored_bytes{namespace}``, ``ketchd_content_blobs{namespace}``,
  ``ketchd_content_ingested_bytes_total``;
- ``ketchd_gc_duration_seconds{kind}`` (a summary: its ``_count`` is the runs),
  ``ketchd_gc_removed_total{resource}``;
- per running container, labelled ``namespace`` and ``id``, cAdvisor's names for its cgroup's use
  (``container_cpu_usage_seconds_total``, ``container_memory_working_set_bytes``...,
  ``container_oom_events_total``), from its shim's Stats at scrape;
- prometheus_client's own ``process_*`` (ketchd's CPU, memory, fds) and ``python_*``.

Nothing here holds ketchd's event loop: the HTTP server is prometheus_client's WSGI app in
threads of its own; a scrape asks the loop for a snapshot of what the loop owns (the tasks, the
counters; the shims' answers are awaited there, not waited for), then reads the metadata store
and renders in its thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter,
                               Histogram, disable_created_metrics, make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from ketch import cgroups, config, errdefs
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.content import ContentStore
from ketch.events import Exchange
from ketch.gc import Collector
from ketch.runtime import Phase, Task, TaskManager

__all__ = ["PATHS", "Metrics", "Snapshot", "code_name", "families"]

log = logging.getLogger(__name__)

#: where the metrics are served; any other path is 404
PATHS = ("/v1/metrics", "/metrics")
#: how long a scrape waits for the event loop's snapshot, and the loop for each shim's answer
SNAPSHOT_TIMEOUT = 10.0
SHIM_TIMEOUT = 5.0
#: every task state (containerd's names, lower case), reported 0 in a namespace that has none in it
STATES: tuple[str, ...] = tuple(str(name).lower() for name in task_types.Status.keys())


def code_name(code: grpc.StatusCode) -> str:
    """A status code as go-grpc-prometheus labels it (Go's ``codes.Code.String()``: "OK",
    "NotFound", "DeadlineExceeded"...)."""
    return "OK" if code is grpc.StatusCode.OK else code.name.title().replace("_", "")


# -- the gRPC interceptor ---------------------------------------------------------------------


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and status code, and times it (until its last message)."""

    def __init__(self, handled: Counter, seconds: Histogram) -> None:
        self._handled = handled
        self._seconds = seconds
        self._series: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        #: method path → (the server's handler, the one that counts)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:  # no such method: grpc answers Unimplemented itself
            return None
        wrapped = self._wrapped.get(details.method)
        if wrapped is None or wrapped[0] is not handler:  # once per method (the servers' handlers are fixed)
            wrapped = self._wrapped[details.method] = (handler, self._wrap_handler(handler, str(details.method)))
        return wrapped[1]

    def _wrap_handler(self, handler: Any, path: str) -> Any:
        service, _, method = path.lstrip("/").rpartition("/")
        for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is None:
                continue
            streams = kind.endswith("_stream") and _is_async_gen(behaviour)
            wrap = self._wrap_stream if streams else self._wrap
            return handler._replace(**{kind: wrap(behaviour, service, method)})
        return handler

    def _done(self, service: str, method: str, started: float, context: Any, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, grpc.aio.AbortError):
            code = _code_of(context)
        elif isinstance(exc, asyncio.CancelledError):  # the client went away
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        key = (service, method, code)
        series = self._series.get(key)
        if series is None:  # labels() validates and locks: once per method and code
            series = self._series[key] = (self._handled.labels(service, method, code_name(code)),
                                          self._seconds.labels(service, method))
        series[0].inc()
        series[1].observe(time.monotonic() - started)

    def _wrap(self, behaviour: Callable[..., Awaitable[Any]], service: str, method: str) -> Callable[..., Any]:
        async def call(request: Any, context: Any) -> Any:
            started = time.monotonic()
            try:
                result = await behaviour(request, context)
            except BaseException as e:
                self._done(service, method, started, context, e)
                raise
            self._done(service, method, started, context, None)
            return result

        return call

    def _wrap_stream(self, behaviour: Callable[..., AsyncIterator[Any]], service: str,
                     method: str) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.monotonic()
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as e:
                self._done(service, method, started, context, e)
                raise
            self._done(service, method, started, context, None)

        return call


def _is_async_gen(fn: Any) -> bool:
    return inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(getattr(fn, "__wrapped__", None))


def _code_of(context: Any) -> grpc.StatusCode:
    """The code a call ended with: what the servicer set or aborted with, else OK."""
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # grpc.aio gives the number
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


# -- what a scrape reads of the event loop ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the event loop owns, copied on the loop for a scrape's thread."""

    #: (namespace, id, state) of every task; state as :data:`STATES` names it
    tasks: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    #: (namespace, id, cgroup metrics type URL, value) of every running or paused task
    stats: list[tuple[str, str, str, bytes]] = dataclasses.field(default_factory=list)
    shims: int = 0
    shim_groups: int = 0
    shims_lost: int = 0
    takeovers: int = 0
    buried: int = 0
    published: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    subscribers: int = 0
    gc_runs: dict[str, int] = dataclasses.field(default_factory=dict)
    gc_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    gc_removed: dict[str, int] = dataclasses.field(default_factory=dict)
    ingested: int = 0
    #: namespace → (blobs, bytes): read by the scrape's thread, not the loop
    content: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


async def _state(task: Task) -> str:
    try:
        async with asyncio.timeout(SHIM_TIMEOUT):
            status = (await task.state()).status
        return str(task_types.Status.Name(status)).lower()
    except (errdefs.KetchError, TimeoutError, ValueError):
        return "unknown"


async def _stats(task: Task) -> tuple[str, bytes] | None:
    try:
        async with asyncio.timeout(SHIM_TIMEOUT):
            data = await task.stats()
    except (errdefs.KetchError, TimeoutError):
        return None  # exited meanwhile, or its shim does not say
    return data.type_url, data.value


async def take(manager: TaskManager, exchange: Exchange, collector: Collector | None,
               content: ContentStore | None) -> Snapshot:
    """A :class:`Snapshot`, on the event loop: the counters as they are now, every task's state
    and every running task's cgroup metrics as its shim answers (all shims asked at once).
    ``collector`` and ``content`` are None until ketchd has loaded them (just after it serves)."""
    tasks = manager.all_tasks()
    shims = manager.shims()
    counted = Snapshot(  # the counters now: the shims' answers take a while
        shims=len(shims), shim_groups=sum(1 for g in shims if g.key is not None), shims_lost=manager.shims_lost,
        takeovers=manager.takeovers, buried=manager.buried, published=dict(exchange.published),
        dropped=dict(exchange.dropped), subscribers=exchange.subscribers,
        gc_runs=dict(collector.runs) if collector else {}, gc_seconds=dict(collector.seconds) if collector else {},
        gc_removed=dict(collector.removed) if collector else {}, ingested=content.ingested if content else 0)
    states = await asyncio.gather(*(_state(t) for t in tasks))
    live = [t for t, s in zip(tasks, states) if s in ("running", "paused") and t.phase is Phase.LIVE]
    stats = await asyncio.gather(*(_stats(t) for t in live))
    return dataclasses.replace(
        counted, tasks=[(t.namespace, t.id, s) for t, s in zip(tasks, states)],
        stats=[(t.namespace, t.id, *s) for t, s in zip(live, stats) if s is not None])


# -- metric families ----------------------------------------------------------------------------

#: cAdvisor's per-container families: (name, type, help, Usage field, scale)
_CADVISOR: tuple[tuple[str, str, str, str, float], ...] = (
    ("container_cpu_usage_seconds_total", "counter", "Cumulative cpu time consumed", "cpu_ns", 1e-9),
    ("container_cpu_user_seconds_total", "counter", "Cumulative user cpu time consumed", "cpu_user_ns", 1e-9),
    ("container_cpu_system_seconds_total", "counter", "Cumulative system cpu time consumed", "cpu_system_ns", 1e-9),
    ("container_memory_usage_bytes", "gauge",
     "Current memory usage, including all memory regardless of when it was accessed", "memory", 1),
    ("container_memory_max_usage_bytes", "gauge", "Maximum memory usage recorded (cgroup v1 only)", "memory_max", 1),
    ("container_memory_working_set_bytes", "gauge", "Current working set", "working_set", 1),
    ("container_memory_rss", "gauge", "Size of RSS", "rss", 1),
    ("container_memory_cache", "gauge", "Number of bytes of page cache memory", "cache", 1),
    ("container_memory_swap", "gauge", "Container swap usage", "swap", 1),
    ("container_spec_memory_limit_bytes", "gauge", "Memory limit for the container (0: none)", "memory_limit", 1),
    ("container_threads", "gauge", "Number of threads running inside the container", "threads", 1),
    ("container_threads_max", "gauge", "Maximum number of threads allowed inside the container (0: no limit)",
     "threads_limit", 1),
    ("container_oom_events_total", "counter", "Count of out of memory events observed for the container",
     "oom_kills", 1),
)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot (pure: no IO)."""
    tasks = GaugeMetricFamily("ketchd_tasks", "Tasks by the state of their init process", labels=["namespace", "state"])
    by_ns: dict[str, dict[str, int]] = {}
    for ns, _, state in snap.tasks:
        counts = by_ns.setdefault(ns, dict.fromkeys(STATES, 0))
        counts[state] = counts.get(state, 0) + 1
    for ns, counts in sorted(by_ns.items()):
        for state, n in counts.items():
            tasks.add_metric([ns, state], n)
    yield tasks
    yield GaugeMetricFamily("ketchd_shims", "Shim processes ketchd is connected to", value=snap.shims)
    yield GaugeMetricFamily("ketchd_shim_groups", "Shims that serve a group of tasks (shared, one per namespace "
                            "or pod)", value=snap.shim_groups)
    yield CounterMetricFamily("ketchd_shims_lost", "Shim connections that closed while serving tasks",
                              value=snap.shims_lost)
    yield CounterMetricFamily("ketchd_shim_takeovers", "Lost shims whose successor (the keeper's takeover, a "
                              "live upgrade) serves their tasks again", value=snap.takeovers)
    yield CounterMetricFamily("ketchd_tasks_buried", "Tasks whose shim was gone for good: cleaned up and "
                              "reported exited", value=snap.buried)
    yield _labelled(CounterMetricFamily("ketchd_events_published", "Events published or forwarded by shims",
                                        labels=["topic"]), snap.published)
    yield _labelled(CounterMetricFamily("ketchd_events_dropped", "Events not delivered: a duplicate a shim "
                                        "forwarded again, or one a subscriber fell too far behind for",
                                        labels=["reason"]), snap.dropped, ("duplicate", "subscriber_behind"))
    yield GaugeMetricFamily("ketchd_event_subscribers", "Event subscriptions", value=snap.subscribers)
    stored = GaugeMetricFamily("ketchd_content_stored_bytes", "Bytes of the blobs a namespace holds",
                               labels=["namespace"])
    blobs = GaugeMetricFamily("ketchd_content_blobs", "Blobs a namespace holds", labels=["namespace"])
    for ns, (count, size) in sorted(snap.content.items()):
        stored.add_metric([ns], size)
        blobs.add_metric([ns], count)
    yield stored
    yield blobs
    yield CounterMetricFamily("ketchd_content_ingested_bytes", "Bytes of the blobs committed into new files",
                              value=snap.ingested)
    gc = SummaryMetricFamily("ketchd_gc_duration_seconds", "Garbage collections (collect) and start-up "
                             "reclaims of what a crash left on disk (reclaim), and the time they took",
                             labels=["kind"])
    for kind in ("collect", "reclaim"):
        gc.add_metric([kind], snap.gc_runs.get(kind, 0), snap.gc_seconds.get(kind, 0.0))
    yield gc
    yield _labelled(CounterMetricFamily("ketchd_gc_removed", "What garbage collection removed, by resource",
                                        labels=["resource"]), snap.gc_removed)
    yield from _containers(snap.stats)


def _labelled(family: Any, values: dict[str, Any], always: Iterable[str] = ()) -> Any:
    for key in sorted(set(values) | set(always)):
        family.add_metric([key], values.get(key, 0))
    return family


def _containers(stats: list[tuple[str, str, str, bytes]]) -> Iterator[Metric]:
    made = {name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help, labels=["namespace", "id"])
            for name, kind, help, _, _ in _CADVISOR}
    for ns, id, type_url, value in stats:
        try:
            used = cgroups.usage(type_url, value)
        except (ValueError, DecodeError):
            continue
        for name, _, _, attr, scale in _CADVISOR:
            got = getattr(used, attr)
            if got is not None:  # what this cgroup version does not record
                made[name].add_metric([ns, id], got * scale)
    yield from made.values()


class _LoopCollector:
    """A prometheus_client collector that reads ketchd at scrape, in the scrape's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Coroutine[Any, Any, Snapshot]],
                 content: Callable[[], ContentStore | None]) -> None:
        self._loop = loop
        self._snapshot = snapshot
        self._content = content

    def collect(self) -> Iterator[Metric]:
        snap = asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop).result(SNAPSHOT_TIMEOUT)
        content = self._content()
        usage = content.usage() if content is not None else {}  # SQLite: here, not on the loop
        yield from families(dataclasses.replace(snap, content=usage))


# -- the HTTP server ------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a request a scrape interval is no news


def _only(paths: tuple[str, ...], app: Callable[..., Any]) -> Callable[..., Any]:
    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") in paths:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: ketchd's metrics are at {' and '.join(paths)}\n".encode()]

    return route


def listen(address: str, registry: CollectorRegistry) -> WSGIServer:
    """An HTTP server of ``registry`` bound to ``address`` (``host:port``), not serving yet;
    InvalidArgument for a host that does not resolve, FailedPrecondition when it cannot bind."""
    host, port = config.host_port(address, "metrics.address")
    try:
        family, *_, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise errdefs.InvalidArgument(f"metrics.address {address!r}: {e.strerror}") from None

    class Server(ThreadingWSGIServer):
        address_family = family

    try:
        return make_server(str(sockaddr[0]), port, _only(PATHS, make_wsgi_app(registry)), Server,
                           handler_class=_QuietHandler)
    except OSError as e:
        raise errdefs.FailedPrecondition(f"metrics.address {address!r}: cannot listen: {e.strerror}") from None


class Metrics:
    """ketchd's metrics: the registry, the gRPC interceptor (pass :attr:`interceptors` to the
    gRPC server), and the HTTP server (:meth:`serve`, :meth:`close`); the content store's and
    GC's once ketchd has loaded them (:meth:`attach`)."""

    def __init__(self, *, manager: TaskManager, exchange: Exchange) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no "_created" series: containerd has none
        self.registry = CollectorRegistry()
        handled = Counter("ketchd_grpc_server_handled", "gRPC calls completed, by method and status code",
                          ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry)
        seconds = Histogram("ketchd_grpc_server_handling_seconds", "How long gRPC calls took (until their last "
                            "message)", ["grpc_service", "grpc_method"], registry=self.registry)
        self.interceptors = [_Interceptor(handled, seconds)]
        self._collector: Collector | None = None
        self._content: ContentStore | None = None

        async def snapshot() -> Snapshot:
            return await take(manager, exchange, self._collector, self._content)

        self.registry.register(_LoopCollector(asyncio.get_running_loop(), snapshot, lambda: self._content))
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def serve(self, address: str) -> str:
        """Listen on ``address`` and serve in threads; the URL it serves at."""
        self._server = await asyncio.to_thread(listen, address, self.registry)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ketchd-metrics", daemon=True)
        self._thread.start()
        host, port = str(self._server.server_address[0]), self._server.server_address[1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{PATHS[0]}"
        log.info("serving metrics at %s", url)
        return url

    def attach(self, *, collector: Collector, content: ContentStore) -> None:
        """Count GC and the content store from now on."""
        self._collector, self._content = collector, content

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever's poll to end
            server.server_close()
