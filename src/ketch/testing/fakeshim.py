"""Shims served in memory, for unit tests of the runtime without runc, sockets or processes.

:class:`FakeShim` answers containerd.task.v2.Task over a real :class:`ketch.ttrpc.Server`, with
a tiny process model (created → running → stopped; a kill stops a process with 128+signal).
:class:`FakeLauncher` stands in for :class:`ketch.runtime.Launcher`: ``start`` makes a
FakeShim, ``connect`` reaches it through :func:`ketch.ttrpc.connect_in_memory`, and
:meth:`FakeShim.die` ends every connection as a killed shim process would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from ketch import errdefs, timestamps, ttrpc
from ketch.api.containerd.task.v2 import shim_pb2 as api
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.runtime.shim import SERVICE, ShimClient, binary_name

_pids = itertools.count(1000)


@dataclass(eq=False)
class FakeProcess:
    pid: int = 0
    status: Any = task_types.CREATED
    exit_status: int = 0
    exited_at: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def exit(self, status: int) -> None:
        self.status, self.exit_status = task_types.STOPPED, status
        self.exited_at = time.time()
        self.exited.set()


class FakeShim:
    """One shim: tasks by id, each an init process and its execs. ``calls`` records every
    (method, request) it answered; ``fail`` maps a method name to the error it raises next, ``slow``
to how long it takes."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.tasks: dict[str, dict[str, FakeProcess]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, errdefs.KetchError] = {}
        #: seconds a method takes before it answers (a loaded host's runc)
        self.slow: dict[str, float] = {}
        self.alive = True
        #: what each task created from a checkpoint found in its checkpoint directory (name → bytes)
        self.restored: dict[str, dict[str, bytes]] = {}
        #: the pid Connect gives as the shim's (a process holding what the shim would hold)
        self.pid = os.getpid()
        self.server = ttrpc.Server(require_same_user=False)
        handlers = {
            "Create": (api.CreateTaskRequest, self._create), "Start": (api.StartRequest, self._start),
            "State": (api.StateRequest, self._state), "Wait": (api.WaitRequest, self._wait),
            "Kill": (api.KillRequest, self._kill), "Delete": (api.DeleteRequest, self._delete),
            "Exec": (api.ExecProcessRequest, self._exec), "Connect": (api.ConnectRequest, self._connect),
            "Shutdown": (api.ShutdownRequest, self._empty), "Pause": (api.PauseRequest, self._empty),
            "Resume": (api.ResumeRequest, self._empty), "ResizePty": (api.ResizePtyRequest, self._empty),
            "CloseIO": (api.CloseIORequest, self._empty), "Update": (api.UpdateTaskRequest, self._empty),
            "Pids": (api.PidsRequest, self._pids), "Stats": (api.StatsRequest, self._stats),
            "Checkpoint": (api.CheckpointTaskRequest, self._checkpoint),
        }
        self.server.register(SERVICE, {name: ttrpc.Method(t, self._recorded(name, h))
                                       for name, (t, h) in handlers.items()})

    def _recorded(self, name: str, handler: Callable[[Any], Any]) -> Callable[[Any, ttrpc.Context], Any]:
        async def answer(req: Any, ctx: ttrpc.Context) -> Any:
            self.calls.append((name, req))
            if name in self.slow:
                await asyncio.sleep(self.slow[name])
            if name in self.fail:
                raise self.fail.pop(name)
            return await handler(req)
        return answer

    def methods(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def die(self) -> None:
        """End every connection, as kill -9 of the shim process would."""
        self.alive = False
        await self.server.shutdown()

    def _process(self, id: str, exec_id: str = "") -> FakeProcess:
        try:
            return self.tasks[id][exec_id]
        except KeyError:
            raise errdefs.NotFound(f"process {exec_id or id} of task {id}") from None

    async def _create(self, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if req.id in self.tasks:
            raise errdefs.AlreadyExists(f"task {req.id}")
        if req.checkpoint:
            self.restored[req.id] = {p.name: p.read_bytes() for p in Path(req.checkpoint).iterdir()}
        self.tasks[req.id] = {"": FakeProcess(pid=next(_pids))}
        return api.CreateTaskResponse(pid=self.tasks[req.id][""].pid)

    async def _start(self, req: api.StartRequest) -> api.StartResponse:
        proc = self._process(req.id, req.exec_id)
        if proc.status != task_types.CREATED:
            raise errdefs.FailedPrecondition(f"cannot start a process in state {proc.status}")
        proc.pid, proc.status = proc.pid or next(_pids), task_types.RUNNING
        return api.StartResponse(pid=proc.pid)

    async def _state(self, req: api.StateRequest) -> api.StateResponse:
        proc = self._process(req.id, req.exec_id)
        resp = api.StateResponse(id=req.id, exec_id=req.exec_id, pid=proc.pid, status=proc.status,
                                 exit_status=proc.exit_status)
        timestamps.stamp(resp.exited_at, proc.exited_at)
        return resp

    async def _wait(self, req: api.WaitRequest) -> api.WaitResponse:
        proc = self._process(req.id, req.exec_id)
        await proc.exited.wait()
        return api.WaitResponse(exit_status=proc.exit_status, exited_at=timestamps.timestamp(proc.exited_at))

    async def _kill(self, req: api.KillRequest) -> empty_pb2.Empty:
        proc = self._process(req.id, req.exec_id)
        if proc.status == task_types.STOPPED:
            raise errdefs.NotFound("process already finished")
        if proc.pid <= 0:
            raise errdefs.FailedPrecondition("process not started")
        proc.exit(128 + req.signal)
        return empty_pb2.Empty()

    async def _delete(self, req: api.DeleteRequest) -> api.DeleteResponse:
        proc = self._process(req.id, req.exec_id)
        if proc.status not in (task_types.STOPPED, task_types.CREATED):
            raise errdefs.FailedPrecondition("process must be stopped before deletion")
        if req.exec_id:
            del self.tasks[req.id][req.exec_id]
        else:
            del self.tasks[req.id]
        return api.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status,
                                  exited_at=timestamps.timestamp(proc.exited_at))

    async def _exec(self, req: api.ExecProcessRequest) -> empty_pb2.Empty:
        procs = self.tasks.get(req.id)
        if procs is None:
            raise errdefs.NotFound(f"task {req.id}")
        if req.exec_id in procs:
            raise errdefs.AlreadyExists(f"id {req.exec_id}")
        procs[req.exec_id] = FakeProcess()
        return empty_pb2.Empty()

    async def _connect(self, req: api.ConnectRequest) -> api.ConnectResponse:
        return api.ConnectResponse(shim_pid=self.pid, task_pid=self._process(req.id).pid)

    async def _pids(self, req: api.PidsRequest) -> api.PidsResponse:
        procs = self.tasks.get(req.id, {})
        return api.PidsResponse(processes=[task_types.ProcessInfo(pid=p.pid) for p in procs.values() if p.pid])

    async def _stats(self, req: api.StatsRequest) -> api.StatsResponse:
        self._process(req.id)
        return api.StatsResponse(stats=any_pb2.Any(type_url="fake.Stats", value=req.id.encode()))

    async def _checkpoint(self, req: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        """A stand-in for a CRIU dump: one file naming the task."""
        self._process(req.id)
        (Path(req.path) / "fake.img").write_bytes(f"dump of {req.id}".encode())
        return empty_pb2.Empty()

    async def _empty(self, req: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()


class FakeLauncher:
    """Starts :class:`FakeShim` instead of shim binaries. ``shims`` holds every shim started,
    by address; ``deleted`` every (namespace, id) whose cleanup (``shim delete``) ran, which
    answers ``cleanup`` (the status, or the error it fails with)."""

    def __init__(self) -> None:
        self.shims: dict[str, FakeShim] = {}
        self.deleted: list[tuple[str, str]] = []
        self.cleanup: int | errdefs.KetchError = 137
        self.start_options: list[bytes] = []

    def resolve(self, runtime: str) -> str:
        return runtime if os.path.isabs(runtime) else "/fake/bin/" + binary_name(runtime)

    async def start(self, binary: str, namespace: str, id: str, bundle: str, options: bytes, group: str = "") -> str:
        address = f"memory://{namespace}/{group or id}/{len(self.shims)}"
        self.shims[address] = FakeShim(address)
        self.start_options.append(options)
        with open(os.path.join(bundle, "address"), "w") as f:
            f.write(address)
        return address

    async def delete(self, binary: str, namespace: str, id: str, bundle: str) -> api.DeleteResponse:
        self.deleted.append((namespace, id))
        if isinstance(self.cleanup, errdefs.KetchError):
            raise self.cleanup
        return api.DeleteResponse(exit_status=self.cleanup)

    async def connect(self, address: str, namespace: str, *, timeout: float,
                      on_close: Callable[[], object] | None = None) -> ShimClient:
        shim = self.shims.get(address)
        if shim is None or not shim.alive:
            raise errdefs.Unavailable(f"no shim answers at {address}")
        return ShimClient(await ttrpc.connect_in_memory(shim.server, on_close=on_close), namespace, timeout)

    async def kill_and_succeed(self, shim: FakeShim) -> FakeShim:
        """kill -9 of a ketch shim and what its group's keeper then does: a new shim on the
        same address (which never stopped accepting), serving the same processes."""
        successor = FakeShim(shim.address)
        successor.tasks = shim.tasks
        self.shims[shim.address] = successor
        await shim.die()
        return successor

    def sockets(self) -> list[str]:
        return [a for a, s in self.shims.items() if s.alive]
