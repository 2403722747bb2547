"""The asyncio client: one connection to a daemon speaking containerd's API (ketchd or
containerd 1.6+), in one namespace."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

from ketch import errdefs, identifiers
from ketch.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ketch.api.containerd.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.api.containerd.services.version.v1 import version_pb2_grpc
from ketch.client._conn import Connection, default_address, default_namespace
from ketch.client._events import Event, subscribe
from ketch.client._containers import Container, Mount, SpecOptions, build_spec, pack_options, spec_any
from ketch.client._io import IOSpec
from ketch.client._process import Status, Task, _status_of

if TYPE_CHECKING:
    from ketch.client._images import Image, Progress

__all__ = ["DEFAULT_RUNTIME", "AsyncClient", "TaskInfo", "Version"]

#: the runtime containers get unless told otherwise, as with containerd's client
DEFAULT_RUNTIME = "io.containerd.runc.v2"


def default_fifo_dir() -> str:
    """Where the client makes its FIFOs: $KETCH_FIFO_DIR, else /run/ketch/fifo (root) or a
    directory of the user's."""
    if os.environ.get("KETCH_FIFO_DIR"):
        return os.environ["KETCH_FIFO_DIR"]
    if os.geteuid() == 0:
        return "/run/ketch/fifo"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/ketch-{os.geteuid()}", "ketch-fifo")


@dataclass(frozen=True)
class Version:
    version: str
    revision: str


@dataclass(frozen=True)
class TaskInfo:
    """A task as the daemon lists it."""

    container_id: str
    pid: int
    status: Status


class AsyncClient:
    """``AsyncClient(address=None, namespace=None)``: the daemon's socket from the argument,
    $KETCH_ADDRESS, $CONTAINERD_ADDRESS, else ketchd's default; the namespace from the argument,
    $KETCH_NAMESPACE, $CONTAINERD_NAMESPACE, else ``default``. Use ``async with``, or
    :meth:`close`."""

    def __init__(self, address: str | None = None, namespace: str | None = None, *,
                 fifo_dir: str | None = None) -> None:
        self.conn = Connection(default_address(address), default_namespace(namespace))
        self.fifo_dir = fifo_dir or default_fifo_dir()

    @property
    def address(self) -> str:
        return self.conn.address

    @property
    def namespace(self) -> str:
        return self.conn.namespace

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.conn.close()

    def _stub(self, cls: type) -> Any:
        return self.conn.stub(cls)

    # -- the daemon ------------------------------------------------------------------------

    async def version(self) -> Version:
        r = await self.conn.call(self._stub(version_pb2_grpc.VersionStub).Version, empty_pb2.Empty())
        return Version(r.version, r.revision)

    async def server_uuid(self) -> str:
        r = await self.conn.call(self._stub(introspection_pb2_grpc.IntrospectionStub).Server, empty_pb2.Empty())
        return str(r.uuid)

    async def plugins(self, *filters: str) -> list[dict[str, Any]]:
        """The daemon's plugins: type, id, status (``ok`` or the init error), exports."""
        r = await self.conn.call(self._stub(introspection_pb2_grpc.IntrospectionStub).Plugins,
                                 introspection_pb2.PluginsRequest(filters=list(filters)))
        out = []
        for p in r.plugins:
            out.append({"type": p.type, "id": p.id, "requires": list(p.requires), "exports": dict(p.exports),
                        "platforms": [f"{x.os}/{x.architecture}" for x in p.platforms],
                        "status": p.init_err.message if p.HasField("init_err") else "ok"})
        return out

    async def namespaces(self) -> list[str]:
        r = await self.conn.call(self._stub(namespace_pb2_grpc.NamespacesStub).List,
                                 namespace_pb2.ListNamespacesRequest())
        return sorted(n.name for n in r.namespaces)

    async def delete_namespace(self, name: str) -> None:
        await self.conn.call(self._stub(namespace_pb2_grpc.NamespacesStub).Delete,
                             namespace_pb2.DeleteNamespaceRequest(name=name))

    # -- containers ------------------------------------------------------------------------

    async def create_container(
        self, id: str, *, rootfs: str | None = None, image: str | None = None, args: Sequence[str] = (),
        env: Sequence[str] | Mapping[str, str] = (), cwd: str | None = None, user: str | tuple[int, int] | None = None,
        mounts: Sequence[Mount] = (), memory: int | None = None, cpus: float | None = None, terminal: bool = False,
        hostname: str | None = None, readonly: bool = False, labels: Mapping[str, str] | None = None,
        runtime: str = DEFAULT_RUNTIME, runtime_options: Any = None, snapshotter: str = "overlayfs",
        spec: Mapping[str, Any] | None = None,
    ) -> Container:
        """A new container running ``args`` from a root filesystem directory (``rootfs``) or
        an image (unpacked into a snapshot of its own). ``spec`` replaces the generated spec
        whole."""
        identifiers.validate(id)
        if (rootfs is None) == (image is None):
            raise errdefs.InvalidArgument("a container needs exactly one of rootfs (a directory) or image")
        if rootfs is not None and not os.path.isdir(rootfs):
            raise errdefs.NotFound(f"rootfs directory {rootfs}")
        opts = SpecOptions(args, env, cwd, user, mounts, memory, cpus, terminal, hostname, readonly)
        c = containers_pb2.Container(id=id, labels=dict(labels or {}))
        c.runtime.name = runtime
        if runtime_options is not None:
            c.runtime.options.CopyFrom(pack_options(runtime_options))
        if image is not None:
            from ketch.client._images import prepare_image_container

            return await prepare_image_container(self, c, image, opts, snapshotter, spec)
        c.spec.CopyFrom(spec_any(spec if spec is not None else build_spec(self.namespace, id, opts, rootfs=rootfs)))
        return await self._create(c)

    async def _create(self, c: containers_pb2.Container) -> Container:
        r = await self.conn.call(self._stub(containers_pb2_grpc.ContainersStub).Create,
                                 containers_pb2.CreateContainerRequest(container=c))
        return Container.from_proto(self.conn, self.fifo_dir, r.container)

    async def container(self, id: str) -> Container:
        """The container ``id`` (NotFound if there is none)."""
        r = await self.conn.call(self._stub(containers_pb2_grpc.ContainersStub).Get,
                                 containers_pb2.GetContainerRequest(id=id))
        return Container.from_proto(self.conn, self.fifo_dir, r.container)

    async def containers(self, *filters: str) -> list[Container]:
        """The namespace's containers, selected by containerd filters (``labels.app==web``)."""
        r = await self.conn.call(self._stub(containers_pb2_grpc.ContainersStub).List,
                                 containers_pb2.ListContainersRequest(filters=list(filters)))
        return [Container.from_proto(self.conn, self.fifo_dir, c) for c in r.containers]

    async def restore(self, id: str, ref: str, *, live: bool = True, rw: bool = True, io: IOSpec = None,
                      labels: Mapping[str, str] | None = None) -> Task:
        """A new container ``id`` from the checkpoint image ``ref`` (made by
        :meth:`Container.checkpoint` or ``ctr containers checkpoint``): the checkpoint's spec,
        runtime and image (a snapshot of its own on top), with ``rw`` the checkpointed rw
        layer applied; its task created with ``io``, with ``live`` from the checkpoint's CRIU
        images (the process goes on where it was), and started; the container gets
        ``labels``. The started task; its container is ``await client.container(id)``."""
        from ketch.client._checkpoint import restore

        return await restore(self, id, ref, live=live, rw=rw, io=io, labels=labels)

    # -- images ----------------------------------------------------------------------------

    async def images(self, *filters: str) -> list[Image]:
        """The namespace's images, selected by containerd filters (``name~=busybox``)."""
        from ketch.client import _images

        return await _images.list_images(self, filters)

    async def image(self, name: str) -> Image:
        """The image ``name`` (NotFound if there is none)."""
        from ketch.client import _images

        return await _images.get_image(self, name)

    async def image_size(self, image: Image) -> int:
        """The bytes of this platform's manifest, config and layers."""
        from ketch.client import _images

        return await _images.image_size(self, image)

    async def pull(self, ref: str, *, plain_http: bool | None = None, unpack: bool = True,
                   snapshotter: str = "overlayfs", progress: Progress | None = None) -> Image:
        """Fetch ``ref`` from its registry (anonymously; plain HTTP for localhost unless
        told) for this host's platform, and unpack it; ``progress(what, done, total)``."""
        from ketch.client import _images

        return await _images.pull(self, ref, plain_http=plain_http, unpack=unpack, snapshotter=snapshotter,
                                  progress=progress)

    async def import_image(self, path: str, *, name: str | None = None, unpack: bool = True,
                           snapshotter: str = "overlayfs", progress: Progress | None = None) -> list[Image]:
        """The images of an OCI layout or ``docker save`` archive at ``path``."""
        from ketch.client import _images

        return await _images.import_archive(self, path, name=name, unpack=unpack, snapshotter=snapshotter,
                                            progress=progress)

    async def export_images(self, path: str, *names: str) -> None:
        """An OCI layout archive of the images ``names`` at ``path``."""
        from ketch.client import _images

        await _images.export_archive(self, names, path)

    async def remove_image(self, name: str) -> None:
        """Remove the image record; the daemon's GC removes what only it held."""
        from ketch.client import _images

        await _images.remove_image(self, name)

    async def tag_image(self, source: str, target: str, *, force: bool = False) -> Image:
        """A second name for ``source``'s content (AlreadyExists unless ``force``)."""
        from ketch.client import _images

        return await _images.tag_image(self, source, target, force=force)

    def events(self, *filters: str, reconnect: bool = True) -> AsyncIterator[Event]:
        """Events matching containerd ``filters`` (``topic=="/tasks/exit"``,
        ``namespace==x``, ``event.container_id==web``), from every namespace unless a filter
        says. With ``reconnect``, a daemon restart does not end it, and an exit from the outage
        is delivered (see :mod:`ketch.client._events`)."""
        return subscribe(self.conn, filters, reconnect=reconnect)

    async def tasks(self) -> list[TaskInfo]:
        """The namespace's tasks."""
        r = await self.conn.call(self._stub(tasks_pb2_grpc.TasksStub).List, tasks_pb2.ListTasksRequest())
        # containerd names the container in the id field only
        return [TaskInfo(p.container_id or p.id, p.pid, _status_of(p)) for p in r.tasks]
