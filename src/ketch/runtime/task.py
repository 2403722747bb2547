"""A task as the daemon sees it: its bundle, the shim that serves it, and where it is in its life.

Everything that changes a task's phase goes through :meth:`Task.move`, checked against the
table below (an illegal move is a bug in the runtime and raises FailedPrecondition naming the
phase). The process states inside a live task (created, running, paused, stopped) are the
shim's business; this table is about the task's link to its shim.

    new ──attach──▶ live ──lose──▶ lost ──bury──▶ stopped ──delete──▶ deleted
     │  ╲            │ ◀──attach──┘ │              │
     │   ╲lose       release         │              │
     │    ╲          ▼               │              │
     │     ╲──▶ lost releasing ──released──▶ deleted
     │                       └──keep──▶ stopped   (deleted, but its bundle must stay)
     ├─────bury──▶ stopped   (a tombstone found on disk)
     └─abandon─▶ deleted     (a create that failed part-way)

- **new**: the bundle exists; the shim is being started (create) or reconnected (load).
- **live**: attached to a connected shim; every call goes to it.
- **lost**: the shim's connection closed. Its group's keeper may have started a successor,
  which the manager reconnects to (``attach``: live again, same pid); if none answers, the
  cleanup (``shim delete``) follows (``bury``). Meanwhile calls are Unavailable, state is
  UNKNOWN, and Wait blocks until one or the other.
- **stopped**: a tombstone: the shim is gone and the exit its cleanup reported is recorded
  (137: the cleanup killed the task; 255: its status died with the shim), in the bundle too,
  until the task is deleted. A task whose shim deleted it but whose bundle could not be
  removed (its rootfs still mounted: see ``Bundle.delete``) is kept here too, with its real
  exit, so that a later delete retries.
- **releasing**: being deleted, or ketchd is shutting down: a closing shim connection is
  expected and buries nothing.
- **deleted**: forgotten; its bundle is gone.

Calls that need the shim are allowed in ``live`` only; elsewhere they get NotFound ("its shim
is gone").
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import any_pb2

from ketch import delivery, errdefs, timestamps
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.runtime.bundle import Bundle
from ketch.runtime.shim import ShimClient, ShimLog, Stdio

if TYPE_CHECKING:
    from ketch.runtime.manager import ShimGroup

log = logging.getLogger(__name__)

#: exit status of a task whose shim died when nothing can tell the real one
UNKNOWN_EXIT = 255


class Phase(enum.Enum):
    NEW = "new"
    LIVE = "live"
    LOST = "lost"
    STOPPED = "stopped"
    RELEASING = "releasing"
    DELETED = "deleted"


TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.NEW, "attach"): Phase.LIVE,
    (Phase.NEW, "lose"): Phase.LOST,
    (Phase.NEW, "bury"): Phase.STOPPED,
    (Phase.NEW, "abandon"): Phase.DELETED,
    (Phase.LIVE, "lose"): Phase.LOST,
    (Phase.LIVE, "release"): Phase.RELEASING,
    (Phase.LOST, "attach"): Phase.LIVE,
    (Phase.LOST, "bury"): Phase.STOPPED,
    (Phase.LOST, "release"): Phase.RELEASING,
    (Phase.STOPPED, "release"): Phase.RELEASING,
    (Phase.STOPPED, "delete"): Phase.DELETED,
    (Phase.RELEASING, "released"): Phase.DELETED,
    (Phase.RELEASING, "keep"): Phase.STOPPED,
}


@dataclass(frozen=True)
class Exit:
    """How a process ended."""

    pid: int
    status: int
    exited_at: float


@dataclass(eq=False)
class Task:
    """One task (a container's init process and its execs) in one shim. Made by the
    :class:`~ketch.runtime.manager.TaskManager`, never directly."""

    namespace: str
    id: str
    runtime: str
    binary: str
    bundle: Bundle
    #: the cgroup its shim runs in (runtime options' shim_cgroup); "" for the daemon's choice
    shim_cgroup: str = ""
    #: the Kubernetes pod it belongs to (its spec's io.kubernetes.cri.sandbox-id); "" for none
    pod: str = ""
    pid: int = 0
    phase: Phase = Phase.NEW
    group: ShimGroup | None = None
    log: ShimLog | None = None
    #: the recorded exit once ``stopped``
    tombstone: Exit | None = None
    #: created from a checkpoint unpacked in its bundle, until it starts
    restored: bool = False
    #: where each process's stdio goes (by exec id; "" the init), to see its output delivered
    stdio: dict[str, Stdio] = field(default_factory=dict)
    #: set when the task is settled for good (stopped, released or deleted)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    #: set (and replaced) on every move, so waiters see the task come back to life
    _moved: asyncio.Event = field(default_factory=asyncio.Event)

    # -- the phase table -----------------------------------------------------------------

    def can(self, op: str) -> bool:
        return (self.phase, op) in TRANSITIONS

    def move(self, op: str) -> None:
        if not self.can(op):
            raise errdefs.FailedPrecondition(f"task {self.id}: cannot {op} in {self.phase.value} phase")
        self.phase = TRANSITIONS[(self.phase, op)]
        if self.phase not in (Phase.NEW, Phase.LIVE, Phase.LOST):
            self.settled.set()
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    @property
    def released(self) -> bool:
        """Being deleted, or ketchd is closing: its shim connection ends on purpose."""
        return self.phase in (Phase.RELEASING, Phase.DELETED)

    def shim(self) -> ShimClient:
        """The shim serving this task: Unavailable while it is being replaced, NotFound once
        it is gone for good."""
        client = self.group.client if self.group is not None else None
        if self.phase is Phase.LOST:
            raise errdefs.Unavailable(f"task {self.id}: its shim is restarting; try again")
        if self.phase is not Phase.LIVE or client is None:
            raise errdefs.NotFound(f"task {self.id}: its shim is gone; the task has exited")
        return client

    # -- calls on the task's processes ----------------------------------------------------

    async def start(self, exec_id: str = "") -> int:
        pid = await self.shim().start(self.id, exec_id)
        if not exec_id:
            self.pid = pid
            if self.restored:  # restored: the checkpoint it was restored from is done with
                self.restored = False
                await asyncio.to_thread(self.bundle.drop_checkpoints, restore=True)
        return pid

    async def kill(self, signal: int, *, all: bool = False, exec_id: str = "") -> None:
        await self.shim().kill(self.id, exec_id, signal, all)

    async def exec(self, exec_id: str, spec: any_pb2.Any, stdio: Stdio) -> None:
        if not exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        await self.shim().exec(self.id, exec_id, spec, stdio)
        self.stdio[exec_id] = stdio

    async def resize(self, width: int, height: int, exec_id: str = "") -> None:
        await self.shim().resize_pty(self.id, exec_id, width, height)

    async def close_io(self, stdin: bool, exec_id: str = "") -> None:
        await self.shim().close_io(self.id, exec_id, stdin)

    async def pause(self) -> None:
        await self.shim().pause(self.id)

    async def resume(self) -> None:
        await self.shim().resume(self.id)

    async def pids(self) -> list[task_types.ProcessInfo]:
        return await self.shim().pids(self.id)

    async def update(self, resources: any_pb2.Any, annotations: dict[str, str]) -> None:
        await self.shim().update(self.id, resources, annotations)

    async def stats(self) -> any_pb2.Any:
        return await self.shim().stats(self.id)

    async def checkpoint(self, path: str, options: tuple[str, bytes] | None = None) -> None:
        """Dump the task with CRIU into the directory ``path`` (see ketch.runtime.checkpoint);
        ``options``: containerd's CheckpointOptions, for the shim."""
        await self.shim().checkpoint(self.id, path, any_pb2.Any(type_url=options[0], value=options[1])
                                     if options is not None else None)

    async def delete_process(self, exec_id: str) -> Exit:
        if not exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        resp = await self.shim().delete(self.id, exec_id)
        self.stdio.pop(exec_id, None)
        return Exit(resp.pid, resp.exit_status, timestamps.seconds(resp.exited_at))

    async def state(self, exec_id: str = "") -> task_types.Process:
        """The process's state; a task whose shim is gone is UNKNOWN until buried, then STOPPED."""
        if self.phase is Phase.LIVE:
            s = await self.shim().state(self.id, exec_id)
            return task_types.Process(
                container_id=self.id, id=s.exec_id or self.id, pid=s.pid, status=s.status, stdin=s.stdin,
                stdout=s.stdout, stderr=s.stderr, terminal=s.terminal, exit_status=s.exit_status,
                exited_at=s.exited_at)
        if exec_id:
            raise errdefs.NotFound(f"process {exec_id} of task {self.id}")
        if self.tombstone is None:
            return task_types.Process(container_id=self.id, id=self.id, pid=self.pid, status=task_types.UNKNOWN)
        return task_types.Process(container_id=self.id, id=self.id, pid=self.tombstone.pid,
                                  status=task_types.STOPPED, exit_status=self.tombstone.status,
                                  exited_at=timestamps.timestamp(self.tombstone.exited_at))

    async def _delivered(self, client: ShimClient, exec_id: str) -> None:
        """Let the process's output reach its client before its Wait answers (``delivery``):
        a shim may answer as soon as it reaped the process, its copy still running."""
        stdio = self.stdio.get(exec_id)
        if stdio is None or not delivery.fifos((stdio.stdout, stdio.stderr)):
            return
        if not client.pid:
            try:
                await client.connect(self.id)
            except errdefs.KetchError:
                return  # the shim is gone, and its copy with it
        why = await delivery.delivered((stdio.stdout, stdio.stderr), client.pid)
        if why:
            log.warning("task %s/%s: process %s exited %.0fs ago and its output is not delivered (%s)",
                        self.namespace, self.id, exec_id or self.id, delivery.TIMEOUT, why)

    async def wait(self, exec_id: str = "") -> Exit:
        """Block until the process exits. When the shim dies first, the wait goes on with its
        successor; if there is none, the init process's wait ends with the tombstone once the
        task is buried, an exec's with NotFound."""
        while True:
            moved = self._moved
            if self.phase is Phase.LIVE:
                try:
                    client = self.shim()
                    resp = await client.wait(self.id, exec_id)
                    await self._delivered(client, exec_id)
                    return Exit(0, resp.exit_status, timestamps.seconds(resp.exited_at))
                except errdefs.Unavailable:
                    if self.released:
                        raise
                    await moved.wait()  # the connection closed: see what comes of the shim
                    continue
            if self.phase in (Phase.NEW, Phase.LOST):
                await moved.wait()
                continue
            if exec_id or self.tombstone is None:
                raise errdefs.NotFound(f"process {exec_id or self.id} of task {self.id}")
            return self.tombstone
