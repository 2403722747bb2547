"""gRPC servicers for containerd's API v1: thin, each delegating to ketch's core parts.

Two groups, registered at two moments of ketchd's start (see ``ketch.daemon.serve``): what a
restarted daemon's clients need first (tasks, containers, namespaces, events, version), before
it serves; the content store, images, snapshots, diff and leases right after (through
:class:`~ketch.services.deferred.Deferred`). Each group's modules are imported only then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import grpc

    from ketch import config, metadata
    from ketch.content import ContentStore
    from ketch.events import Exchange
    from ketch.gc import Collector
    from ketch.images import ImageService
    from ketch.runtime import TaskManager
    from ketch.snapshots import Snapshotter
    from ketch.topics import Publish

#: the services :func:`register_store` registers, as method-name prefixes
STORE_SERVICES = tuple(f"/containerd.services.{name}." for name in ("content", "images", "snapshots", "diff", "leases"))


def register_core(server: grpc.aio.Server, *, cfg: config.Config, store: metadata.Store, exchange: Exchange,
                  manager: TaskManager, publish: Publish,
                  content: ContentStore | Callable[[], Awaitable[ContentStore]]) -> None:
    """``content``: the content store, or what waits for it (a checkpoint waits; the rest not)."""
    from ketch.api.containerd.services.containers.v1 import containers_pb2_grpc
    from ketch.api.containerd.services.events.v1 import events_pb2_grpc
    from ketch.api.containerd.services.introspection.v1 import introspection_pb2_grpc
    from ketch.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
    from ketch.api.containerd.services.tasks.v1 import tasks_pb2_grpc
    from ketch.api.containerd.services.version.v1 import version_pb2_grpc
    from ketch.api.grpc.health.v1 import health_pb2_grpc
    from ketch.metadata.local import ContainerService, NamespaceService
    from ketch.runtime.checkpoint import Checkpoints
    from ketch.services.events import Events
    from ketch.services.metadata import Containers, Namespaces
    from ketch.services.system import Health, Introspection, Version
    from ketch.services.tasks import Tasks

    version_pb2_grpc.add_VersionServicer_to_server(Version(), server)
    introspection_pb2_grpc.add_IntrospectionServicer_to_server(Introspection(cfg.root), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    namespace_pb2_grpc.add_NamespacesServicer_to_server(Namespaces(NamespaceService(store, publish)), server)
    containers_pb2_grpc.add_ContainersServicer_to_server(
        Containers(ContainerService(store, publish, manager.exists)), server)
    events_pb2_grpc.add_EventsServicer_to_server(Events(exchange), server)
    tasks_pb2_grpc.add_TasksServicer_to_server(
        Tasks(manager, store.containers.get, Checkpoints(content, publish)), server)


def register_store(server: grpc.aio.Server, *, store: metadata.Store, publish: Publish, content: ContentStore,
                   images: ImageService, snapshotters: dict[str, Snapshotter], collector: Collector) -> None:
    from ketch.api.containerd.services.content.v1 import content_pb2_grpc
    from ketch.api.containerd.services.diff.v1 import diff_pb2_grpc
    from ketch.api.containerd.services.images.v1 import images_pb2_grpc
    from ketch.api.containerd.services.leases.v1 import leases_pb2_grpc
    from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
    from ketch.diff.service import DiffService
    from ketch.services.content import Content
    from ketch.services.images import Diff, Images, Snapshots
    from ketch.services.metadata import Leases
    from ketch.snapshots.service import SnapshotService

    leases_pb2_grpc.add_LeasesServicer_to_server(Leases(store, collector), server)
    content_pb2_grpc.add_ContentServicer_to_server(Content(content, collector), server)
    images_pb2_grpc.add_ImagesServicer_to_server(Images(images, collector), server)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
        Snapshots(SnapshotService(snapshotters, store.leases, publish, collector.schedule)), server)
    diff_pb2_grpc.add_DiffServicer_to_server(Diff(DiffService(content)), server)
