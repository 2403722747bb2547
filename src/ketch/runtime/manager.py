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
import builtins
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf import message as _message

from ketch import errdefs
from ketch.topics import Publish
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types import mount_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.runtime import shim as shims
from ketch.files import write_atomic
from ketch.runtime.bundle import Bundle, walk
from ketch.runtime.shim import ShimClient, ShimParams

log = logging.getLogger(__name__)

#: exit status reported for a task whose shim died: the real one is unknown
UNKNOWN_EXIT = 255



@dataclass(eq=False)
class ShimGroup:
    """One connection to one shim process, and the tasks it serves. A shared group (``key``
    set) outlives its tasks for a while so that its next task needs no new process."""

    address: str
    key: tuple[str, str] | None = None  # (namespace, shim binary) when shared
    client: ShimClient | None = None
    tasks: dict[str, Task] = field(default_factory=dict)


@dataclass(eq=False)
class Task:
    namespace: str
    id: str
    runtime: str
    binary: str
    bundle: Bundle
    pid: int = 0
    group: ShimGroup | None = None
    log: shims.ShimLog | None = None
    #: set when the shim is gone: (pid, exit_status, exited_at)
    tombstone: tuple[int, int, float] | None = None
    buried: asyncio.Event = field(default_factory=asyncio.Event)
    deleting: bool = False

    @property
    def shim(self) -> ShimClient | None:
        return self.group.client if self.group is not None else None

    def client(self) -> ShimClient:
        shim = self.shim
        if shim is None or self.tombstone is not None:
            raise errdefs.NotFound(f"task {self.id}: its shim is gone; the task has exited")
        return shim


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
        grouping: bool = True,
    ) -> None:
        self.state_dir = state
        self.root_dir = root
        self.params = params
        self.publish = publish
        self.extra_dirs = extra_dirs or []
        self.call_timeout = call_timeout
        #: runtime name asked for → runtime run instead (dockerd 20.10 can only ask for runc.v2)
        self.aliases = aliases or {}
        #: tasks of one namespace share one ketch shim process (see ShimGroup)
        self.grouping = grouping
        self._groups: dict[tuple[str, str], ShimGroup] = {}
        self._group_locks: dict[tuple[str, str], asyncio.Lock] = {}
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
        req = shim_pb2.CreateTaskRequest(
            id=task.id, bundle=str(task.bundle.path), rootfs=list(opts.rootfs), terminal=opts.terminal,
            stdin=opts.stdin, stdout=opts.stdout, stderr=opts.stderr, checkpoint=opts.checkpoint)
        if opts.options is not None:
            req.options.CopyFrom(options)
        start_options = options.SerializeToString() if opts.options else b""
        for attempt in (1, 2):
            reused = await self._join_group(task, start_options)
            try:
                resp = await task.client().call("Create", req, shim_pb2.CreateTaskResponse,
                                                timeout=max(self.call_timeout, 120))
            except errdefs.Unavailable:
                if not reused or attempt == 2:
                    raise
                # the shared shim was just deciding to exit: start a fresh one
                self._leave_group(task)
                continue
            task.pid = resp.pid
            return

    def _shares(self, task: Task) -> bool:
        return self.grouping and os.path.basename(task.binary) == shims.KETCH_SHIM

    async def _join_group(self, task: Task, start_options: bytes) -> bool:
        """Attach ``task`` to a shim: its namespace's live shared ketch shim if there is one
        (True), else a shim started for it. The bundle's ``address`` records which."""
        if not self._shares(task):
            address = await shims.start(task.binary, self.params, task.namespace, task.id,
                                        str(task.bundle.path), start_options)
            self._attach(task, await self._connect_group(address, task.namespace, None))
            return False
        key = (task.namespace, task.binary)
        async with self._group_locks.setdefault(key, asyncio.Lock()):
            group = self._groups.get(key)
            reused = group is not None and group.client is not None and not group.client.closed
            if not reused:
                address = await shims.start(task.binary, self.params, task.namespace, task.id, str(task.bundle.path),
                                            start_options, group=f"ketchd-{task.namespace}")
                group = await self._connect_group(address, task.namespace, key)
                self._groups[key] = group
            assert group is not None
            if reused:
                write_atomic(task.bundle.path / "address", group.address.encode(), durable=False)
            self._attach(task, group)
        return reused

    def _attach(self, task: Task, group: ShimGroup) -> None:
        task.group = group
        group.tasks[task.id] = task

    def _leave_group(self, task: Task) -> None:
        group, task.group = task.group, None
        if group is not None:
            group.tasks.pop(task.id, None)
            if group.key is not None and self._groups.get(group.key) is group:
                del self._groups[group.key]

    async def _connect_group(self, address: str, namespace: str, key: tuple[str, str] | None) -> ShimGroup:
        group = ShimGroup(address, key)
        group.client = await ShimClient.connect(address, namespace, timeout=self.call_timeout,
                                                on_close=lambda: self._on_shim_close(group))
        return group

    async def _abandon(self, task: Task) -> None:
        """Undo a create that failed part-way: nothing of it may stay behind."""
        task.deleting = True
        shim = task.shim
        if shim is not None and not shim.closed:
            with contextlib.suppress(errdefs.KetchError):
                await shim.call("Delete", shim_pb2.DeleteRequest(id=task.id), shim_pb2.DeleteResponse)
            with contextlib.suppress(errdefs.KetchError):
                await shim.call("Shutdown", shim_pb2.ShutdownRequest(id=task.id), empty_pb2.Empty)
        await self._release(task)
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
            self.publish(namespace, events.TaskDelete(container_id=id, id=id, pid=pid, exit_status=status,
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
        await self._release(task)
        self._forget(task)
        exited = resp.exited_at.seconds + resp.exited_at.nanos / 1e9
        return resp.pid, resp.exit_status, exited

    async def _release(self, task: Task) -> None:
        """Detach ``task`` from its shim; close the connection unless a shared shim keeps it."""
        group = task.group
        if group is None:
            return
        group.tasks.pop(task.id, None)
        if group.key is None and group.client is not None:
            await group.client.close()

    def _forget(self, task: Task) -> None:
        task.deleting = True
        self._tasks.pop((task.namespace, task.id), None)
        if task.log is not None:
            task.log.close()
        task.bundle.delete()

    # -- dead shims --------------------------------------------------------------------------

    def _on_shim_close(self, group: ShimGroup) -> None:
        """A shim's connection closed: bury every task it still served (none, when it was
        shut down on purpose)."""
        if group.key is not None and self._groups.get(group.key) is group:
            del self._groups[group.key]
        for task in list(group.tasks.values()):
            if task.deleting or task.tombstone is not None:
                continue
            if (task.namespace, task.id) not in self._tasks:
                continue  # a create in progress: its own error path cleans up
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
        if task.group is not None:
            task.group.tasks.pop(task.id, None)
            task.group = None
        with contextlib.suppress(OSError):
            task.bundle.write_exit(task.pid, exit_status, exited_at)
        self.publish(task.namespace, events.TaskExit(container_id=task.id, id=task.id, pid=task.pid,
                                                     exit_status=exit_status, exited_at=_ts(exited_at)))
        task.buried.set()

    # -- reload after a restart ---------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the task map from the bundles on disk (see the module doc): one connection
        per shim address, shared by the tasks that shim serves."""
        by_address: dict[str, builtins.list[Task]] = {}
        for bundle in walk(self.state_dir, self.root_dir):
            task = self._load_task(bundle)
            if task is not None:
                by_address.setdefault(bundle.address(), []).append(task)
        await asyncio.gather(*(self._reconnect(address, tasks) for address, tasks in by_address.items()))
        await self._dismiss_idle_shims(set(by_address))

    async def _dismiss_idle_shims(self, known: set[str]) -> None:
        """A shared shim that was idle when ketchd died has no bundle to be found by: ask every
        other shim socket in our directory to exit if it serves nothing."""
        directory = os.path.join(os.path.dirname(self.params.grpc_address), "s")
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            address = "unix://" + os.path.join(directory, name)
            if address in known:
                continue
            try:
                client = await ShimClient.connect(address, "", timeout=1.0)
            except errdefs.KetchError:
                continue
            try:
                await client.call("Shutdown", shim_pb2.ShutdownRequest(), empty_pb2.Empty, timeout=1.0)
                log.info("asked the idle shim at %s to exit", address)
            except errdefs.KetchError:
                pass
            finally:
                await client.close()

    def _load_task(self, bundle: Bundle) -> Task | None:
        info = bundle.info
        if not info:
            log.warning("bundle %s has no ketch.json; removing it", bundle.path)
            bundle.delete()
            return None
        task = Task(bundle.namespace, bundle.id, info.get("runtime", ""), info.get("binary", ""), bundle)
        self._tasks[(bundle.namespace, bundle.id)] = task
        exited = bundle.read_exit()
        if exited is not None:
            task.pid = int(exited.get("pid", 0))
            task.tombstone = (task.pid, int(exited.get("exit_status", UNKNOWN_EXIT)),
                              float(exited.get("exited_at", 0.0)))
            task.buried.set()
            return None
        with contextlib.suppress(OSError):
            task.log = shims.ShimLog(str(bundle.path / "log"), task.namespace, task.id)
        return task

    async def _reconnect(self, address: str, tasks: builtins.list[Task]) -> None:
        first = tasks[0]
        key = (first.namespace, first.binary) if self._shares(first) else None
        if key is not None and key in self._groups:
            key = None  # only one shared shim per namespace: the others serve out their tasks
        group: ShimGroup | None = None
        try:
            if not address:
                raise errdefs.Unavailable("no address")
            group = await self._connect_group(address, first.namespace, key)
            for task in tasks:
                self._attach(task, group)
                resp = await task.client().call("Connect", shim_pb2.ConnectRequest(id=task.id),
                                                shim_pb2.ConnectResponse)
                task.pid = resp.task_pid
                log.info("reconnected to task %s/%s pid=%d", task.namespace, task.id, task.pid)
            if key is not None:
                self._groups[key] = group
        except errdefs.KetchError as e:
            log.warning("shim at %s is gone (%s): cleaning up after its tasks", address or "?", e)
            if group is not None and group.client is not None:
                group.tasks.clear()  # closing our side must not bury twice
                await group.client.close()
            for task in tasks:
                task.group = None
                with contextlib.suppress(ValueError, OSError):
                    task.pid = int((task.bundle.path / "init.pid").read_text().strip())
                self._unburied.append(task)

    async def bury_dead(self, grace: float = 0.5) -> None:
        """Clean up after the shims :meth:`load` found dead. Run once the API is served, after
        ``grace``, so that clients reconnecting after the restart can subscribe in time to
        see the /tasks/exit of those tasks."""
        await asyncio.sleep(grace)
        tasks, self._unburied = self._unburied, []
        await asyncio.gather(*(self._bury(t) for t in tasks))

    async def close(self) -> None:
        """Disconnect from every shim; they keep running, except shared shims with no task
        left, which are told to exit now rather than linger for tasks that will not come."""
        for group in list(self._groups.values()):
            if not group.tasks and group.client is not None and not group.client.closed:
                with contextlib.suppress(errdefs.KetchError):
                    await group.client.call("Shutdown", shim_pb2.ShutdownRequest(now=True), empty_pb2.Empty)
        for task in list(self._tasks.values()):
            task.deleting = True
            if task.log is not None:
                task.log.close()
        clients = {id(t.shim): t.shim for t in self._tasks.values() if t.shim is not None}
        clients.update({id(g.client): g.client for g in self._groups.values() if g.client is not None})
        for client in clients.values():
            await client.close()
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
