"""Namespaces, Containers and Leases: the metadata services, over ketch.metadata.Store.

Each method decodes, calls the store, publishes the event containerd publishes for that
change (/namespaces/*, /containers/*), and encodes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, empty_pb2

from ketch import errdefs, identifiers, metadata
from ketch.topics import Publish
from ketch.api.containerd.events import container_pb2 as container_events
from ketch.api.containerd.events import namespace_pb2 as namespace_events
from ketch.api.containerd.services.containers.v1 import containers_pb2 as capi
from ketch.api.containerd.services.containers.v1 import containers_pb2_grpc
from ketch.api.containerd.services.leases.v1 import leases_pb2 as lapi
from ketch.api.containerd.services.leases.v1 import leases_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2 as napi
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
from ketch.services._common import namespace, stream, unary



# -- conversions ------------------------------------------------------------------------------

def _typed(a: any_pb2.Any) -> metadata.TypedValue | None:
    return metadata.TypedValue(a.type_url, a.value) if a.type_url or a.value else None


def _any(v: metadata.TypedValue | None) -> any_pb2.Any:
    return any_pb2.Any(type_url=v.type_url, value=v.value) if v is not None else any_pb2.Any()


def _check_spec(c: capi.Container) -> None:
    """A container's spec must be an OCI runtime spec in JSON, as every containerd client
    stores it: refuse anything else before it is recorded."""
    if not c.HasField("spec"):
        return  # the store reports a missing spec in containerd's words
    try:
        spec = json.loads(c.spec.value)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"container.Spec of {c.id!r} is not a JSON OCI spec: {e}") from None
    if not isinstance(spec, dict):
        raise errdefs.InvalidArgument(f"container.Spec of {c.id!r} is not a JSON object")


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
    out.created_at.FromNanoseconds(int(c.created_at * 1e9))
    out.updated_at.FromNanoseconds(int(c.updated_at * 1e9))
    for k, v in c.extensions.items():
        out.extensions[k].CopyFrom(_any(v))
    return out


# -- services -----------------------------------------------------------------------------------

class Namespaces(namespace_pb2_grpc.NamespacesServicer):
    def __init__(self, store: metadata.Store, publish: Publish) -> None:
        self.store = store
        self.publish = publish

    @unary
    async def Get(self, request: napi.GetNamespaceRequest, context: grpc.aio.ServicerContext) -> napi.GetNamespaceResponse:
        try:
            ns = self.store.namespaces.get(request.name)
            labels = ns.labels
        except errdefs.NotFound:
            # a namespace no one has used yet exists, empty (dockerd relies on this at start)
            identifiers.validate(request.name)
            labels = {}
        return napi.GetNamespaceResponse(namespace=napi.Namespace(name=request.name, labels=labels))

    @unary
    async def List(self, request: napi.ListNamespacesRequest,
                   context: grpc.aio.ServicerContext) -> napi.ListNamespacesResponse:
        return napi.ListNamespacesResponse(
            namespaces=[napi.Namespace(name=n.name, labels=n.labels) for n in self.store.namespaces.list()])

    @unary
    async def Create(self, request: napi.CreateNamespaceRequest,
                     context: grpc.aio.ServicerContext) -> napi.CreateNamespaceResponse:
        ns = self.store.namespaces.create(request.namespace.name, dict(request.namespace.labels))
        self.publish(ns.name, namespace_events.NamespaceCreate(name=ns.name, labels=ns.labels))
        return napi.CreateNamespaceResponse(namespace=napi.Namespace(name=ns.name, labels=ns.labels))

    @unary
    async def Update(self, request: napi.UpdateNamespaceRequest,
                     context: grpc.aio.ServicerContext) -> napi.UpdateNamespaceResponse:
        ns = self.store.namespaces.update(request.namespace.name, dict(request.namespace.labels),
                                          list(request.update_mask.paths))
        self.publish(ns.name, namespace_events.NamespaceUpdate(name=ns.name, labels=ns.labels))
        return napi.UpdateNamespaceResponse(namespace=napi.Namespace(name=ns.name, labels=ns.labels))

    @unary
    async def Delete(self, request: napi.DeleteNamespaceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.store.namespaces.delete(request.name)
        self.publish(request.name, namespace_events.NamespaceDelete(name=request.name))
        return empty_pb2.Empty()


class Containers(containers_pb2_grpc.ContainersServicer):
    def __init__(self, store: metadata.Store, publish: Publish, has_task: Callable[[str, str], bool]) -> None:
        self.store = store
        self.publish = publish
        self.has_task = has_task

    @unary
    async def Get(self, request: capi.GetContainerRequest, context: grpc.aio.ServicerContext) -> capi.GetContainerResponse:
        c = self.store.containers.get(namespace(context), request.id)
        return capi.GetContainerResponse(container=container_to_proto(c))

    @unary
    async def List(self, request: capi.ListContainersRequest,
                   context: grpc.aio.ServicerContext) -> capi.ListContainersResponse:
        found = self.store.containers.list(namespace(context), list(request.filters))
        return capi.ListContainersResponse(containers=[container_to_proto(c) for c in found])

    @stream
    async def ListStream(self, request: capi.ListContainersRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[capi.ListContainerMessage]:
        for c in self.store.containers.list(namespace(context), list(request.filters)):
            yield capi.ListContainerMessage(container=container_to_proto(c))

    @unary
    async def Create(self, request: capi.CreateContainerRequest,
                     context: grpc.aio.ServicerContext) -> capi.CreateContainerResponse:
        ns = namespace(context)
        _check_spec(request.container)
        c = self.store.containers.create(ns, container_from_proto(request.container))
        event = container_events.ContainerCreate(id=c.id, image=c.image)
        event.runtime.name = c.runtime.name
        if c.runtime.options is not None:
            event.runtime.options.CopyFrom(_any(c.runtime.options))
        self.publish(ns, event)
        return capi.CreateContainerResponse(container=container_to_proto(c))

    @unary
    async def Update(self, request: capi.UpdateContainerRequest,
                     context: grpc.aio.ServicerContext) -> capi.UpdateContainerResponse:
        ns = namespace(context)
        if "spec" in request.update_mask.paths or not request.update_mask.paths:
            _check_spec(request.container)
        c = self.store.containers.update(ns, container_from_proto(request.container), list(request.update_mask.paths))
        self.publish(ns, container_events.ContainerUpdate(
            id=c.id, image=c.image, labels=c.labels, snapshot_key=c.snapshot_key))
        return capi.UpdateContainerResponse(container=container_to_proto(c))

    @unary
    async def Delete(self, request: capi.DeleteContainerRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        ns = namespace(context)
        if self.has_task(ns, request.id):
            self.store.containers.get(ns, request.id)  # NotFound first, as containerd answers
            raise errdefs.FailedPrecondition(f"container {request.id!r} still has a task: delete the task first")
        self.store.containers.delete(ns, request.id)
        self.publish(ns, container_events.ContainerDelete(id=request.id))
        return empty_pb2.Empty()


def _lease(lease: metadata.Lease) -> lapi.Lease:
    out = lapi.Lease(id=lease.id, labels=lease.labels)
    out.created_at.FromNanoseconds(int(lease.created_at * 1e9))
    return out


class Leases(leases_pb2_grpc.LeasesServicer):
    def __init__(self, store: metadata.Store, collector: Any) -> None:
        self.store = store
        self.collector = collector

    @unary
    async def Create(self, request: lapi.CreateRequest, context: grpc.aio.ServicerContext) -> lapi.CreateResponse:
        lease = self.store.leases.create(namespace(context), request.id, dict(request.labels))
        return lapi.CreateResponse(lease=_lease(lease))

    @unary
    async def Delete(self, request: lapi.DeleteRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.store.leases.delete(namespace(context), request.id)
        if request.sync:
            await self.collector.now()
        else:
            self.collector.schedule()
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
