"""The runtime v2 task manager: the map of tasks, and the shims that serve them.

ketchd keeps nothing it cannot rebuild from disk. Every task has a bundle (``bundle.py``); on
start, :meth:`TaskManager.load` walks them, reconnects to each shim whose address answers, and
cleans up after each one that is gone. A shim that dies — while ketchd runs or while it was
down — is handled one way (:meth:`TaskManager._bury`): the shim binary's ``delete`` cleans up
(runc delete --force, unmount), /tasks/exit is published with the exit status it reports (137:
it killed what was left of the task; 255: the status died with the shim), and the task stays
as a STOPPED tombstone, recorded in the bundle, until it is deleted, which publishes
/tasks/delete. So no client waits forever, and ``ctr task rm``
works as after any exit. A task's phases are the table in ``task.py``.

The rules containerd's task service applies live here, so every face (gRPC, CRI, an
in-process client) gets them: AlreadyExists for a second task, which runtime options win,
FailedPrecondition for deleting a running task, List and Metrics filters.

Every shim call has a timeout (Wait excepted); a failed create leaves no bundle, shim or record.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from ketch import errdefs, filters, timestamps, topics
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types import metrics_pb2, mount_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.events import Envelope
from ketch.files import write_atomic
from ketch.runtime.bundle import Bundle, walk
from ketch.runtime.shim import KETCH_SHIM, ShimClient, ShimLauncher, ShimLog, Stdio
from ketch.runtime.task import UNKNOWN_EXIT, Exit, Phase, Task
from ketch.topics import Publish

if TYPE_CHECKING:
    from ketch.metadata import Container

log = logging.getLogger(__name__)

__all__ = ["CreateOptions", "ShimGroup", "TaskManager"]


#: what tasks sharing one shim process have in common: (namespace, shim binary, shim cgroup, pod)
GroupKey = tuple[str, str, str, str]


@dataclass(eq=False)
class ShimGroup:
    """One connection to one shim process, and the tasks it serves. A shared group (``key``
    set) outlives its tasks for a while so that its next task needs no new process."""

    address: str
    key: GroupKey | None = None  # when shared
    client: ShimClient | None = None
    tasks: dict[str, Task] = field(default_factory=dict)


@dataclass
class CreateOptions:
    """What a create request adds to the container's record."""

    stdio: Stdio = Stdio()
    rootfs: Iterable[mount_pb2.Mount] = ()
    #: runtime options (type URL, marshalled message); None: the container's own
    options: tuple[str, bytes] | None = None
    #: a shim binary to run instead of the container's runtime
    runtime_path: str = ""
    #: a directory holding the CRIU image to restore the task from (runc options' criu_image_path)
    checkpoint: str = ""
    #: writes the CRIU image to restore from into the directory it is given (a checkpoint blob:
    #: see ketch.runtime.checkpoint); unpacked into the task's bundle, removed once it starts
    unpack: Callable[[str], Awaitable[None]] | None = None


#: containerd's deprecated v1 runtime, which old clients still name; run on the v2 runc path
V1_RUNTIME = "io.containerd.runtime.v1.linux"
RUNC_V2 = "io.containerd.runc.v2"


def _from_v1(options: tuple[str, bytes] | None) -> tuple[str, tuple[str, bytes] | None]:
    """The runc v2 runtime, with a v1 ``containerd.linux.runc.RuncOptions`` translated into
    ``containerd.runc.v1.Options`` (runtime binary, its root, criu, systemd cgroups), as
    containerd 1.6 does when it runs v1 tasks on the v2 shim."""
    if options is None or not options[0].endswith("containerd.linux.runc.RuncOptions"):
        return RUNC_V2, options
    from ketch.api.containerd.linux.runctypes import runc_pb2
    from ketch.api.containerd.runc.options import oci_pb2

    try:
        v1 = runc_pb2.RuncOptions.FromString(options[1])
    except DecodeError as e:
        raise errdefs.InvalidArgument(f"undecodable containerd.linux.runc.RuncOptions: {e}") from None
    v2 = oci_pb2.Options(binary_name=v1.runtime, root=v1.runtime_root, criu_path=v1.criu_path,
                         systemd_cgroup=v1.systemd_cgroup)
    return RUNC_V2, ("containerd.runc.v1.Options", v2.SerializeToString())


def _shim_cgroup(options: tuple[str, bytes] | None) -> str:
    """The cgroup runtime options ask the shim to run in (containerd.runc.v1.Options'
    shim_cgroup, the only options containerd's runc shim reads it from)."""
    if options is None or options[0].rsplit("/", 1)[-1] != "containerd.runc.v1.Options":
        return ""
    from ketch.api.containerd.runc.options import oci_pb2

    try:
        return str(oci_pb2.Options.FromString(options[1]).shim_cgroup)
    except DecodeError:
        return ""  # the shim's Create says what is wrong with them


#: the spec annotation naming a container's pod (Kubernetes CRI): a pod's containers share one
#: shim, as containerd's runc shim groups them by it
POD_ANNOTATION = "io.kubernetes.cri.sandbox-id"


def _pod_of(spec: bytes) -> str:
    """The pod a container's OCI spec says it belongs to; "" for none."""
    if POD_ANNOTATION.encode() not in spec:
        return ""
    try:
        pod = json.loads(spec).get("annotations", {}).get(POD_ANNOTATION, "")
    except (ValueError, AttributeError):
        return ""
    return pod if isinstance(pod, str) else ""


class TaskManager:
    def __init__(
        self,
        *,
        state: str,
        root: str,
        launcher: ShimLauncher,
        publish: Publish,
        call_timeout: float = 30.0,
        aliases: dict[str, str] | None = None,
        grouping: bool = True,
        takeover_timeout: float = 2.0,
    ) -> None:
        self.state_dir = state
        self.root_dir = root
        self.launcher = launcher
        self.publish = publish
        self.call_timeout = call_timeout
        #: runtime name asked for → runtime run instead (dockerd 20.10 can only ask for runc.v2)
        self.aliases = aliases or {}
        #: tasks of one namespace share one ketch shim process (see ShimGroup)
        self.grouping = grouping
        #: how long a lost shim's successor has to answer before its tasks are buried
        self.takeover_timeout = takeover_timeout
        self._groups: dict[GroupKey, ShimGroup] = {}
        self._group_locks: dict[GroupKey, asyncio.Lock] = {}
        self._tasks: dict[tuple[str, str], Task] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: tasks whose shim was found dead by load(), until bury_dead() runs
        self._unburied: list[Task] = []
        #: shims whose connection closed while they served tasks; successors reconnected to
        #: (a keeper's takeover, or a live upgrade); tasks buried (their shim gone for good)
        self.shims_lost = 0
        self.takeovers = 0
        self.buried = 0

    # -- lookup ---------------------------------------------------------------------------

    def get(self, namespace: str, id: str) -> Task:
        task = self._tasks.get((namespace, id))
        if task is None or task.phase is Phase.NEW:
            raise errdefs.NotFound(f"task {id} not found")
        return task

    def list(self, namespace: str) -> builtins.list[Task]:
        return [t for (ns, _), t in sorted(self._tasks.items()) if ns == namespace and t.phase is not Phase.NEW]

    def all_tasks(self) -> builtins.list[Task]:
        """Every task of every namespace, by namespace and id."""
        return [t for _, t in sorted(self._tasks.items()) if t.phase is not Phase.NEW]

    def shims(self) -> builtins.list[ShimGroup]:
        """Every shim connected to: the shared ones (idle ones too) and those serving tasks."""
        groups = {id(g): g for g in self._groups.values()}
        groups.update((id(t.group), t.group) for t in self._tasks.values() if t.group is not None)
        return [g for g in groups.values() if g.client is not None and not g.client.closed]

    def exists(self, namespace: str, id: str) -> bool:
        """True while a task of that id exists or is being created."""
        return (namespace, id) in self._tasks

    async def processes(self, namespace: str, filter: str = "") -> builtins.list[task_types.Process]:
        """The init process of every task of ``namespace`` matching the containerd ``filter``
        (fields ``id``, ``container_id``, ``status``). A shim that vanishes mid-list is
        buried and listed next time."""
        match = filters.parse([filter] if filter else [])
        states = await asyncio.gather(*(t.state() for t in self.list(namespace)), return_exceptions=True)
        return [s for s in states if not isinstance(s, BaseException) and match.match(filters.adaptor_for(
            {"id": s.id, "container_id": s.container_id, "status": task_types.Status.Name(s.status).lower()}))]

    async def metrics(self, namespace: str, filter_list: Sequence[str] = ()) -> builtins.list[metrics_pb2.Metric]:
        """Metrics of the live tasks matching any filter (fields ``id``, ``runtime``). With one
        task selected its error is the answer; with several, a failing one is left out."""
        match = filters.parse(list(filter_list))
        tasks = [t for t in self.list(namespace)
                 if t.phase is Phase.LIVE and match.match(filters.adaptor_for({"id": t.id, "runtime": t.runtime}))]
        stats = await asyncio.gather(*(t.stats() for t in tasks), return_exceptions=True)
        now = timestamps.timestamp(time.time())
        out = []
        for task, stat in zip(tasks, stats):
            if isinstance(stat, BaseException):
                if len(tasks) == 1 and isinstance(stat, errdefs.KetchError):
                    raise stat
                continue
            out.append(metrics_pb2.Metric(id=task.id, data=stat, timestamp=now))
        return out

    # -- create / delete -------------------------------------------------------------------

    async def create(self, namespace: str, container: Container, opts: CreateOptions) -> Task:
        """Start a task for ``container``: its runtime (or ``opts.runtime_path``) with the
        request's runtime options, else the container's."""
        id = container.id
        if self.exists(namespace, id):
            raise errdefs.AlreadyExists(f"task {id}")
        if container.spec is None:
            raise errdefs.FailedPrecondition(f"container {id!r} has no spec")
        runtime = opts.runtime_path or container.runtime.name
        options = opts.options
        if options is None and container.runtime.options is not None:
            options = (container.runtime.options.type_url, container.runtime.options.value)
        run_as = runtime
        if runtime == V1_RUNTIME:
            run_as, options = _from_v1(options)
        binary = self.launcher.resolve(self.aliases.get(run_as, run_as))
        bundle = Bundle.at(self.state_dir, self.root_dir, namespace, id)
        task = Task(namespace, id, runtime, binary, bundle, shim_cgroup=_shim_cgroup(options),
                    pod=_pod_of(container.spec.value), stdio={"": opts.stdio})
        self._tasks[(namespace, id)] = task
        info = {"runtime": runtime, "binary": binary}
        if task.shim_cgroup:
            info["shim_cgroup"] = task.shim_cgroup
        if task.pod:
            info["pod"] = task.pod
        try:
            bundle.create(container.spec.value, info)
            checkpoint = opts.checkpoint
            if opts.unpack is not None:
                checkpoint = str(bundle.restore_image)
                task.restored = True
                await opts.unpack(checkpoint)
            await self._start_shim(task, opts, options, checkpoint)
            task.move("attach")
        except BaseException:
            await self._abandon(task)
            raise
        log.info("task created namespace=%s id=%s pid=%d runtime=%s", namespace, id, task.pid, runtime)
        return task

    async def _start_shim(self, task: Task, opts: CreateOptions, options: tuple[str, bytes] | None,
                          checkpoint: str) -> None:
        task.log = ShimLog(str(task.bundle.path / "log"), task.namespace)
        req = shim_pb2.CreateTaskRequest(
            id=task.id, bundle=str(task.bundle.path), rootfs=list(opts.rootfs), terminal=opts.stdio.terminal,
            stdin=opts.stdio.stdin, stdout=opts.stdio.stdout, stderr=opts.stdio.stderr, checkpoint=checkpoint)
        start_options = b""
        if options is not None:
            req.options.CopyFrom(any_pb2.Any(type_url=options[0], value=options[1]))
            start_options = req.options.SerializeToString()
        for attempt in (1, 2):
            client, reused = await self._join_group(task, start_options)
            try:
                task.pid = await client.create(req)
                return
            except errdefs.Unavailable:
                if not reused or attempt == 2:
                    raise
                # the shared shim was just deciding to exit: start a fresh one
                self._leave_group(task)

    def _shares(self, task: Task) -> bool:
        return self.grouping and os.path.basename(task.binary) == KETCH_SHIM

    @staticmethod
    def _group_key(task: Task) -> GroupKey:
        """Tasks share a shim when they share a namespace, a shim binary, the cgroup their
        shim must run in and their pod: a task asking for another shim_cgroup gets a shim of
        its own, and so does each Kubernetes pod (one pod's shim dying touches no other pod)."""
        return task.namespace, task.binary, task.shim_cgroup, task.pod

    async def _join_group(self, task: Task, start_options: bytes) -> tuple[ShimClient, bool]:
        """Attach ``task`` to a shim: its namespace's live shared ketch shim if there is one
        (reused: True), else a shim started for it. The bundle's ``address`` records which."""
        start = self.launcher.start
        if not self._shares(task):
            address = await start(task.binary, task.namespace, task.id, str(task.bundle.path), start_options)
            return self._attach(task, await self._connect_group(address, task.namespace, None)), False
        key = self._group_key(task)
        async with self._group_locks.setdefault(key, asyncio.Lock()):
            group = self._groups.get(key)
            reused = group is not None and group.client is not None and not group.client.closed
            if group is None or not reused:
                name = (f"ketchd-{task.namespace}" + (f" cgroup={task.shim_cgroup}" if task.shim_cgroup else "")
                        + (f" pod={task.pod}" if task.pod else ""))
                address = await start(task.binary, task.namespace, task.id, str(task.bundle.path), start_options,
                                      group=name)
                group = self._groups[key] = await self._connect_group(address, task.namespace, key)
            else:
                write_atomic(task.bundle.path / "address", group.address.encode(), durable=False)
            return self._attach(task, group), reused

    def _attach(self, task: Task, group: ShimGroup) -> ShimClient:
        assert group.client is not None
        task.group = group
        group.tasks[task.id] = task
        return group.client

    def _leave_group(self, task: Task) -> None:
        group, task.group = task.group, None
        if group is not None:
            group.tasks.pop(task.id, None)
            if group.key is not None and self._groups.get(group.key) is group:
                del self._groups[group.key]

    async def _connect_group(self, address: str, namespace: str, key: GroupKey | None) -> ShimGroup:
        group = ShimGroup(address, key)
        group.client = await self.launcher.connect(address, namespace, timeout=self.call_timeout,
                                                   on_close=lambda: self._on_shim_close(group))
        return group

    async def _abandon(self, task: Task) -> None:
        """Undo a create that failed part-way: nothing of it may stay behind."""
        client = task.group.client if task.group is not None else None
        task.move("abandon")
        if client is not None and not client.closed:
            with contextlib.suppress(errdefs.KetchError):
                await client.delete(task.id)
            with contextlib.suppress(errdefs.KetchError):
                await client.shutdown(task.id)
        await self._release(task)
        if task.bundle.path.exists():
            with contextlib.suppress(errdefs.KetchError, OSError):
                await self.launcher.delete(task.binary, task.namespace, task.id, str(task.bundle.path))
        with contextlib.suppress(errdefs.FailedPrecondition):  # logged; the create's own error is the answer
            await self._remove_bundle(task)
        self._forget(task)

    async def delete(self, namespace: str, id: str) -> Exit:
        """Delete the task's init process and its shim; how it ended. FailedPrecondition
        while it runs."""
        task = self.get(namespace, id)
        if task.tombstone is not None:
            await self._remove_bundle(task)
            if not task.can("delete"):
                raise errdefs.NotFound(f"task {id} not found")  # deleted meanwhile by another call
            task.move("delete")
            self._forget(task)
            ended = task.tombstone
            self.publish(namespace, events.TaskDelete(container_id=id, id=id, pid=ended.pid, exit_status=ended.status,
                                                      exited_at=timestamps.timestamp(ended.exited_at)))
            return ended
        client = task.shim()
        state = await client.state(id)
        if state.status in (task_types.RUNNING, task_types.PAUSED, task_types.PAUSING):
            name = task_types.Status.Name(state.status).lower()
            raise errdefs.FailedPrecondition(f"task {id} must be stopped before deletion: {name}")
        resp = await client.delete(id)
        task.move("release")
        try:
            await client.shutdown(id)
        except errdefs.KetchError as e:
            log.debug("shim shutdown for %s: %s", id, e)
        await self._release(task)
        ended = Exit(resp.pid, resp.exit_status, timestamps.seconds(resp.exited_at))
        try:
            await self._remove_bundle(task)
        except errdefs.FailedPrecondition:
            # deleted in its shim, but the bundle stays: a tombstone until a delete removes it
            task.tombstone = ended
            with contextlib.suppress(OSError):
                task.bundle.write_exit(ended.pid, ended.status, ended.exited_at)
            task.move("keep")
            raise
        task.move("released")
        self._forget(task)
        return ended

    async def _release(self, task: Task) -> None:
        """Detach ``task`` from its shim; close the connection unless a shared shim keeps it."""
        group, task.group = task.group, None
        if group is None:
            return
        group.tasks.pop(task.id, None)
        if group.key is None and group.client is not None:
            await group.client.close()

    async def _remove_bundle(self, task: Task) -> None:
        """Remove the task's bundle, in a thread (it unmounts and removes trees). One that must
        stay because something is still mounted in it is logged, and FailedPrecondition."""
        try:
            await asyncio.to_thread(task.bundle.delete)
        except errdefs.FailedPrecondition as e:
            log.error("%s", e.message)
            raise

    def _forget(self, task: Task) -> None:
        """Drop a task whose bundle is gone."""
        self._tasks.pop((task.namespace, task.id), None)
        if task.log is not None:
            task.log.close()

    # -- exits forwarded by shims ------------------------------------------------------------

    def first_publication(self, envelope: Envelope) -> bool:
        """False for a /tasks/exit a shim forwards again (it resends until it gets an answer,
        and an answer can be lost when ketchd dies); recorded in the task's bundle, so this
        holds across ketchd's restarts."""
        if envelope.topic != topics.of(events.TaskExit()):
            return True
        try:
            exit = events.TaskExit.FromString(envelope.value)
        except DecodeError:
            return True
        task = self._tasks.get((envelope.namespace, exit.container_id))
        if task is None:
            return True
        try:
            return task.bundle.note_exit(f"{exit.id} {exit.pid} {exit.exited_at.seconds}.{exit.exited_at.nanos:09d}")
        except OSError as e:
            log.warning("recording the exit of %s/%s: %s", envelope.namespace, exit.id, e)
            return True

    # -- dead shims --------------------------------------------------------------------------

    def _on_shim_close(self, group: ShimGroup) -> None:
        """A shim's connection closed: every task it still served (none, when it was shut down
        on purpose) is lost until a successor answers on the same address, else buried."""
        if group.key is not None and self._groups.get(group.key) is group:
            del self._groups[group.key]
        lost = []
        for task in list(group.tasks.values()):
            if not task.can("lose") or task.phase is Phase.NEW:
                continue  # released on purpose, or a create in progress whose error path cleans up
            task.move("lose")
            lost.append(task)
        if lost:
            self.shims_lost += 1
            log.warning("the shim at %s went away (tasks %s): looking for its successor", group.address,
                        ", ".join(f"{t.namespace}/{t.id}" for t in lost))
            t = asyncio.ensure_future(self._recover(group, lost))
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    async def _recover(self, group: ShimGroup, tasks: builtins.list[Task]) -> None:
        """Reconnect ``tasks`` to the successor their group's keeper starts on the same address:
        the keeper holds the listening socket, so a connection is accepted at once and answered
        once the successor serves (milliseconds). Nobody listening means no keeper: bury them."""
        successor: ShimGroup | None = None
        try:
            successor = await self._connect_group(group.address, tasks[0].namespace,
                                                  group.key if group.key not in self._groups else None)
        except errdefs.KetchError as e:
            log.info("no successor at %s: %s", group.address, e)
        alive: builtins.list[Task] = []
        if successor is not None and successor.client is not None:
            for task in tasks:
                try:
                    async with asyncio.timeout(self.takeover_timeout):
                        pid = await successor.client.connect(task.id)
                except (errdefs.KetchError, TimeoutError) as e:
                    log.warning("the successor at %s does not serve task %s: %s", group.address, task.id, e)
                    continue
                if not task.can("attach"):
                    continue
                task.pid = pid or task.pid
                group.tasks.pop(task.id, None)
                self._attach(task, successor)
                task.move("attach")
                alive.append(task)
            if alive:
                self.takeovers += 1
            if successor.key is not None and alive:
                self._groups[successor.key] = successor
            elif not alive:
                await successor.client.close()
            log.info("reconnected %d of %d tasks to the successor shim at %s", len(alive), len(tasks),
                     group.address)
        await asyncio.gather(*(self._bury(t) for t in tasks if t not in alive and t.can("bury")))

    async def _bury(self, task: Task) -> None:
        """The shim is gone: clean up after it, publish the exit, keep a STOPPED tombstone.
        The exit is what the cleanup reports, as containerd has it (137 from both shims when
        they killed what was left; ours says 255 when the process was gone already, its status
        with it); 255 when the cleanup fails."""
        ended = Exit(task.pid, UNKNOWN_EXIT, time.time())
        try:
            resp = await self.launcher.delete(task.binary, task.namespace, task.id, str(task.bundle.path))
            ended = Exit(task.pid or resp.pid, resp.exit_status,
                         timestamps.seconds(resp.exited_at) if resp.HasField("exited_at") else ended.exited_at)
        except (errdefs.KetchError, OSError) as e:
            log.warning("cleaning up after the shim of %s/%s: %s", task.namespace, task.id, e)
        if not task.can("bury"):
            return  # released meanwhile (ketchd is shutting down)
        if task.group is not None:
            task.group.tasks.pop(task.id, None)
            task.group = None
        task.pid, task.tombstone = ended.pid, ended
        with contextlib.suppress(OSError):
            task.bundle.write_exit(ended.pid, ended.status, ended.exited_at)
        task.move("bury")
        self.buried += 1
        self.publish(task.namespace, events.TaskExit(container_id=task.id, id=task.id, pid=ended.pid,
                                                     exit_status=ended.status,
                                                     exited_at=timestamps.timestamp(ended.exited_at)))

    # -- reload after a restart ---------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the task map from the bundles on disk (see the module doc): one connection
        per shim address, shared by the tasks that shim serves."""
        by_address: dict[str, builtins.list[Task]] = {}
        loaded: builtins.list[Bundle] = []
        for bundle in walk(self.state_dir, self.root_dir):
            task = self._load_task(bundle)
            if task is not None:
                by_address.setdefault(bundle.address(), []).append(task)
                loaded.append(bundle)

        def drop_dumps() -> None:  # of checkpoints ketchd died during (their blobs were never stored)
            for bundle in loaded:
                bundle.drop_checkpoints(restore=False)

        # one thread for every bundle's, beside the reconnections rather than before them
        await asyncio.gather(asyncio.to_thread(drop_dumps),
                             *(self._reconnect(address, tasks) for address, tasks in by_address.items()))
        await self._dismiss_idle_shims(set(by_address))

    async def _dismiss_idle_shims(self, known: set[str]) -> None:
        """A shared shim that was idle when ketchd died has no bundle to be found by: ask every
        other shim socket in our directory to exit if it serves nothing."""
        for address in self.launcher.sockets():
            if address in known:
                continue
            try:
                client = await self.launcher.connect(address, "", timeout=1.0)
            except errdefs.KetchError:
                continue
            try:
                await client.shutdown(timeout=1.0)
                log.info("asked the idle shim at %s to exit", address)
            except errdefs.KetchError:
                pass
            finally:
                await client.close()

    def _load_task(self, bundle: Bundle) -> Task | None:
        """The task of ``bundle``, to reconnect to; None when there is nothing to reconnect
        (a tombstone, or a bundle that is not ours)."""
        info = bundle.info
        if not info:
            log.warning("bundle %s has no ketch.json; removing it", bundle.path)
            try:
                bundle.delete()
            except errdefs.FailedPrecondition as e:
                log.error("%s", e.message)
            return None
        task = Task(bundle.namespace, bundle.id, info.get("runtime", ""), info.get("binary", ""), bundle,
                    shim_cgroup=info.get("shim_cgroup", ""), pod=info.get("pod", ""))
        self._tasks[(bundle.namespace, bundle.id)] = task
        exited = bundle.read_exit()
        if exited is not None:
            task.pid = int(exited.get("pid", 0))
            task.tombstone = Exit(task.pid, int(exited.get("exit_status", UNKNOWN_EXIT)),
                                  float(exited.get("exited_at", 0.0)))
            task.move("bury")
            return None
        with contextlib.suppress(OSError):
            task.log = ShimLog(str(bundle.path / "log"), task.namespace)
        task.restored = bundle.restore_image.exists()
        return task

    async def _reconnect(self, address: str, tasks: builtins.list[Task]) -> None:
        first = tasks[0]
        key = self._group_key(first) if self._shares(first) else None
        if key is not None and key in self._groups:
            key = None  # only one shared shim per group key: the others serve out their tasks
        group: ShimGroup | None = None
        try:
            if not address:
                raise errdefs.Unavailable("no address")
            group = await self._connect_group(address, first.namespace, key)
            for task in tasks:
                client = self._attach(task, group)
                task.pid = await client.connect(task.id)
                task.move("attach")
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
                task.move("lose")
                self._unburied.append(task)

    async def bury_dead(self) -> None:
        """Clean up after the shims :meth:`load` found dead (until then their tasks are
        UNKNOWN, and Wait blocks). The daemon holds the /tasks/exit this publishes until
        clients reconnecting after the restart could resubscribe."""
        tasks, self._unburied = self._unburied, []
        await asyncio.gather(*(self._bury(t) for t in tasks))

    async def close(self) -> None:
        """Disconnect from every shim; they keep running, except shared shims with no task
        left, which are told to exit now rather than linger for tasks that will not come."""
        for group in list(self._groups.values()):
            if not group.tasks and group.client is not None and not group.client.closed:
                with contextlib.suppress(errdefs.KetchError):
                    await group.client.shutdown(now=True)
        clients = {id(g.client): g.client for g in self._groups.values() if g.client is not None}
        for task in list(self._tasks.values()):
            if task.can("release"):
                task.move("release")
            if task.group is not None and task.group.client is not None:
                clients[id(task.group.client)] = task.group.client
            if task.log is not None:
                task.log.close()
        for client in clients.values():
            await client.close()
        for t in list(self._background):
            t.cancel()
