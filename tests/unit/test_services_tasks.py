"""The Tasks servicer in-process (grpc.aio), over the real runtime and shims served in memory:
what a gRPC client sees — responses and containerd's status codes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ketch import errdefs, topics
from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.tasks.v1 import tasks_pb2 as api
from ketch.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from ketch.metadata import Container
from ketch.metadata.types import Runtime, TypedValue
from ketch.content import ContentStore
from ketch.metadata import Store
from ketch.runtime import TaskManager
from ketch.runtime.checkpoint import Checkpoints
from ketch.services.tasks import Tasks
from ketch.testing.channel import channel_for
from ketch.testing.fakeshim import FakeLauncher

SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}")
NS = [("containerd-namespace", "ns1")]


def run(tmp_path: Path, body: Callable[[tasks_pb2_grpc.TasksStub, list[Any]], Awaitable[None]]) -> None:
    # a criu that is not there: checkpoints are FailedPrecondition (test_checkpoint.py has the rest)
    no_criu = oci_pb2.Options(criu_path=str(tmp_path / "no-criu")).SerializeToString()
    runtime = Runtime("io.containerd.ketch.v2", TypedValue("containerd.runc.v1.Options", no_criu))
    containers = {("ns1", c): Container(c, runtime=runtime, spec=SPEC) for c in ("web", "db")}

    def lookup(ns: str, id: str) -> Container:
        if (ns, id) not in containers:
            raise errdefs.NotFound(f"container \"{id}\" in namespace \"{ns}\": not found")
        return containers[(ns, id)]

    async def main() -> None:
        events: list[Any] = []
        manager = TaskManager(state=str(tmp_path / "s"), root=str(tmp_path / "r"), launcher=FakeLauncher(),
                              publish=lambda ns, e: events.append(topics.of(e)))
        with Store(tmp_path / "meta.db") as store:
            checkpoints = Checkpoints(ContentStore(tmp_path / "content", store), manager.publish)
            try:
                async with asyncio.timeout(10), channel_for(lambda server: tasks_pb2_grpc.add_TasksServicer_to_server(
                        Tasks(manager, lookup, checkpoints), server)) as ch:
                    await body(tasks_pb2_grpc.TasksStub(ch), events)
            finally:
                await manager.close()

    asyncio.run(main())


async def code(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


def test_lifecycle_over_grpc(tmp_path: Path) -> None:
    async def body(tasks: tasks_pb2_grpc.TasksStub, events: list[Any]) -> None:
        created = await tasks.Create(api.CreateTaskRequest(container_id="web", stdout="/o"), metadata=NS)
        assert created.container_id == "web" and created.pid > 0
        assert (await tasks.Start(api.StartRequest(container_id="web"), metadata=NS)).pid == created.pid
        got = await tasks.Get(api.GetRequest(container_id="web"), metadata=NS)
        assert (got.process.id, got.process.pid, got.process.status) == ("web", created.pid, 2)
        listed = await tasks.List(api.ListTasksRequest(filter="status==running"), metadata=NS)
        assert [t.id for t in listed.tasks] == ["web"]
        assert (await tasks.ListPids(api.ListPidsRequest(container_id="web"), metadata=NS)).processes[0].pid == \
            created.pid
        assert [m.id for m in (await tasks.Metrics(api.MetricsRequest(filters=["id==web"]), metadata=NS)).metrics] == \
            ["web"]
        wait = tasks.Wait(api.WaitRequest(container_id="web"), metadata=NS)
        await tasks.Kill(api.KillRequest(container_id="web", signal=signal.SIGTERM), metadata=NS)
        assert (await wait).exit_status == 128 + signal.SIGTERM
        deleted = await tasks.Delete(api.DeleteTaskRequest(container_id="web"), metadata=NS)
        assert (deleted.id, deleted.pid, deleted.exit_status) == ("web", created.pid, 143)
        assert deleted.exited_at.seconds > 0

    run(tmp_path, body)


def test_status_codes(tmp_path: Path) -> None:
    async def body(tasks: tasks_pb2_grpc.TasksStub, events: list[Any]) -> None:
        nf = grpc.StatusCode.NOT_FOUND
        assert await code(tasks.Create(api.CreateTaskRequest(container_id="nope"), metadata=NS)) == nf
        assert await code(tasks.Start(api.StartRequest(container_id="web"), metadata=NS)) == nf
        assert await code(tasks.Create(api.CreateTaskRequest(container_id="web"))) == \
            grpc.StatusCode.FAILED_PRECONDITION  # no namespace
        await tasks.Create(api.CreateTaskRequest(container_id="web"), metadata=NS)
        assert await code(tasks.Create(api.CreateTaskRequest(container_id="web"), metadata=NS)) == \
            grpc.StatusCode.ALREADY_EXISTS
        assert await code(tasks.Exec(api.ExecProcessRequest(container_id="web"), metadata=NS)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert await code(tasks.DeleteProcess(api.DeleteProcessRequest(container_id="web"), metadata=NS)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        await tasks.Start(api.StartRequest(container_id="web"), metadata=NS)
        assert await code(tasks.Delete(api.DeleteTaskRequest(container_id="web"), metadata=NS)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert await code(tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=NS)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert await code(tasks.Get(api.GetRequest(container_id="web", exec_id="x"), metadata=NS)) == nf
        assert await code(tasks.Create(api.CreateTaskRequest(container_id="db", runtime_path="relative/shim"),
                                       metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
        assert events == [], "the fake shim publishes nothing; the runtime only for dead shims"

    run(tmp_path, body)
