"""Tasks and processes, as containerd's Go client has them.

A :class:`Task` is a container's init process; a :class:`Process` is an exec in it. Both can
be waited for before they start: :meth:`Process.wait` sends the daemon's Wait at once and
returns an asyncio task for the exit status, and the daemon answers Wait for a process that
has exited as long as it is not deleted, so an exit is never missed, however quick. A daemon
restart does not end a wait either: the call is made again once the socket answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal as signals
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from ketch import errdefs, timestamps
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.client._io import Capture, IOSpec, ProcessIO, Stdio
from ketch.client._metrics import Metrics, decode_metrics
from ketch.oci.spec import PROCESS_TYPE_URL, RESOURCES_TYPE_URL

if TYPE_CHECKING:
    from ketch.client._conn import Connection
    from ketch.client._images import Image

__all__ = ["ExecResult", "ExitStatus", "Process", "ProcessInfo", "Status", "Task"]

#: how long output may keep coming after a process exited (a child that inherited its stdout
#: keeps the pipe open); exec_sync and delete wait no longer
DRAIN_TIMEOUT = 2.0
#: exec_sync keeps at most this much of each stream unless told otherwise
DEFAULT_OUTPUT_LIMIT = 16 << 20


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: its status (128+N when killed by signal N) and when."""

    code: int
    exited_at: float | None = None


@dataclass(frozen=True)
class Status:
    """A process as the daemon sees it: ``created``, ``running``, ``stopped``, ``paused``,
    ``pausing`` or ``unknown``; the exit status once stopped."""

    status: str
    pid: int = 0
    exit_status: int = 0
    exited_at: float | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A process inside a task: its host pid, and the exec it belongs to (if the runtime says)."""

    pid: int
    exec_id: str = ""


@dataclass
class ExecResult:
    """What :meth:`Task.exec_sync` saw: the exit code, both outputs (capped), and whether the
    timeout ran out (the process was then killed)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False


def _status_of(p: task_types.Process) -> Status:
    name = task_types.Status.Name(p.status).lower()
    exited = timestamps.seconds(p.exited_at) if p.HasField("exited_at") else None
    return Status(name, p.pid, p.exit_status, exited)


def json_any(type_url: str, value: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=json.dumps(value).encode())


@dataclass
class Process:
    """One process of a task: the init process (``exec_id`` empty) or an exec."""

    conn: Connection
    container_id: str
    exec_id: str = ""
    io: ProcessIO = field(default_factory=ProcessIO)
    pid: int = 0

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    @property
    def _tasks(self) -> Any:
        return self.conn.stub(tasks_pb2_grpc.TasksStub)

    async def start(self) -> int:
        """Start the process; its pid."""
        try:
            r = await self.conn.call(self._tasks.Start, tasks_pb2.StartRequest(
                container_id=self.container_id, exec_id=self.exec_id))
        except BaseException:
            await self.io.close()
            raise
        self.pid = r.pid
        self.io.started(self.close_stdin)
        return int(r.pid)

    def wait(self) -> asyncio.Task[ExitStatus]:
        """The exit status, as an asyncio task started now: call before :meth:`start` to be
        sure of a process that exits at once (``await p.wait()`` works too)."""
        return asyncio.ensure_future(self._wait())

    async def _wait(self) -> ExitStatus:
        request = tasks_pb2.WaitRequest(container_id=self.container_id, exec_id=self.exec_id)
        ready = False
        while True:
            try:
                r = await self.conn.call(self._tasks.Wait, request, wait_for_ready=ready)
            except errdefs.Unavailable:
                # the daemon went away (a restart): the shim keeps the process, ask again
                ready = True
                await asyncio.sleep(0.05)
                continue
            exited = timestamps.seconds(r.exited_at) if r.HasField("exited_at") else None
            return ExitStatus(r.exit_status, exited)

    async def status(self) -> Status:
        r = await self.conn.call(self._tasks.Get, tasks_pb2.GetRequest(
            container_id=self.container_id, exec_id=self.exec_id))
        return _status_of(r.process)

    async def kill(self, signal: int = signals.SIGTERM, *, all: bool = False) -> None:
        """Send ``signal`` to the process (``all``: to every process of the task)."""
        await self.conn.call(self._tasks.Kill, tasks_pb2.KillRequest(
            container_id=self.container_id, exec_id=self.exec_id, signal=int(signal), all=all))

    async def close_stdin(self) -> None:
        """Tell the daemon the process's stdin is at its end."""
        await self.conn.call(self._tasks.CloseIO, tasks_pb2.CloseIORequest(
            container_id=self.container_id, exec_id=self.exec_id, stdin=True))

    async def resize(self, width: int, height: int) -> None:
        """Resize the process's terminal."""
        await self.conn.call(self._tasks.ResizePty, tasks_pb2.ResizePtyRequest(
            container_id=self.container_id, exec_id=self.exec_id, width=width, height=height))

    async def _check_stopped(self, force: bool, what: str) -> None:
        status = await self.status()
        if status.status in ("stopped", "unknown") or (status.status == "created" and self.exec_id):
            return
        if not force:
            raise errdefs.FailedPrecondition(f"{what} must be stopped before deletion: {status.status}")
        waiter = self.wait()
        with contextlib.suppress(errdefs.NotFound):
            await self.kill(signals.SIGKILL, all=not self.exec_id)
        await waiter

    async def delete(self, *, force: bool = False) -> ExitStatus:
        """Remove the stopped process (FailedPrecondition while it runs; ``force`` kills it
        first) and its FIFOs; its exit status."""
        await self._check_stopped(force, "process")
        await self.io.wait(DRAIN_TIMEOUT)
        await self.io.remove()
        r = await self.conn.call(self._tasks.DeleteProcess, tasks_pb2.DeleteProcessRequest(
            container_id=self.container_id, exec_id=self.exec_id))
        return ExitStatus(r.exit_status, timestamps.seconds(r.exited_at) if r.HasField("exited_at") else None)


@dataclass
class Task(Process):
    """A container's task: its init process and the operations on the whole container."""

    spec: Mapping[str, Any] | None = None
    fifo_dir: str = ""

    async def delete(self, *, force: bool = False) -> ExitStatus:
        """Remove the task once stopped (FailedPrecondition otherwise, as containerd's client
        says; ``force`` kills every process first); its exit status."""
        await self._check_stopped(force, "task")
        await self.io.wait(DRAIN_TIMEOUT)
        await self.io.remove()
        r = await self.conn.call(self._tasks.Delete, tasks_pb2.DeleteTaskRequest(container_id=self.container_id))
        return ExitStatus(r.exit_status, timestamps.seconds(r.exited_at) if r.HasField("exited_at") else None)

    async def checkpoint(self, ref: str | None = None, *, exit: bool = False, rw: bool = True,
                         options: Any = None) -> Image:
        """Checkpoint the task's container (its process, runtime options, image and, with
        ``rw``, its rw layer) as the image ``ref`` (default ``checkpoint-<id>-<time>``); with
        ``exit`` the task stops after. See :meth:`Container.checkpoint`."""
        from ketch.client._checkpoint import checkpoint

        name = ref or f"checkpoint-{self.container_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        return await checkpoint(self.conn, self.container_id, name, rw=rw, exit=exit, options=options)

    async def pause(self) -> None:
        await self.conn.call(self._tasks.Pause, tasks_pb2.PauseTaskRequest(container_id=self.container_id))

    async def resume(self) -> None:
        await self.conn.call(self._tasks.Resume, tasks_pb2.ResumeTaskRequest(container_id=self.container_id))

    async def pids(self) -> list[ProcessInfo]:
        """Every process in the container."""
        from ketch.api.containerd.runc.options import oci_pb2

        r = await self.conn.call(self._tasks.ListPids, tasks_pb2.ListPidsRequest(container_id=self.container_id))
        out = []
        for p in r.processes:
            exec_id = ""
            if p.HasField("info") and p.info.type_url.endswith("ProcessDetails"):
                exec_id = oci_pb2.ProcessDetails.FromString(p.info.value).exec_id
            out.append(ProcessInfo(p.pid, exec_id))
        return out

    async def metrics(self) -> Metrics:
        """The container's cgroup statistics (cgroup v1 or v2, decoded)."""
        r = await self.conn.call(self._tasks.Metrics, tasks_pb2.MetricsRequest(filters=[f"id=={self.container_id}"]))
        if not r.metrics:
            raise errdefs.NotFound(f"no metrics for task {self.container_id}")
        return decode_metrics(r.metrics[0])

    async def update(self, resources: Mapping[str, Any] | None = None, *, memory: int | None = None,
                     cpus: float | None = None, annotations: Mapping[str, str] | None = None) -> None:
        """Change the task's resources: an OCI ``LinuxResources`` dict, and/or a memory limit
        in bytes and a CPU quota in CPUs."""
        res = dict(resources or {})
        res.update(resource_limits(memory, cpus))
        request = tasks_pb2.UpdateTaskRequest(container_id=self.container_id, annotations=dict(annotations or {}))
        request.resources.CopyFrom(json_any(RESOURCES_TYPE_URL, res))
        await self.conn.call(self._tasks.Update, request)

    async def exec(self, exec_id: str, args: Sequence[str], *, io: IOSpec = None, env: Sequence[str] | None = None,
                   cwd: str | None = None, user: tuple[int, int] | None = None, terminal: bool | None = None) -> Process:
        """Add a process running ``args`` to the task (not started: :meth:`Process.start`).
        It inherits the container's process settings; ``env``, ``cwd``, ``user`` override."""
        if not exec_id:
            raise errdefs.InvalidArgument("exec id must not be empty")
        if not args:
            raise errdefs.InvalidArgument("exec needs a command")
        spec = dict((self.spec or {}).get("process") or {})
        spec["args"] = list(args)
        if env is not None:
            spec["env"] = list(env)
        if cwd is not None:
            spec["cwd"] = cwd
        if user is not None:
            spec["user"] = {"uid": user[0], "gid": user[1]}
        term = terminal if terminal is not None else isinstance(io, Stdio) and io.terminal
        spec["terminal"] = bool(term)
        pio = ProcessIO.create(io, self.fifo_dir, exec_id).register(self.conn.ios)
        request = tasks_pb2.ExecProcessRequest(container_id=self.container_id, exec_id=exec_id, terminal=bool(term),
                                               stdin=pio.stdin, stdout=pio.stdout, stderr=pio.stderr)
        request.spec.CopyFrom(json_any(PROCESS_TYPE_URL, spec))
        try:
            await self.conn.call(self._tasks.Exec, request)
        except BaseException:
            await pio.remove()
            raise
        pio.copy()
        return Process(self.conn, self.container_id, exec_id, pio)

    async def exec_sync(self, args: Sequence[str], timeout: float | None = None, *, stdin: bytes | None = None,
                        env: Sequence[str] | None = None, cwd: str | None = None,
                        max_output: int = DEFAULT_OUTPUT_LIMIT) -> ExecResult:
        """Run ``args`` in the container and collect its output (each stream capped at
        ``max_output`` bytes). Past ``timeout`` seconds the process is killed and the result
        says ``timed_out``."""
        out, err = Capture(max_output), Capture(max_output)
        proc = await self.exec(f"sync-{uuid.uuid4().hex[:12]}", args, io=Stdio(stdin, out, err), env=env, cwd=cwd)
        timed_out = False
        try:
            waiter = proc.wait()
            await proc.start()
            try:
                status = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                timed_out = True
                with contextlib.suppress(errdefs.NotFound):
                    await proc.kill(signals.SIGKILL)
                status = await waiter
            await proc.io.wait(DRAIN_TIMEOUT)
        finally:
            with contextlib.suppress(errdefs.NotFound):
                await proc.delete(force=True)
        return ExecResult(status.code, bytes(out), bytes(err), timed_out, out.truncated or err.truncated)

    async def stop(self, timeout: float = 10.0, *, signal: int = signals.SIGTERM) -> ExitStatus:
        """Ask the task to end (``signal``), and kill every process of it if it has not after
        ``timeout`` seconds; its exit status."""
        waiter = self.wait()
        status = await self.status()
        if status.status != "stopped":
            if status.status in ("paused", "pausing"):
                await self.resume()
            with contextlib.suppress(errdefs.NotFound):
                await self.kill(signal)
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                with contextlib.suppress(errdefs.NotFound):
                    await self.kill(signals.SIGKILL, all=True)
        return await waiter


def resource_limits(memory: int | None, cpus: float | None, period: int = 100_000) -> dict[str, Any]:
    """OCI LinuxResources for a memory limit (bytes) and a CPU quota (CPUs)."""
    res: dict[str, Any] = {}
    if memory is not None:
        if memory <= 0:
            raise errdefs.InvalidArgument(f"memory limit {memory} must be positive")
        res["memory"] = {"limit": int(memory)}
    if cpus is not None:
        if cpus <= 0:
            raise errdefs.InvalidArgument(f"cpus {cpus} must be positive")
        res["cpu"] = {"quota": int(cpus * period), "period": period}
    return res
