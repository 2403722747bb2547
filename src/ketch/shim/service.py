"""containerd.task.v2.Task: the shim's ttrpc face over :class:`~ketch.shim.core.Core`.

Each method decodes its request, makes one core call and encodes the answer; the rules,
runc, exits and events live in ``core.py``, process states in ``process.py``.
"""

from __future__ import annotations

import os
from typing import Any, cast

from google.protobuf import empty_pb2

from ketch import __version__, logfields, timestamps, ttrpc
from ketch.api.containerd.task.v2 import shim_pb2 as api
from ketch.shim.core import Core
from ketch.shim.process import Process
from ketch.shim.stdio import Stdio

SERVICE = "containerd.task.v2.Task"

_EMPTY = empty_pb2.Empty


def _stamp_exit(out: api.StateResponse | api.WaitResponse | api.DeleteResponse, proc: Process) -> None:
    """A response's exited_at, left unset while the process has not exited."""
    if proc.exited_at:
        timestamps.stamp(out.exited_at, proc.exited_at)


def _with_log_fields(handler: Any) -> Any:
    """The call's container and exec ids on every line it logs (ketch.logfields)."""
    async def call(req: Any, ctx: ttrpc.Context) -> Any:
        logfields.bind(container=getattr(req, "id", ""), exec=getattr(req, "exec_id", ""))
        return await handler(req, ctx)
    return call


class TaskService:
    def __init__(self, core: Core) -> None:
        self.core = core

    def register(self, server: ttrpc.Server) -> None:
        def M(request_type: Any, handler: Any) -> ttrpc.Method:
            return ttrpc.Method(request_type, _with_log_fields(handler))
        server.register(SERVICE, {
            "State": M(api.StateRequest, self.state),
            "Create": M(api.CreateTaskRequest, self.create),
            "Start": M(api.StartRequest, self.start),
            "Delete": M(api.DeleteRequest, self.delete),
            "Pids": M(api.PidsRequest, self.pids),
            "Pause": M(api.PauseRequest, self.pause),
            "Resume": M(api.ResumeRequest, self.resume),
            "Checkpoint": M(api.CheckpointTaskRequest, self.checkpoint),
            "Kill": M(api.KillRequest, self.kill),
            "Exec": M(api.ExecProcessRequest, self.exec),
            "ResizePty": M(api.ResizePtyRequest, self.resize_pty),
            "CloseIO": M(api.CloseIORequest, self.close_io),
            "Update": M(api.UpdateTaskRequest, self.update),
            "Wait": M(api.WaitRequest, self.wait),
            "Stats": M(api.StatsRequest, self.stats),
            "Connect": M(api.ConnectRequest, self.connect),
            "Shutdown": M(api.ShutdownRequest, self.shutdown),
        })

    async def create(self, req: api.CreateTaskRequest, ctx: ttrpc.Context) -> api.CreateTaskResponse:
        container = await self.core.create(
            req.id, bundle=req.bundle, rootfs=req.rootfs,
            stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
            options=(req.options.type_url, req.options.value),
            checkpoint=req.checkpoint, parent_checkpoint=req.parent_checkpoint,
        )
        return api.CreateTaskResponse(pid=container.init.pid)

    async def start(self, req: api.StartRequest, ctx: ttrpc.Context) -> api.StartResponse:
        proc = await self.core.start(req.id, req.exec_id)
        return api.StartResponse(pid=proc.pid)

    async def state(self, req: api.StateRequest, ctx: ttrpc.Context) -> api.StateResponse:
        container = self.core.container(req.id)
        proc = container.process(req.exec_id)
        s = proc.stdio
        resp = api.StateResponse(
            id=proc.id, bundle=container.bundle, pid=proc.pid, status=cast(Any, int(proc.state)),
            stdin=s.stdin, stdout=s.stdout, stderr=s.stderr, terminal=s.terminal,
            exit_status=proc.exit_status, exec_id=proc.exec_id,
        )
        _stamp_exit(resp, proc)
        return resp

    async def pids(self, req: api.PidsRequest, ctx: ttrpc.Context) -> api.PidsResponse:
        resp = api.PidsResponse()
        for pid, exec_id in await self.core.pids(req.id):
            info = resp.processes.add(pid=pid)
            if exec_id:  # as containerd's runc shim: an exec's pid carries its exec id
                from ketch.api.containerd.runc.options import oci_pb2

                details = oci_pb2.ProcessDetails(exec_id=exec_id)
                info.info.type_url = details.DESCRIPTOR.full_name
                info.info.value = details.SerializeToString()
        return resp

    async def stats(self, req: api.StatsRequest, ctx: ttrpc.Context) -> api.StatsResponse:
        resp = api.StatsResponse()
        resp.stats.type_url, resp.stats.value = self.core.stats(req.id)
        return resp

    async def connect(self, req: api.ConnectRequest, ctx: ttrpc.Context) -> api.ConnectResponse:
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=self.core.task_pid(req.id), version=__version__)

    async def wait(self, req: api.WaitRequest, ctx: ttrpc.Context) -> api.WaitResponse:
        proc = await self.core.wait(req.id, req.exec_id)
        resp = api.WaitResponse(exit_status=proc.exit_status)
        _stamp_exit(resp, proc)
        return resp

    async def kill(self, req: api.KillRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        await self.core.kill(req.id, req.exec_id, req.signal, all=req.all)
        return _EMPTY()

    async def pause(self, req: api.PauseRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        await self.core.pause(req.id)
        return _EMPTY()

    async def resume(self, req: api.ResumeRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        await self.core.resume(req.id)
        return _EMPTY()

    async def exec(self, req: api.ExecProcessRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        self.core.exec(req.id, req.exec_id, stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
                       spec=req.spec.value)
        return _EMPTY()

    async def resize_pty(self, req: api.ResizePtyRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        self.core.resize(req.id, req.exec_id, req.width, req.height)
        return _EMPTY()

    async def close_io(self, req: api.CloseIORequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        self.core.close_io(req.id, req.exec_id, stdin=req.stdin)
        return _EMPTY()

    async def update(self, req: api.UpdateTaskRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        await self.core.update(req.id, req.resources.value)
        return _EMPTY()

    async def checkpoint(self, req: api.CheckpointTaskRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        await self.core.checkpoint(req.id, req.path, (req.options.type_url, req.options.value))
        return _EMPTY()

    async def delete(self, req: api.DeleteRequest, ctx: ttrpc.Context) -> api.DeleteResponse:
        proc = await self.core.delete(req.id, req.exec_id)
        resp = api.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        _stamp_exit(resp, proc)
        return resp

    async def shutdown(self, req: api.ShutdownRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        self.core.shutdown(now=req.now, named=bool(req.id))
        return _EMPTY()
