"""Version, Introspection and gRPC health: what a client asks a daemon about itself."""

from __future__ import annotations

import platform
import uuid
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from ketch import __version__, filters
from ketch.files import write_atomic
from ketch.api.containerd.services.introspection.v1 import introspection_pb2 as intro
from ketch.api.containerd.services.introspection.v1 import introspection_pb2_grpc
from ketch.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from ketch.api.grpc.health.v1 import health_pb2, health_pb2_grpc
from ketch.services._common import unary

#: the containerd API level ketchd speaks, and ketch's own version
VERSION = f"v1.6.20+ketch.{__version__}"

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(platform.machine(), platform.machine())

#: (type, id, requires) of the parts ketchd is made of, as containerd names its plugins
PLUGINS: list[tuple[str, str, tuple[str, ...]]] = [
    ("io.containerd.event.v1", "exchange", ()),
    ("io.containerd.content.v1", "content", ()),
    ("io.containerd.snapshotter.v1", "native", ()),
    ("io.containerd.snapshotter.v1", "overlayfs", ()),
    ("io.containerd.metadata.v1", "sqlite", ("io.containerd.content.v1", "io.containerd.snapshotter.v1")),
    ("io.containerd.differ.v1", "walking", ("io.containerd.metadata.v1",)),
    ("io.containerd.gc.v1", "scheduler", ("io.containerd.metadata.v1",)),
    ("io.containerd.lease.v1", "manager", ("io.containerd.metadata.v1",)),
    ("io.containerd.runtime.v2", "task", ("io.containerd.event.v1", "io.containerd.metadata.v1")),
    ("io.containerd.grpc.v1", "containers", ("io.containerd.metadata.v1",)),
    ("io.containerd.grpc.v1", "content", ("io.containerd.metadata.v1",)),
    ("io.containerd.grpc.v1", "diff", ("io.containerd.differ.v1",)),
    ("io.containerd.grpc.v1", "images", ("io.containerd.metadata.v1", "io.containerd.gc.v1")),
    ("io.containerd.grpc.v1", "snapshots", ("io.containerd.snapshotter.v1",)),
    ("io.containerd.grpc.v1", "events", ("io.containerd.event.v1",)),
    ("io.containerd.grpc.v1", "introspection", ()),
    ("io.containerd.grpc.v1", "leases", ("io.containerd.metadata.v1",)),
    ("io.containerd.grpc.v1", "namespaces", ("io.containerd.metadata.v1",)),
    ("io.containerd.grpc.v1", "tasks", ("io.containerd.runtime.v2", "io.containerd.metadata.v1")),
    ("io.containerd.grpc.v1", "version", ()),
    ("io.containerd.grpc.v1", "healthcheck", ()),
    ("io.containerd.ttrpc.v1", "events", ("io.containerd.event.v1",)),
]


class Version(version_pb2_grpc.VersionServicer):
    @unary
    async def Version(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> version_pb2.VersionResponse:
        return version_pb2.VersionResponse(version=VERSION, revision="ketch")


def server_uuid(root: str) -> str:
    """A uuid made on the first start and kept under root, so it is stable across restarts."""
    path = Path(root, "uuid")
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        value = str(uuid.uuid4())
        write_atomic(path, (value + "\n").encode())
        return value


class Introspection(introspection_pb2_grpc.IntrospectionServicer):
    def __init__(self, root: str) -> None:
        self.uuid = server_uuid(root)

    @unary
    async def Plugins(self, request: intro.PluginsRequest, context: grpc.aio.ServicerContext) -> intro.PluginsResponse:
        match = filters.parse(list(request.filters))
        resp = intro.PluginsResponse()
        for type_, id, requires in PLUGINS:
            fields = {"type": type_, "id": id}
            if not match.match(filters.adaptor_for(fields)):
                continue
            p = resp.plugins.add(type=type_, id=id, requires=requires)
            if type_ == "io.containerd.runtime.v2":
                p.platforms.add(os="linux", architecture=_ARCH)
        return resp

    @unary
    async def Server(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> intro.ServerResponse:
        return intro.ServerResponse(uuid=self.uuid)


class Health(health_pb2_grpc.HealthServicer):
    @unary
    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
