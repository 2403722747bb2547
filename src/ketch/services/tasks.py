"""containerd.services.tasks.v1.Tasks: decode, call the runtime's tasks, encode."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import grpc
from google.protobuf import empty_pb2

from ketch import metadata, timestamps
from ketch.api.containerd.services.tasks.v1 import tasks_pb2 as api, tasks_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2
from ketch.runtime import CreateOptions, Exit, Stdio, TaskManager
from ketch.runtime.checkpoint import Checkpoints, Descriptor
from ketch.services._common import lease_of, namespace, unary

Context: TypeAlias = grpc.aio.ServicerContext
EMPTY = empty_pb2.Empty()


def _deleted(id: str, ended: Exit) -> api.DeleteResponse:
    return api.DeleteResponse(id=id, pid=ended.pid, exit_status=ended.status,
                              exited_at=timestamps.timestamp(ended.exited_at))


class Tasks(tasks_pb2_grpc.TasksServicer):
    def __init__(self, tasks: TaskManager, containers: Callable[[str, str], metadata.Container],
                 checkpoints: Checkpoints) -> None:
        self.tasks = tasks
        self.containers = containers
        self.checkpoints = checkpoints

    @unary
    async def Create(self, request: api.CreateTaskRequest, context: Context) -> api.CreateTaskResponse:
        ns = namespace(context)
        container = self.containers(ns, request.container_id)
        options = (request.options.type_url, request.options.value) if request.options.type_url else None
        checkpoint = None
        if request.HasField("checkpoint"):
            d = request.checkpoint
            checkpoint = Descriptor(d.media_type, d.digest, d.size)
        path, unpack = await self.checkpoints.restore_source(ns, container, checkpoint, options)
        task = await self.tasks.create(ns, container, CreateOptions(
            stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal), rootfs=request.rootfs,
            options=options, runtime_path=request.runtime_path, checkpoint=path, unpack=unpack))
        return api.CreateTaskResponse(container_id=task.id, pid=task.pid)

    @unary
    async def Start(self, request: api.StartRequest, context: Context) -> api.StartResponse:
        return api.StartResponse(pid=await self.tasks.get(namespace(context), request.container_id).start(
            request.exec_id))

    @unary
    async def Delete(self, request: api.DeleteTaskRequest, context: Context) -> api.DeleteResponse:
        return _deleted(request.container_id, await self.tasks.delete(namespace(context), request.container_id))

    @unary
    async def DeleteProcess(self, request: api.DeleteProcessRequest, context: Context) -> api.DeleteResponse:
        task = self.tasks.get(namespace(context), request.container_id)
        return _deleted(request.exec_id, await task.delete_process(request.exec_id))

    @unary
    async def Get(self, request: api.GetRequest, context: Context) -> api.GetResponse:
        task = self.tasks.get(namespace(context), request.container_id)
        return api.GetResponse(process=await task.state(request.exec_id))

    @unary
    async def List(self, request: api.ListTasksRequest, context: Context) -> api.ListTasksResponse:
        return api.ListTasksResponse(tasks=await self.tasks.processes(namespace(context), request.filter))

    @unary
    async def Kill(self, request: api.KillRequest, context: Context) -> empty_pb2.Empty:
        task = self.tasks.get(namespace(context), request.container_id)
        await task.kill(request.signal, all=request.all, exec_id=request.exec_id)
        return EMPTY

    @unary
    async def Exec(self, request: api.ExecProcessRequest, context: Context) -> empty_pb2.Empty:
        task = self.tasks.get(namespace(context), request.container_id)
        await task.exec(request.exec_id, request.spec,
                        Stdio(request.stdin, request.stdout, request.stderr, request.terminal))
        return EMPTY

    @unary
    async def ResizePty(self, request: api.ResizePtyRequest, context: Context) -> empty_pb2.Empty:
        task = self.tasks.get(namespace(context), request.container_id)
        await task.resize(request.width, request.height, exec_id=request.exec_id)
        return EMPTY

    @unary
    async def CloseIO(self, request: api.CloseIORequest, context: Context) -> empty_pb2.Empty:
        task = self.tasks.get(namespace(context), request.container_id)
        await task.close_io(request.stdin, exec_id=request.exec_id)
        return EMPTY

    @unary
    async def Pause(self, request: api.PauseTaskRequest, context: Context) -> empty_pb2.Empty:
        await self.tasks.get(namespace(context), request.container_id).pause()
        return EMPTY

    @unary
    async def Resume(self, request: api.ResumeTaskRequest, context: Context) -> empty_pb2.Empty:
        await self.tasks.get(namespace(context), request.container_id).resume()
        return EMPTY

    @unary
    async def ListPids(self, request: api.ListPidsRequest, context: Context) -> api.ListPidsResponse:
        return api.ListPidsResponse(processes=await self.tasks.get(namespace(context), request.container_id).pids())

    @unary
    async def Checkpoint(self, request: api.CheckpointTaskRequest, context: Context) -> api.CheckpointTaskResponse:
        ns = namespace(context)
        container = self.containers(ns, request.container_id)
        options = (request.options.type_url, request.options.value) if request.options.type_url else None
        written = await self.checkpoints.checkpoint(ns, container, self.tasks.get(ns, request.container_id), options,
                                                    lease=lease_of(context))
        return api.CheckpointTaskResponse(descriptors=[
            descriptor_pb2.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size) for d in written])

    @unary
    async def Update(self, request: api.UpdateTaskRequest, context: Context) -> empty_pb2.Empty:
        task = self.tasks.get(namespace(context), request.container_id)
        await task.update(request.resources, dict(request.annotations))
        return EMPTY

    @unary
    async def Metrics(self, request: api.MetricsRequest, context: Context) -> api.MetricsResponse:
        return api.MetricsResponse(metrics=await self.tasks.metrics(namespace(context), request.filters))

    @unary
    async def Wait(self, request: api.WaitRequest, context: Context) -> api.WaitResponse:
        ended = await self.tasks.get(namespace(context), request.container_id).wait(request.exec_id)
        return api.WaitResponse(exit_status=ended.status, exited_at=timestamps.timestamp(ended.exited_at))
