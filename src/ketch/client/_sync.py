"""The blocking client: the asyncio client run on a loop of its own, in a thread, behind
objects of the same shape. ``Process.wait()`` returns a ``concurrent.futures.Future`` (call it
before ``start()``; ``.result()`` blocks), as the asyncio one returns an asyncio task."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal as signals
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ketch.client._client import DEFAULT_RUNTIME, AsyncClient, TaskInfo, Version
from ketch.client._containers import Container as AsyncContainer
from ketch.client._events import Event
from ketch.client._images import Image, Progress
from ketch.client._containers import Mount
from ketch.client._io import IOSpec, ProcessIO
from ketch.client._metrics import Metrics
from ketch.client._process import ExecResult, ExitStatus, ProcessInfo, Status
from ketch.client._process import Process as AsyncProcess
from ketch.client._process import Task as AsyncTask

__all__ = ["Client", "Container", "Process", "Task"]

T = TypeVar("T")


class _Loop:
    """An event loop in a daemon thread; coroutines are run on it from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ketch-client", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _await(aw: Awaitable[T]) -> T:
    return await aw


class Process:
    """A process of a task (see the asyncio :class:`ketch.client.Process`)."""

    def __init__(self, loop: _Loop, process: AsyncProcess) -> None:
        self._loop = loop
        self._a = process

    @property
    def id(self) -> str:
        return self._a.id

    @property
    def container_id(self) -> str:
        return self._a.container_id

    @property
    def exec_id(self) -> str:
        return self._a.exec_id

    @property
    def pid(self) -> int:
        return self._a.pid

    @property
    def io(self) -> ProcessIO:
        return self._a.io

    def start(self) -> int:
        return self._loop.run(self._a.start())

    def wait(self) -> concurrent.futures.Future[ExitStatus]:
        return self._loop.submit(self._a._wait())

    def status(self) -> Status:
        return self._loop.run(self._a.status())

    def kill(self, signal: int = signals.SIGTERM, *, all: bool = False) -> None:
        self._loop.run(self._a.kill(signal, all=all))

    def close_stdin(self) -> None:
        self._loop.run(self._a.close_stdin())

    def resize(self, width: int, height: int) -> None:
        self._loop.run(self._a.resize(width, height))

    def wait_io(self, timeout: float | None = None) -> bool:
        return self._loop.run(self._a.io.wait(timeout))

    def delete(self, *, force: bool = False) -> ExitStatus:
        return self._loop.run(self._a.delete(force=force))


class Task(Process):
    """A container's task (see the asyncio :class:`ketch.client.Task`)."""

    _a: AsyncTask

    def __init__(self, loop: _Loop, task: AsyncTask) -> None:
        super().__init__(loop, task)

    def checkpoint(self, ref: str | None = None, *, exit: bool = False, rw: bool = True, options: Any = None) -> Image:
        return self._loop.run(self._a.checkpoint(ref, exit=exit, rw=rw, options=options))

    def pause(self) -> None:
        self._loop.run(self._a.pause())

    def resume(self) -> None:
        self._loop.run(self._a.resume())

    def pids(self) -> list[ProcessInfo]:
        return self._loop.run(self._a.pids())

    def metrics(self) -> Metrics:
        return self._loop.run(self._a.metrics())

    def update(self, resources: Mapping[str, Any] | None = None, *, memory: int | None = None,
               cpus: float | None = None, annotations: Mapping[str, str] | None = None) -> None:
        self._loop.run(self._a.update(resources, memory=memory, cpus=cpus, annotations=annotations))

    def exec(self, exec_id: str, args: Sequence[str], *, io: IOSpec = None, env: Sequence[str] | None = None,
             cwd: str | None = None, user: tuple[int, int] | None = None, terminal: bool | None = None) -> Process:
        return Process(self._loop, self._loop.run(self._a.exec(exec_id, args, io=io, env=env, cwd=cwd, user=user,
                                                                terminal=terminal)))

    def exec_sync(self, args: Sequence[str], timeout: float | None = None, *, stdin: bytes | None = None,
                  env: Sequence[str] | None = None, cwd: str | None = None, max_output: int | None = None) -> ExecResult:
        kw: dict[str, Any] = {} if max_output is None else {"max_output": max_output}
        return self._loop.run(self._a.exec_sync(args, timeout, stdin=stdin, env=env, cwd=cwd, **kw))

    def stop(self, timeout: float = 10.0, *, signal: int = signals.SIGTERM) -> ExitStatus:
        return self._loop.run(self._a.stop(timeout, signal=signal))


class Container:
    """A container (see the asyncio :class:`ketch.client.Container`)."""

    def __init__(self, loop: _Loop, container: AsyncContainer) -> None:
        self._loop = loop
        self._a = container

    def __getattr__(self, name: str) -> Any:
        # the plain fields: id, labels, image, runtime, spec, snapshotter, snapshot_key, created_at
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._a, name)

    def new_task(self, io: IOSpec = None, *, options: Any = None, checkpoint: str | None = None) -> Task:
        return Task(self._loop, self._loop.run(self._a.new_task(io, options=options, checkpoint=checkpoint)))

    def checkpoint(self, ref: str, *, task: bool = True, rw: bool = False, exit: bool = False, runtime: bool = True,
                   image: bool = True, options: Any = None) -> Image:
        return self._loop.run(self._a.checkpoint(ref, task=task, rw=rw, exit=exit, runtime=runtime, image=image,
                                                 options=options))

    def task(self, io: IOSpec = None) -> Task:
        return Task(self._loop, self._loop.run(self._a.task(io)))

    def update_labels(self, labels: Mapping[str, str | None]) -> dict[str, str]:
        return self._loop.run(self._a.update_labels(labels))

    def delete(self, *, snapshot: bool = True) -> None:
        self._loop.run(self._a.delete(snapshot=snapshot))


class Client:
    """The blocking client: ``Client(address=None, namespace=None)`` as :class:`AsyncClient`.
    Use ``with``, or :meth:`close`."""

    def __init__(self, address: str | None = None, namespace: str | None = None, *,
                 fifo_dir: str | None = None) -> None:
        self._loop = _Loop()

        async def make() -> AsyncClient:
            return AsyncClient(address, namespace, fifo_dir=fifo_dir)

        try:
            self._a = self._loop.run(make())
        except BaseException:
            self._loop.close()
            raise

    @property
    def address(self) -> str:
        return self._a.address

    @property
    def namespace(self) -> str:
        return self._a.namespace

    @property
    def aio(self) -> AsyncClient:
        """The asyncio client underneath (its loop runs in this client's thread)."""
        return self._a

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.run(self._a.close())
            self._loop.close()

    def version(self) -> Version:
        return self._loop.run(self._a.version())

    def server_uuid(self) -> str:
        return self._loop.run(self._a.server_uuid())

    def plugins(self, *filters: str) -> list[dict[str, Any]]:
        return self._loop.run(self._a.plugins(*filters))

    def namespaces(self) -> list[str]:
        return self._loop.run(self._a.namespaces())

    def delete_namespace(self, name: str) -> None:
        self._loop.run(self._a.delete_namespace(name))

    def create_container(
        self, id: str, *, rootfs: str | None = None, image: str | None = None, args: Sequence[str] = (),
        env: Sequence[str] | Mapping[str, str] = (), cwd: str | None = None, user: str | tuple[int, int] | None = None,
        mounts: Sequence[Mount] = (), memory: int | None = None, cpus: float | None = None, terminal: bool = False,
        hostname: str | None = None, readonly: bool = False, labels: Mapping[str, str] | None = None,
        runtime: str = DEFAULT_RUNTIME, runtime_options: Any = None, snapshotter: str = "overlayfs",
        spec: Mapping[str, Any] | None = None,
    ) -> Container:
        return Container(self._loop, self._loop.run(self._a.create_container(
            id, rootfs=rootfs, image=image, args=args, env=env, cwd=cwd, user=user, mounts=mounts, memory=memory,
            cpus=cpus, terminal=terminal, hostname=hostname, readonly=readonly, labels=labels, runtime=runtime,
            runtime_options=runtime_options, snapshotter=snapshotter, spec=spec)))

    def container(self, id: str) -> Container:
        return Container(self._loop, self._loop.run(self._a.container(id)))

    def containers(self, *filters: str) -> list[Container]:
        return [Container(self._loop, c) for c in self._loop.run(self._a.containers(*filters))]

    def restore(self, id: str, ref: str, *, live: bool = True, rw: bool = True, io: IOSpec = None,
                labels: Mapping[str, str] | None = None) -> Task:
        return Task(self._loop, self._loop.run(self._a.restore(id, ref, live=live, rw=rw, io=io, labels=labels)))

    def tasks(self) -> list[TaskInfo]:
        return self._loop.run(self._a.tasks())

    def images(self, *filters: str) -> list[Image]:
        return self._loop.run(self._a.images(*filters))

    def image(self, name: str) -> Image:
        return self._loop.run(self._a.image(name))

    def image_size(self, image: Image) -> int:
        return self._loop.run(self._a.image_size(image))

    def pull(self, ref: str, *, plain_http: bool | None = None, unpack: bool = True, snapshotter: str = "overlayfs",
             progress: Progress | None = None) -> Image:
        return self._loop.run(self._a.pull(ref, plain_http=plain_http, unpack=unpack, snapshotter=snapshotter,
                                           progress=progress))

    def import_image(self, path: str, *, name: str | None = None, unpack: bool = True,
                     snapshotter: str = "overlayfs", progress: Progress | None = None) -> list[Image]:
        return self._loop.run(self._a.import_image(path, name=name, unpack=unpack, snapshotter=snapshotter,
                                                   progress=progress))

    def export_images(self, path: str, *names: str) -> None:
        self._loop.run(self._a.export_images(path, *names))

    def remove_image(self, name: str) -> None:
        self._loop.run(self._a.remove_image(name))

    def tag_image(self, source: str, target: str, *, force: bool = False) -> Image:
        return self._loop.run(self._a.tag_image(source, target, force=force))

    def events(self, *filters: str, reconnect: bool = True) -> Iterator[Event]:
        """As :meth:`AsyncClient.events`, a blocking iterator (close it, or break out, to end
        the subscription)."""

        async def make() -> AsyncIterator[Event]:
            return self._a.events(*filters, reconnect=reconnect)

        return self._iterate(self._loop.run(make()))

    def _iterate(self, it: Any) -> Iterator[Any]:
        """A sync iterator over an async one, run on the loop."""
        try:
            while True:
                try:
                    yield self._loop.run(_await(it.__anext__()))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(_await(it.aclose()))
