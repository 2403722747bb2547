"""The runtime v2 task manager: tasks live in shims; this keeps the map and the shims' lifecycle.

ketchd keeps nothing it cannot rebuild from disk. Every task has a bundle
(``bundle.py``); on start, :meth:`TaskManager.load` walks them, reconnects to each shim whose
address answers, and cleans up after each one that is gone. A shim that dies — while ketchd
runs or while it was down — is handled one way (:meth:`TaskManager._bury`): the shim binary's
``delete`` cleans up (runc delete --force, unmount), /tasks/exit is published with exit status
255 (the real status died with the shim), and the task stays as a STOPPED tombstone, recorded
in the bundle, until Tasks.Delete removes it and publishes /tasks/delete. So no client waits
forever, and ``ctr task rm`` works as after any exit.

Every shim call has a timeout (Wait excepted); a failed create leaves no bundle, shim or record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf import message as _message

from ketch import errdefs
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types import mount_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.runtime import shim as shims
from ketch.runtime.bundle import Bundle, walk
from ketch.runtime.shim import ShimClient, ShimParams

log = logging.getLogger(__name__)

#: exit status reported for a task whose shim died: the real one is unknown
UNKNOWN_EXIT = 255

Publish = Callable[[str, str, _message.Message], None]  # (namespace, topic, event)


@dataclass(eq=False)
class Task:
    namespace: str
    id: str
    runtime: str
    binary: str
    bundle: Bundle
    pid: int = 0
    shim: ShimClient | None = None
    log: shims.ShimLog | None = None
    #: set when the shim is gone: (pid, exit_status, exited_at)
    tombstone: tuple[int, int, float] | None = None
    buried: asyncio.Event = field(default_factory=asyncio.Event)
    deleting: bool = False

    def client(self) -> ShimClient:
        if self.shim is None or self.tombstone is not None:
            raise errdefs.NotFound(f"task {self.id}: its shim is gone; the task has exited")
        return self.shim


@dataclass
class CreateOptions:
    runtime: str
    spec: bytes
    #: runtime options as (type URL, marshalled message), or None
    options: tuple[str, bytes] | None = None
    rootfs: Iterable[mount_pb2.Mount] = ()
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    checkpoint: str = ""


class TaskManager:
    def __init__(
        self,
        *,
        state: str,
        root: str,
        params: ShimParams,
        publish: Publish,
        extra_dirs: list[str] | None = None,
        call_timeout: float = 30.0,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state
        self.root_dir = root
        self.params = params
        self.publish = publish
        self.extra_dirs = extra_dirs or []
        self.call_timeout = call_timeout
        #: runtime name asked for → runtime run instead (dockerd 20.10 can only ask for runc.v2)
        self.aliases = aliases or {}
        self._tasks: dict[tuple[str, str], Task] = {}
        self._pending: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()
        #: tasks whose shim was found dead by load(), until bury_dead() runs
        self._unburied: list[Task] = []

    # -- lookup ---------------------------------------------------------------------------

    def get(self, namespace: str, id: str) -> Task:
        task = self._tasks.get((namespace, id))
        if task is None:
            raise errdefs.NotFound(f"task {id} not found")
        return task

    def list(self, namespace: str) -> list[Task]:
        return [t for (ns, _), t in sorted(self._tasks.items()) if ns == namespace]

    def exists(self, namespace: str, id: str) -> bool:
        return (namespace, id) in self._tasks or (namespace, id) in self._pending

    # -- create / delete -------------------------------------------------------------------

    async def create(self, namespace: str, id: str, opts: CreateOptions) -> Task:
        key = (namespace, id)
        if self.exists(namespace, id):
            raise errdefs.AlreadyExists(f"task {id}")
        binary = shims.resolve(self.aliases.get(opts.runtime, opts.runtime), self.extra_dirs)
        bundle = Bundle.at(self.state_dir, self.root_dir, namespace, id)
        self._pending.add(key)
        task = Task(namespace, id, opts.runtime, binary, bundle)
        try:
            bundle.create(opts.spec, {"runtime": opts.runtime, "binary": binary})
            try:
                await self._start_shim(task, opts)
            except BaseException:
                await self._abandon(task)
                raise
            self._tasks[key] = task
        finally:
            self._pending.discard(key)
        log.info("task created namespace=%s id=%s pid=%d runtime=%s", namespace, id, task.pid, opts.runtime)
        return task

    async def _start_shim(self, task: Task, opts: CreateOptions) -> None:
        task.log = shims.ShimLog(str(task.bundle.path / "log"), task.namespace, task.id)
        options = any_pb2.Any()
        if opts.options is not None:
            options.type_url, options.value = opts.options
        address = await shims.start(task.binary, self.params, task.namespace, task.id, str(task.bundle.path),
                                    options.SerializeToString() if opts.options else b"")
        task.shim = await self._connect(task, address)
        req = shim_pb2.CreateTaskRequest(
            id=task.id, bundle=str(task.bundle.path), rootfs=list(opts.rootfs), terminal=opts.terminal,
            stdin=opts.stdin, stdout=opts.stdout, stderr=opts.stderr, checkpoint=opts.checkpoint)
        if opts.options is not None:
            req.options.CopyFrom(options)
        resp = await task.shim.call("Create", req, shim_pb2.CreateTaskResponse, timeout=max(self.call_timeout, 120))
        task.pid = resp.pid

    async def _connect(self, task: Task, address: str) -> ShimClient:
        return await ShimClient.connect(address, task.namespace, timeout=self.call_timeout,
                                        on_close=lambda: self._on_shim_close(task))

    async def _abandon(self, task: Task) -> None:
        """Undo a create that failed part-way: nothing of it may stay behind."""
        task.deleting = True
        if task.shim is not None and not task.shim.closed:
            with contextlib.suppress(errdefs.KetchError):
                await task.shim.call("Delete", shim_pb2.DeleteRequest(id=task.id), shim_pb2.DeleteResponse)
            with contextlib.suppress(errdefs.KetchError):
                await task.shim.call("Shutdown", shim_pb2.ShutdownRequest(id=task.id), empty_pb2.Empty)
            await task.shim.close()
        if task.bundle.path.exists():
            with contextlib.suppress(errdefs.KetchError, OSError):
                await shims.delete(task.binary, self.params, task.namespace, task.id, str(task.bundle.path))
        if task.log is not None:
            task.log.close()
        task.bundle.delete()

    async def delete(self, namespace: str, id: str) -> tuple[int, int, float]:
        """Delete the task's init process and its shim; (pid, exit status, exited at)."""
        task = self.get(namespace, id)
        if task.tombstone is not None:
            pid, status, exited_at = task.tombstone
            self._forget(task)
            self.publish(namespace, "/tasks/delete", events.TaskDelete(container_id=id, id=id, pid=pid, exit_status=status,
                                                      exited_at=_ts(exited_at)))
            return task.tombstone
        client = task.client()
        state = await client.call("State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse)
        if state.status in (task_types.RUNNING, task_types.PAUSED, task_types.PAUSING):
            name = task_types.Status.Name(state.status).lower()
            raise errdefs.FailedPrecondition(f"task {id} must be stopped before deletion: {name}")
        resp = await client.call("Delete", shim_pb2.DeleteRequest(id=id), shim_pb2.DeleteResponse)
        task.deleting = True
        try:
            await client.call("Shutdown", shim_pb2.ShutdownRequest(id=id), empty_pb2.Empty)
        except errdefs.KetchError as e:
            log.debug("shim shutdown for %s: %s", id, e)
        await client.close()
        self._forget(task)
        exited = resp.exited_at.seconds + resp.exited_at.nanos / 1e9
        return resp.pid, resp.exit_status, exited

    def _forget(self, task: Task) -> None:
        task.deleting = True
        self._tasks.pop((task.namespace, task.id), None)
        if task.log is not None:
            task.log.close()
        task.bundle.delete()

    # -- dead shims --------------------------------------------------------------------------

    def _on_shim_close(self, task: Task) -> None:
        if task.deleting or task.tombstone is not None:
            return
        if (task.namespace, task.id) not in self._tasks:
            return  # a create in progress: its own error path cleans up
        log.warning("shim of task %s/%s went away", task.namespace, task.id)
        t = asyncio.ensure_future(self._bury(task))
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _bury(self, task: Task, exit_status: int = UNKNOWN_EXIT) -> None:
        """The shim is gone: clean up after it, publish the exit, keep a STOPPED tombstone."""
        if task.tombstone is not None:
            return
        with contextlib.suppress(errdefs.KetchError, OSError):
            resp = await shims.delete(task.binary, self.params, task.namespace, task.id, str(task.bundle.path))
            task.pid = task.pid or resp.pid
        exited_at = time.time()
        task.tombstone = (task.pid, exit_status, exited_at)
        task.shim = None
        with contextlib.suppress(OSError):
            task.bundle.write_exit(task.pid, exit_status, exited_at)
        self.publish(task.namespace, "/tasks/exit", events.TaskExit(container_id=task.id, id=task.id, pid=task.pid,
                                                     exit_status=exit_status, exited_at=_ts(exited_at)))
        task.buried.set()

    # -- reload after a restart ---------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the task map from the bundles on disk (see the module doc)."""
        bundles = walk(self.state_dir, self.root_dir)
        await asyncio.gather(*(self._load_one(b) for b in bundles))

    async def _load_one(self, bundle: Bundle) -> None:
        info = bundle.info
        if not info:
            log.warning("bundle %s has no ketch.json; removing it", bundle.path)
            bundle.delete()
            return
        task = Task(bundle.namespace, bundle.id, info.get("runtime", ""), info.get("binary", ""), bundle)
        self._tasks[(bundle.namespace, bundle.id)] = task
        exited = bundle.read_exit()
        if exited is not None:
            task.pid = int(exited.get("pid", 0))
            task.tombstone = (task.pid, int(exited.get("exit_status", UNKNOWN_EXIT)),
                              float(exited.get("exited_at", 0.0)))
            task.buried.set()
            return
        with contextlib.suppress(OSError):
            task.log = shims.ShimLog(str(bundle.path / "log"), task.namespace, task.id)
        address = bundle.address()
        try:
            if not address:
                raise errdefs.Unavailable("no address")
            task.shim = await self._connect(task, address)
            resp = await task.shim.call("Connect", shim_pb2.ConnectRequest(id=task.id), shim_pb2.ConnectResponse)
            task.pid = resp.task_pid
            log.info("reconnected to task %s/%s pid=%d", task.namespace, task.id, task.pid)
        except errdefs.KetchError as e:
            log.warning("shim of task %s/%s is gone (%s): cleaning up", task.namespace, task.id, e)
            if task.shim is not None:
                task.deleting = True  # closing our side must not bury twice
                await task.shim.close()
                task.deleting = False
            with contextlib.suppress(ValueError, OSError):
                task.pid = int((bundle.path / "init.pid").read_text().strip())
            self._unburied.append(task)

    async def bury_dead(self, grace: float = 0.5) -> None:
        """Clean up after the shims :meth:`load` found dead. Run once the API is served, after
        ``grace``, so that clients reconnecting after the restart can subscribe in time to
        see the /tasks/exit of those tasks."""
        await asyncio.sleep(grace)
        tasks, self._unburied = self._unburied, []
        await asyncio.gather(*(self._bury(t) for t in tasks))

    async def close(self) -> None:
        """Disconnect from every shim (they keep running)."""
        for task in list(self._tasks.values()):
            task.deleting = True
            if task.shim is not None:
                await task.shim.close()
            if task.log is not None:
                task.log.close()
        for t in list(self._background):
            t.cancel()

    # -- calls on a task ------------------------------------------------------------------------

    async def state(self, task: Task, exec_id: str = "") -> task_types.Process:
        if task.tombstone is not None or task.shim is None:
            if exec_id:
                raise errdefs.NotFound(f"process {exec_id} of task {task.id}")
            if task.tombstone is None:  # its shim is gone and the cleanup is still to come
                return task_types.Process(container_id=task.id, id=task.id, pid=task.pid,
                                          status=task_types.UNKNOWN)
            pid, status, exited_at = task.tombstone
            return task_types.Process(container_id=task.id, id=task.id, pid=pid, status=task_types.STOPPED,
                                      exit_status=status, exited_at=_ts(exited_at))
        s = await task.client().call("State", shim_pb2.StateRequest(id=task.id, exec_id=exec_id),
                                     shim_pb2.StateResponse)
        return task_types.Process(
            container_id=task.id, id=s.exec_id or task.id, pid=s.pid, status=s.status, stdin=s.stdin,
            stdout=s.stdout, stderr=s.stderr, terminal=s.terminal, exit_status=s.exit_status,
            exited_at=s.exited_at)

    async def wait(self, task: Task, exec_id: str = "") -> tuple[int, float]:
        """Block until the process exits; (exit status, exited at). A shim that dies answers
        with the tombstone's status once it is buried."""
        if task.tombstone is None and task.shim is None:
            await task.buried.wait()
        if task.tombstone is None:
            try:
                resp = await task.client().call("Wait", shim_pb2.WaitRequest(id=task.id, exec_id=exec_id),
                                                shim_pb2.WaitResponse, timeout=None)
                return resp.exit_status, resp.exited_at.seconds + resp.exited_at.nanos / 1e9
            except errdefs.Unavailable:
                if exec_id or task.deleting:
                    raise
                await task.buried.wait()
        if exec_id:
            raise errdefs.NotFound(f"process {exec_id} of task {task.id}")
        assert task.tombstone is not None
        return task.tombstone[1], task.tombstone[2]

    async def call(self, task: Task, method: str, request: _message.Message, response_type: type[shims.M]) -> shims.M:
        """Any other Task method, straight through to the shim."""
        return await task.client().call(method, request, response_type)


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.seconds, ts.nanos = int(t), int((t - int(t)) * 1e9)
    return ts
