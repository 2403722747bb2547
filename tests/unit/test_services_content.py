"""The Content servicer in-process (grpc.aio) over a real ContentStore: what waits on the disk
or on a running garbage collection sweep never holds the event loop.

The loop's health is measured, not assumed: a ticker on the same loop (which also runs the
servicer) records the longest gap between its ticks while the calls run."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ketch.api.containerd.services.content.v1 import content_pb2 as capi
from ketch.api.containerd.services.content.v1 import content_pb2_grpc
from ketch.content import ContentStore
from ketch.gc import Collector
from ketch.metadata import Store
from ketch.services.content import Content
from ketch.testing.channel import channel_for

NS = [("containerd-namespace", "default")]
#: how long the disk or the sweep makes a call wait, and the longest loop gap allowed meanwhile
HOLD, GAP = 1.0, 0.5


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, ContentStore]]:
    with Store(tmp_path / "meta.db") as store:
        yield store, ContentStore(tmp_path / "content", store)


class Ticker:
    """The longest gap between ticks of a coroutine sleeping 5 ms at a time."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _requests(*reqs: capi.WriteContentRequest) -> AsyncIterator[capi.WriteContentRequest]:
    for r in reqs:
        yield r


def _serve(content: ContentStore, store: Store) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        content_pb2_grpc.add_ContentServicer_to_server(
            Content(content, Collector(store, content, {})), server)

    return register


def test_abort_waits_for_a_running_sweep_without_holding_the_loop(
        stores: tuple[Store, ContentStore], monkeypatch: pytest.MonkeyPatch) -> None:
    store, content = stores
    writer = content.writer("default", "ref-1", 5)
    writer.write(b"hello")
    writer.close()
    # a sweep that takes HOLD seconds while it holds the content store's GC lock exclusively
    referenced = store.content.referenced

    def slow_referenced() -> Any:
        time.sleep(HOLD)
        return referenced()

    monkeypatch.setattr(store.content, "referenced", slow_referenced)

    async def main() -> None:
        async with asyncio.timeout(20), channel_for(_serve(content, store)) as ch:
            stub: Any = content_pb2_grpc.ContentStub(ch)
            sweep = threading.Thread(target=content.sweep)
            async with Ticker() as ticker:
                sweep.start()
                await asyncio.sleep(0.05)  # the sweep holds the lock now
                started = time.monotonic()
                await stub.Abort(capi.AbortRequest(ref="ref-1"), metadata=NS)
                waited = time.monotonic() - started
            sweep.join()
        assert waited > HOLD / 2, "Abort waits for the sweep"
        assert ticker.longest < GAP, f"the loop was held {ticker.longest:.3f}s"

    asyncio.run(main())
    assert content.list_statuses("default") == []


def test_a_write_closed_or_committed_on_a_slow_disk_does_not_hold_the_loop(
        stores: tuple[Store, ContentStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fsync takes HOLD/2 seconds (a slow disk): a Write stream that ends without a
    commit (its progress is fsynced on close) and one that commits keep the loop free."""
    store, content = stores
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(HOLD / 2)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    data = b"some layer"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def main() -> None:
        async with asyncio.timeout(30), channel_for(_serve(content, store)) as ch:
            stub: Any = content_pb2_grpc.ContentStub(ch)
            async with Ticker() as ticker:
                # left for later: the stream ends, the writer is closed (and fsynced)
                async for _ in stub.Write(_requests(
                        capi.WriteContentRequest(action=capi.WRITE, ref="later", data=data[:4])), metadata=NS):
                    pass
                async for _ in stub.Write(_requests(
                        capi.WriteContentRequest(action=capi.WRITE, ref="now", data=data, total=len(data)),
                        capi.WriteContentRequest(action=capi.COMMIT, ref="now", total=len(data), expected=digest)),
                        metadata=NS):
                    pass
                # the ref is free again once the closing stream's writer is closed
                status = await stub.Status(capi.StatusRequest(ref="later"), metadata=NS)
        assert status.status.offset == 4
        assert ticker.longest < GAP, f"the loop was held {ticker.longest:.3f}s"

    asyncio.run(main())
    assert content.info("default", digest).size == len(data)
