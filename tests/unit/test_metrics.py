"""ketchd's metrics (ketch.metrics): the gRPC interceptor on a real grpc.aio server, the metric
families of a snapshot as Prometheus' own parser reads them, the HTTP endpoint, and a scrape's
thread getting what the event loop owns from the loop. A real ketchd is scraped in
tests/interop/test_metrics.py."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ketch import errdefs
from ketch.cgroups import Cgroup
from ketch.metrics import PATHS, STATES, Snapshot, _Interceptor, _LoopCollector, code_name, families, listen
from ketch.services._common import stream, unary

from .test_cgroups import DATA, V2_PROC

SERVICE = "test.v1.Things"


class Things:
    """A servicer written as ketch's are (errors through ketch.services._common)."""

    @unary
    async def Get(self, request: bytes, context: Any) -> bytes:
        if request == b"missing":
            raise errdefs.NotFound("thing missing")
        if request == b"bug":
            raise RuntimeError("a bug")
        return b"thing"

    @stream
    async def List(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        if request == b"bad":
            raise errdefs.InvalidArgument("bad filter")
        yield b"two"

    @stream
    async def Watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(3600)
        yield b"never"


def _parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families_: dict[str, Any], name: str, **labels: str) -> float | None:
    for family in families_.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_code_names_are_go_grpc_prometheus_ones() -> None:
    assert [code_name(c) for c in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.UNKNOWN)] == ["OK", "NotFound", "DeadlineExceeded", "Unknown"]


def test_the_interceptor_counts_calls_by_method_and_code_and_times_them(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    handled = Counter("h", "", ["grpc_service", "grpc_method", "grpc_code"], registry=registry)
    seconds = Histogram("s", "", ["grpc_service", "grpc_method"], registry=registry)
    address = f"unix://{tmp_path}/g.sock"

    async def body() -> None:
        server = grpc.aio.server(interceptors=[_Interceptor(handled, seconds)])
        things = Things()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Get": grpc.unary_unary_rpc_method_handler(things.Get),
            "List": grpc.unary_stream_rpc_method_handler(things.List),
            "Watch": grpc.unary_stream_rpc_method_handler(things.Watch),
        })])
        server.add_insecure_port(address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                get = channel.unary_unary(f"/{SERVICE}/Get")
                assert await get(b"x") == b"thing"
                assert await get(b"y") == b"thing"
                for request, code in ((b"missing", grpc.StatusCode.NOT_FOUND), (b"bug", grpc.StatusCode.UNKNOWN)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await get(request)
                    assert info.value.code() == code
                list_ = channel.unary_stream(f"/{SERVICE}/List")
                assert [m async for m in list_(b"all")] == [b"one", b"two"]
                with pytest.raises(grpc.aio.AioRpcError):
                    [m async for m in list_(b"bad")]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/{SERVICE}/Nope")(b"")
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                watch = channel.unary_stream(f"/{SERVICE}/Watch")(b"")
                assert await watch.read() == b"first"
                watch.cancel()  # the client goes away mid-stream
                async with asyncio.timeout(10):
                    while handled.labels(SERVICE, "Watch", "Cancelled")._value.get() == 0:
                        await asyncio.sleep(0.01)
        finally:
            await server.stop(None)

    asyncio.run(body())
    got = _parse(generate_latest(registry).decode())

    def count(method: str, code: str) -> float | None:
        return _sample(got, "h_total", grpc_service=SERVICE, grpc_method=method, grpc_code=code)

    assert (count("Get", "OK"), count("Get", "NotFound"), count("Get", "Unknown")) == (2, 1, 1)
    assert (count("List", "OK"), count("List", "InvalidArgument")) == (1, 1)
    assert (count("Watch", "Cancelled"), count("Watch", "OK"), count("Watch", "Unknown")) == (1, None, None)
    assert _sample(got, "s_count", grpc_service=SERVICE, grpc_method="Get") == 4
    assert _sample(got, "s_count", grpc_service=SERVICE, grpc_method="List") == 2
    assert not [s for f in got.values() for s in f.samples if s.labels.get("grpc_method") == "Nope"], \
        "a method nobody serves makes no series"


def _v2_stats() -> tuple[str, bytes]:
    return Cgroup.parse(V2_PROC, str(DATA / "cgroup2")).metrics()


def test_families_of_a_snapshot_parse_as_prometheus_reads_them() -> None:
    snap = Snapshot(
        tasks=[("a", "web", "running"), ("a", "job", "stopped"), ("b", "db", "running")],
        stats=[("a", "web", *_v2_stats()), ("b", "db", "types.containerd.io/not-metrics", b"")],
        shims=2, shim_groups=1, shims_lost=3, takeovers=2, buried=1, published={"/tasks/exit": 4},
        dropped={"duplicate": 1}, subscribers=5, gc_runs={"collect": 2}, gc_seconds={"collect": 0.5},
        gc_removed={"blobs": 7}, ingested=1024, content={"a": (3, 4096)})
    registry = CollectorRegistry()
    registry.register(type("C", (), {"collect": lambda self: families(snap)})())
    got = _parse(generate_latest(registry).decode())
    # every state is there, 0 when no task is in it, per namespace that has tasks
    assert _sample(got, "ketchd_tasks", namespace="a", state="running") == 1
    assert _sample(got, "ketchd_tasks", namespace="a", state="stopped") == 1
    assert _sample(got, "ketchd_tasks", namespace="a", state="paused") == 0
    assert _sample(got, "ketchd_tasks", namespace="b", state="running") == 1
    assert {s.labels["state"] for s in got["ketchd_tasks"].samples} == set(STATES)
    assert (_sample(got, "ketchd_shims"), _sample(got, "ketchd_shim_groups")) == (2, 1)
    assert (_sample(got, "ketchd_shims_lost_total"), _sample(got, "ketchd_shim_takeovers_total"),
            _sample(got, "ketchd_tasks_buried_total")) == (3, 2, 1)
    assert _sample(got, "ketchd_events_published_total", topic="/tasks/exit") == 4
    assert _sample(got, "ketchd_events_dropped_total", reason="duplicate") == 1
    assert _sample(got, "ketchd_events_dropped_total", reason="subscriber_behind") == 0
    assert _sample(got, "ketchd_event_subscribers") == 5
    assert _sample(got, "ketchd_content_stored_bytes", namespace="a") == 4096
    assert _sample(got, "ketchd_content_blobs", namespace="a") == 3
    assert _sample(got, "ketchd_content_ingested_bytes_total") == 1024
    assert _sample(got, "ketchd_gc_duration_seconds_count", kind="collect") == 2
    assert _sample(got, "ketchd_gc_duration_seconds_sum", kind="collect") == 0.5
    assert _sample(got, "ketchd_gc_duration_seconds_count", kind="reclaim") == 0
    assert _sample(got, "ketchd_gc_removed_total", resource="blobs") == 7
    # cAdvisor's families for the container whose stats decode; none for the other
    web = {"namespace": "a", "id": "web"}
    assert _sample(got, "container_cpu_usage_seconds_total", **web) == pytest.approx(1.873401)
    assert _sample(got, "container_memory_usage_bytes", **web) == 36261888
    assert _sample(got, "container_memory_working_set_bytes", **web) == 36261888 - 1830912
    assert _sample(got, "container_spec_memory_limit_bytes", **web) == 64 << 20
    assert _sample(got, "container_threads", **web) == 2
    assert _sample(got, "container_oom_events_total", **web) == 1
    assert _sample(got, "container_memory_max_usage_bytes", **web) is None  # v2 has no such record
    assert got["container_cpu_usage_seconds"].type == "counter" and got["container_threads"].type == "gauge"
    assert not [s for f in got.values() for s in f.samples if s.labels.get("id") == "db"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[str]:
    registry = CollectorRegistry()
    Counter("things", "things counted", registry=registry).inc(3)
    port = _free_port()
    server = listen(f"127.0.0.1:{port}", registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_endpoint_serves_the_text_format_at_containerds_path_and_at_metrics(served: str) -> None:
    for path in PATHS:
        with urllib.request.urlopen(served + path, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            assert _sample(_parse(r.read().decode()), "things_total") == 3
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(served + "/debug", timeout=10)
    info.value.close()
    assert info.value.code == 404


def test_an_address_in_use_or_unknown_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(errdefs.FailedPrecondition, match=f"metrics.address '127.0.0.1:{port}': cannot listen"):
            listen(f"127.0.0.1:{port}", CollectorRegistry())
    with pytest.raises(errdefs.InvalidArgument, match="metrics.address 'no-such-host.invalid:1338'"):
        listen("no-such-host.invalid:1338", CollectorRegistry())


def test_a_scrape_takes_the_snapshot_on_the_event_loop_and_reads_the_store_in_its_thread() -> None:
    """The loop owns the tasks and counters: a scrape's thread gets them from a coroutine run
    on the loop (which goes on serving meanwhile), and reads SQLite itself, off the loop."""
    loop_thread: list[int] = []
    store_thread: list[int] = []

    class Content:
        def usage(self) -> dict[str, tuple[int, int]]:
            store_thread.append(threading.get_ident())
            return {"ns": (1, 10)}

    async def snapshot() -> Snapshot:
        loop_thread.append(threading.get_ident())
        await asyncio.sleep(0.05)  # a shim answering: the loop serves others meanwhile
        return Snapshot(tasks=[("ns", "t", "running")])

    async def body() -> str:
        collector = _LoopCollector(asyncio.get_running_loop(), snapshot, Content)  # type: ignore[arg-type]
        registry = CollectorRegistry()
        registry.register(collector)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.ensure_future(tick())
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        ticker.cancel()
        assert ticks >= 3, "the loop was held while the scrape waited"
        return text

    main = threading.get_ident()
    got = _parse(asyncio.run(body()))
    assert loop_thread == [main] and store_thread and store_thread[0] != main
    assert _sample(got, "ketchd_tasks", namespace="ns", state="running") == 1
    assert _sample(got, "ketchd_content_stored_bytes", namespace="ns") == 10
