"""containerd.services.tasks.v1.Tasks over the runtime's TaskManager."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from google.protobuf import empty_pb2

from ketch import errdefs, filters, metadata
from ketch.api.containerd.services.tasks.v1 import tasks_pb2 as api
from ketch.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types import metrics_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.runtime.manager import CreateOptions, TaskManager
from ketch.services._common import namespace, unary


class Tasks(tasks_pb2_grpc.TasksServicer):
    def __init__(self, manager: TaskManager, containers: Callable[[str, str], metadata.Container]) -> None:
        self.manager = manager
        self.containers = containers

    @unary
    async def Create(self, request: api.CreateTaskRequest, context: grpc.aio.ServicerContext) -> api.CreateTaskResponse:
        ns = namespace(context)
        container = self.containers(ns, request.container_id)
        if self.manager.exists(ns, request.container_id):
            raise errdefs.AlreadyExists(f"task {request.container_id}")
        if container.spec is None:
            raise errdefs.FailedPrecondition(f"container {request.container_id!r} has no spec")
        if request.checkpoint.digest:
            raise errdefs.Unimplemented("creating a task from a checkpoint is not supported yet")
        options = None
        if request.options.type_url:
            options = (request.options.type_url, request.options.value)
        elif container.runtime.options is not None:
            options = (container.runtime.options.type_url, container.runtime.options.value)
        runtime = request.runtime_path or container.runtime.name
        task = await self.manager.create(ns, request.container_id, CreateOptions(
            runtime=runtime, spec=container.spec.value, options=options, rootfs=request.rootfs,
            stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal))
        return api.CreateTaskResponse(container_id=request.container_id, pid=task.pid)

    @unary
    async def Start(self, request: api.StartRequest, context: grpc.aio.ServicerContext) -> api.StartResponse:
        task = self.manager.get(namespace(context), request.container_id)
        resp = await self.manager.call(task, "Start", shim_pb2.StartRequest(id=task.id, exec_id=request.exec_id),
                                       shim_pb2.StartResponse)
        return api.StartResponse(pid=resp.pid)

    @unary
    async def Delete(self, request: api.DeleteTaskRequest, context: grpc.aio.ServicerContext) -> api.DeleteResponse:
        pid, status, exited_at = await self.manager.delete(namespace(context), request.container_id)
        resp = api.DeleteResponse(id=request.container_id, pid=pid, exit_status=status)
        resp.exited_at.FromNanoseconds(int(exited_at * 1e9))
        return resp

    @unary
    async def DeleteProcess(self, request: api.DeleteProcessRequest,
                            context: grpc.aio.ServicerContext) -> api.DeleteResponse:
        if not request.exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        task = self.manager.get(namespace(context), request.container_id)
        r = await self.manager.call(task, "Delete", shim_pb2.DeleteRequest(id=task.id, exec_id=request.exec_id),
                                    shim_pb2.DeleteResponse)
        return api.DeleteResponse(id=request.exec_id, pid=r.pid, exit_status=r.exit_status, exited_at=r.exited_at)

    @unary
    async def Get(self, request: api.GetRequest, context: grpc.aio.ServicerContext) -> api.GetResponse:
        task = self.manager.get(namespace(context), request.container_id)
        return api.GetResponse(process=await self.manager.state(task, request.exec_id))

    @unary
    async def List(self, request: api.ListTasksRequest, context: grpc.aio.ServicerContext) -> api.ListTasksResponse:
        tasks = self.manager.list(namespace(context))
        states = await asyncio.gather(*(self.manager.state(t) for t in tasks), return_exceptions=True)
        match = filters.parse([request.filter] if request.filter else [])
        resp = api.ListTasksResponse()
        for state in states:
            if isinstance(state, BaseException):
                continue  # a shim that vanished mid-list is buried and listed next time
            if match.match(filters.adaptor_for({"id": state.id, "container_id": state.container_id,
                                                "status": task_types.Status.Name(state.status).lower()})):
                resp.tasks.append(state)
        return resp

    @unary
    async def Kill(self, request: api.KillRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "Kill", shim_pb2.KillRequest(
            id=task.id, exec_id=request.exec_id, signal=request.signal, all=request.all), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def Exec(self, request: api.ExecProcessRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        if not request.exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "Exec", shim_pb2.ExecProcessRequest(
            id=task.id, exec_id=request.exec_id, terminal=request.terminal, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr, spec=request.spec), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def ResizePty(self, request: api.ResizePtyRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "ResizePty", shim_pb2.ResizePtyRequest(
            id=task.id, exec_id=request.exec_id, width=request.width, height=request.height), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def CloseIO(self, request: api.CloseIORequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "CloseIO", shim_pb2.CloseIORequest(
            id=task.id, exec_id=request.exec_id, stdin=request.stdin), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def Pause(self, request: api.PauseTaskRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "Pause", shim_pb2.PauseRequest(id=task.id), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def Resume(self, request: api.ResumeTaskRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "Resume", shim_pb2.ResumeRequest(id=task.id), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def ListPids(self, request: api.ListPidsRequest, context: grpc.aio.ServicerContext) -> api.ListPidsResponse:
        task = self.manager.get(namespace(context), request.container_id)
        r = await self.manager.call(task, "Pids", shim_pb2.PidsRequest(id=task.id), shim_pb2.PidsResponse)
        return api.ListPidsResponse(processes=r.processes)

    @unary
    async def Checkpoint(self, request: api.CheckpointTaskRequest,
                         context: grpc.aio.ServicerContext) -> api.CheckpointTaskResponse:
        self.manager.get(namespace(context), request.container_id)
        raise errdefs.Unimplemented(f"checkpoint of task {request.container_id}: not supported by ketchd yet")

    @unary
    async def Update(self, request: api.UpdateTaskRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        task = self.manager.get(namespace(context), request.container_id)
        await self.manager.call(task, "Update", shim_pb2.UpdateTaskRequest(
            id=task.id, resources=request.resources, annotations=request.annotations), empty_pb2.Empty)
        return empty_pb2.Empty()

    @unary
    async def Metrics(self, request: api.MetricsRequest, context: grpc.aio.ServicerContext) -> api.MetricsResponse:
        match = filters.parse(list(request.filters))
        tasks = [t for t in self.manager.list(namespace(context))
                 if t.tombstone is None and match.match(filters.adaptor_for({"id": t.id, "runtime": t.runtime}))]
        stats = await asyncio.gather(*(self.manager.call(t, "Stats", shim_pb2.StatsRequest(id=t.id),
                                                         shim_pb2.StatsResponse) for t in tasks),
                                     return_exceptions=True)
        resp = api.MetricsResponse()
        now = time.time_ns()
        for task, stat in zip(tasks, stats):
            if isinstance(stat, BaseException):
                if len(tasks) == 1 and isinstance(stat, errdefs.KetchError):
                    raise stat
                continue
            metric = metrics_pb2.Metric(id=task.id, data=stat.stats)
            metric.timestamp.FromNanoseconds(now)
            resp.metrics.append(metric)
        return resp

    @unary
    async def Wait(self, request: api.WaitRequest, context: grpc.aio.ServicerContext) -> api.WaitResponse:
        task = self.manager.get(namespace(context), request.container_id)
        status, exited_at = await self.manager.wait(task, request.exec_id)
        resp = api.WaitResponse(exit_status=status)
        resp.exited_at.FromNanoseconds(int(exited_at * 1e9))
        return resp

