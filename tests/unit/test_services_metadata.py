"""The Namespaces and Containers servicers in-process (grpc.aio) over a real SQLite store:
containerd's codes, and the events the core publishes for each change."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ketch import topics
from ketch.api.containerd.services.containers.v1 import containers_pb2 as capi
from ketch.api.containerd.services.containers.v1 import containers_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2 as napi
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
from ketch.metadata import Store
from ketch.metadata.local import ContainerService, NamespaceService
from ketch.services.metadata import Containers, Namespaces
from ketch.testing.channel import channel_for

NS = [("containerd-namespace", "team")]
Body = Callable[[namespace_pb2_grpc.NamespacesStub, containers_pb2_grpc.ContainersStub, list[tuple[str, str]],
                 set[str]], Awaitable[None]]


def run(tmp_path: Path, body: Body) -> None:
    async def main() -> None:
        events: list[tuple[str, str]] = []
        tasks: set[str] = set()

        def publish(ns: str, event: Any) -> None:
            events.append((ns, topics.of(event)))

        with Store(tmp_path / "meta.db") as store:
            def register(server: grpc.aio.Server) -> None:
                namespace_pb2_grpc.add_NamespacesServicer_to_server(
                    Namespaces(NamespaceService(store, publish)), server)
                containers_pb2_grpc.add_ContainersServicer_to_server(
                    Containers(ContainerService(store, publish, lambda ns, id: id in tasks)), server)

            async with asyncio.timeout(10), channel_for(register) as ch:
                await body(namespace_pb2_grpc.NamespacesStub(ch), containers_pb2_grpc.ContainersStub(ch), events,
                           tasks)

    asyncio.run(main())


def container(id: str, spec: bytes = b"{}") -> capi.Container:
    c = capi.Container(id=id, labels={"tier": "web"})
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url, c.spec.value = "types.containerd.io/opencontainers/runtime-spec/1/Spec", spec
    return c


async def code(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


def test_namespaces(tmp_path: Path) -> None:
    async def body(nss: namespace_pb2_grpc.NamespacesStub, cs: containers_pb2_grpc.ContainersStub,
                   events: list[tuple[str, str]], tasks: set[str]) -> None:
        # a namespace nobody has used answers as an empty one (dockerd relies on it)
        assert (await nss.Get(napi.GetNamespaceRequest(name="fresh"))).namespace.name == "fresh"
        assert await code(nss.Get(napi.GetNamespaceRequest(name="../x"))) == grpc.StatusCode.INVALID_ARGUMENT
        await nss.Create(napi.CreateNamespaceRequest(namespace=napi.Namespace(name="team", labels={"a": "1"})))
        assert await code(nss.Create(napi.CreateNamespaceRequest(namespace=napi.Namespace(name="team")))) == \
            grpc.StatusCode.ALREADY_EXISTS
        await nss.Update(napi.UpdateNamespaceRequest(namespace=napi.Namespace(name="team", labels={"a": "2"})))
        listed = await nss.List(napi.ListNamespacesRequest())
        assert [(n.name, dict(n.labels)) for n in listed.namespaces] == [("team", {"a": "2"})]
        await cs.Create(capi.CreateContainerRequest(container=container("c1")), metadata=NS)
        assert await code(nss.Delete(napi.DeleteNamespaceRequest(name="team"))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        await cs.Delete(capi.DeleteContainerRequest(id="c1"), metadata=NS)
        await nss.Delete(napi.DeleteNamespaceRequest(name="team"))
        assert events == [("team", "/namespaces/create"), ("team", "/namespaces/update"),
                          ("team", "/containers/create"), ("team", "/containers/delete"),
                          ("team", "/namespaces/delete")]

    run(tmp_path, body)


def test_containers(tmp_path: Path) -> None:
    async def body(nss: namespace_pb2_grpc.NamespacesStub, cs: containers_pb2_grpc.ContainersStub,
                   events: list[tuple[str, str]], tasks: set[str]) -> None:
        created = (await cs.Create(capi.CreateContainerRequest(container=container("web")), metadata=NS)).container
        assert created.created_at.seconds > 0 and created.runtime.name == "io.containerd.runc.v2"
        assert await code(cs.Create(capi.CreateContainerRequest(container=container("bad", b"[1]")),
                                    metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await code(cs.Create(capi.CreateContainerRequest(container=container("worse", b"{")),
                                    metadata=NS)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await code(cs.Get(capi.GetContainerRequest(id="web"))) == grpc.StatusCode.FAILED_PRECONDITION
        updated = container("web")
        updated.labels["tier"] = "db"
        await cs.Update(capi.UpdateContainerRequest(container=updated, update_mask={"paths": ["labels"]}),
                        metadata=NS)
        found = await cs.List(capi.ListContainersRequest(filters=["labels.tier==db"]), metadata=NS)
        assert [c.id for c in found.containers] == ["web"]
        tasks.add("web")
        assert await code(cs.Delete(capi.DeleteContainerRequest(id="web"), metadata=NS)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert await code(cs.Delete(capi.DeleteContainerRequest(id="ghost"), metadata=NS)) == \
            grpc.StatusCode.NOT_FOUND
        tasks.clear()
        await cs.Delete(capi.DeleteContainerRequest(id="web"), metadata=NS)
        assert [t for _, t in events] == ["/containers/create", "/containers/update", "/containers/delete"]
        assert json.loads(created.spec.value) == {}

    run(tmp_path, body)
