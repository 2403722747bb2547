"""Namespaces, Containers and Leases: the metadata services, over ketch.metadata.Store.

Each method decodes, calls the core (``ketch.metadata.local`` for namespaces and containers,
which applies containerd's rules and publishes its events; the store for leases), and encodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2, empty_pb2

from ketch import metadata, timestamps
from ketch.api.containerd.services.containers.v1 import containers_pb2 as capi
from ketch.api.containerd.services.containers.v1 import containers_pb2_grpc
from ketch.api.containerd.services.leases.v1 import leases_pb2 as lapi
from ketch.api.containerd.services.leases.v1 import leases_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2 as napi
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
from ketch.metadata.local import ContainerService, NamespaceService
from ketch.services._common import namespace, stream, unary

if TYPE_CHECKING:
    from ketch.gc import Collector



# -- conversions ------------------------------------------------------------------------------

def _typed(a: any_pb2.Any) -> metadata.TypedValue | None:
    return metadata.TypedValue(a.type_url, a.value) if a.type_url or a.value else None


def _any(v: metadata.TypedValue | None) -> any_pb2.Any:
    return any_pb2.Any(type_url=v.type_url, value=v.value) if v is not None else any_pb2.Any()


def container_from_proto(c: capi.Container) -> metadata.Container:
    return metadata.Container(
        id=c.id, labels=dict(c.labels), image=c.image,
        runtime=metadata.Runtime(c.runtime.name, _typed(c.runtime.options)),
        spec=_typed(c.spec) if c.HasField("spec") else None,
        snapshotter=c.snapshotter, snapshot_key=c.snapshot_key,
        extensions={k: metadata.TypedValue(v.type_url, v.value) for k, v in c.extensions.items()})


def container_to_proto(c: metadata.Container) -> capi.Container:
    out = capi.Container(id=c.id, labels=c.labels, image=c.image, snapshotter=c.snapshotter,
                         snapshot_key=c.snapshot_key)
    out.runtime.name = c.runtime.name
    if c.runtime.options is not None:
        out.runtime.options.CopyFrom(_any(c.runtime.options))
    if c.spec is not None:
        out.spec.CopyFrom(_any(c.spec))
    timestamps.stamp(out.created_at, c.created_at)
    timestamps.stamp(out.updated_at, c.updated_at)
    for k, v in c.extensions.items():
        out.extensions[k].CopyFrom(_any(v))
    return out


# -- services -----------------------------------------------------------------------------------

class Namespaces(namespace_pb2_grpc.NamespacesServicer):
    def __init__(self, namespaces: NamespaceService) -> None:
        self.namespaces = namespaces

    @unary
    async def Get(self, request: napi.GetNamespaceRequest, context: grpc.aio.ServicerContext) -> napi.GetNamespaceResponse:
        return napi.GetNamespaceResponse(namespace=_namespace(self.namespaces.get(request.name)))

    @unary
    async def List(self, request: napi.ListNamespacesRequest,
                   context: grpc.aio.ServicerContext) -> napi.ListNamespacesResponse:
        return napi.ListNamespacesResponse(namespaces=[_namespace(n) for n in self.namespaces.list()])

    @unary
    async def Create(self, request: napi.CreateNamespaceRequest,
                     context: grpc.aio.ServicerContext) -> napi.CreateNamespaceResponse:
        ns = self.namespaces.create(request.namespace.name, dict(request.namespace.labels))
        return napi.CreateNamespaceResponse(namespace=_namespace(ns))

    @unary
    async def Update(self, request: napi.UpdateNamespaceRequest,
                     context: grpc.aio.ServicerContext) -> napi.UpdateNamespaceResponse:
        ns = self.namespaces.update(request.namespace.name, dict(request.namespace.labels),
                                    list(request.update_mask.paths))
        return napi.UpdateNamespaceResponse(namespace=_namespace(ns))

    @unary
    async def Delete(self, request: napi.DeleteNamespaceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.namespaces.delete(request.name)
        return empty_pb2.Empty()


class Containers(containers_pb2_grpc.ContainersServicer):
    def __init__(self, containers: ContainerService) -> None:
        self.containers = containers

    @unary
    async def Get(self, request: capi.GetContainerRequest, context: grpc.aio.ServicerContext) -> capi.GetContainerResponse:
        c = self.containers.get(namespace(context), request.id)
        return capi.GetContainerResponse(container=container_to_proto(c))

    @unary
    async def List(self, request: capi.ListContainersRequest,
                   context: grpc.aio.ServicerContext) -> capi.ListContainersResponse:
        found = self.containers.list(namespace(context), list(request.filters))
        return capi.ListContainersResponse(containers=[container_to_proto(c) for c in found])

    @stream
    async def ListStream(self, request: capi.ListContainersRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[capi.ListContainerMessage]:
        for c in self.containers.list(namespace(context), list(request.filters)):
            yield capi.ListContainerMessage(container=container_to_proto(c))

    @unary
    async def Create(self, request: capi.CreateContainerRequest,
                     context: grpc.aio.ServicerContext) -> capi.CreateContainerResponse:
        c = self.containers.create(namespace(context), container_from_proto(request.container))
        return capi.CreateContainerResponse(container=container_to_proto(c))

    @unary
    async def Update(self, request: capi.UpdateContainerRequest,
                     context: grpc.aio.ServicerContext) -> capi.UpdateContainerResponse:
        c = self.containers.update(namespace(context), container_from_proto(request.container),
                                   list(request.update_mask.paths))
        return capi.UpdateContainerResponse(container=container_to_proto(c))

    @unary
    async def Delete(self, request: capi.DeleteContainerRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.containers.delete(namespace(context), request.id)
        return empty_pb2.Empty()


def _namespace(ns: metadata.Namespace) -> napi.Namespace:
    return napi.Namespace(name=ns.name, labels=ns.labels)


def _lease(lease: metadata.Lease) -> lapi.Lease:
    return lapi.Lease(id=lease.id, labels=lease.labels, created_at=timestamps.timestamp(lease.created_at))


class Leases(leases_pb2_grpc.LeasesServicer):
    def __init__(self, store: metadata.Store, collector: Collector) -> None:
        self.store = store
        self.collector = collector

    @unary
    async def Create(self, request: lapi.CreateRequest, context: grpc.aio.ServicerContext) -> lapi.CreateResponse:
        lease = self.store.leases.create(namespace(context), request.id, dict(request.labels))
        return lapi.CreateResponse(lease=_lease(lease))

    @unary
    async def Delete(self, request: lapi.DeleteRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.store.leases.delete(namespace(context), request.id)
        await self.collector.after_delete(request.sync)
        return empty_pb2.Empty()

    @unary
    async def List(self, request: lapi.ListRequest, context: grpc.aio.ServicerContext) -> lapi.ListResponse:
        leases = self.store.leases.list(namespace(context), list(request.filters))
        return lapi.ListResponse(leases=[_lease(lease) for lease in leases])

    @unary
    async def AddResource(self, request: lapi.AddResourceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.store.leases.add_resource(namespace(context), request.id,
                                       metadata.LeaseResource(request.resource.id, request.resource.type))
        return empty_pb2.Empty()

    @unary
    async def DeleteResource(self, request: lapi.DeleteResourceRequest,
                             context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.store.leases.delete_resource(namespace(context), request.id,
                                          metadata.LeaseResource(request.resource.id, request.resource.type))
        return empty_pb2.Empty()

    @unary
    async def ListResources(self, request: lapi.ListResourcesRequest,
                            context: grpc.aio.ServicerContext) -> lapi.ListResourcesResponse:
        resources = self.store.leases.list_resources(namespace(context), request.id)
        return lapi.ListResourcesResponse(resources=[lapi.Resource(id=r.id, type=r.type) for r in resources])
