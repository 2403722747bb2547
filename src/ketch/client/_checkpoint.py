"""Checkpoint and restore, in containerd's format, so that ``ctr containers checkpoint`` and
``ctr containers restore`` read what this client writes and the other way round.

A checkpoint is an image whose target is an OCI index. Its manifests are descriptors of blobs
in the daemon's content store: the container's runtime options (a serialized protobuf Any),
the image the container was made from (that image's own target), the diff of the container's
rw layer (a gzip layer, made by the daemon's Diff service), and what the daemon's
Tasks.Checkpoint wrote: the CRIU images as a tar and the container's spec; then the checkpoint
options. The index's annotations name the image, the runtime and the snapshotter.

Everything is written under one lease, removed at the end: a client that dies halfway leaves
nothing the daemon's GC keeps. The task is paused meanwhile, so that the rw diff and the CRIU
images are of one moment.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from ketch import errdefs, identifiers
from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ketch.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from ketch.api.containerd.services.images.v1 import images_pb2
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.client._images import Image, Store, _image_of
from ketch.distribution.manifests import CHECKPOINT_CONFIG as CONFIG
from ketch.distribution.manifests import CHECKPOINT_CRIU as CRIU_TAR
from ketch.distribution.manifests import CHECKPOINT_OPTIONS as OPTIONS
from ketch.distribution.manifests import CHECKPOINT_RUNTIME_OPTIONS as RUNTIME_OPTIONS
from ketch.distribution.manifests import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, host_platform
from ketch.distribution.manifests import OCI_LAYER_GZIP as RW_LAYER

if TYPE_CHECKING:
    from ketch.client._client import AsyncClient
    from ketch.client._conn import Connection
    from ketch.client._io import IOSpec
    from ketch.client._process import Task

__all__ = ["checkpoint", "checkpoint_descriptor", "is_checkpoint", "restore"]

#: the index's annotations (containerd's container.go)
IMAGE_NAME = "org.opencontainers.image.ref.name"
RUNTIME_NAME = "io.containerd.checkpoint.runtime"
SNAPSHOTTER_NAME = "io.containerd.checkpoint.snapshotter"
#: the label on the checkpoint's image record (as containerd's task.Checkpoint sets it)
CHECKPOINT_LABEL = "containerd.io/checkpoint"


def _platform() -> dict[str, str]:
    os_name, arch = host_platform()
    return {"os": os_name, "architecture": arch}


def _desc(media_type: str, digest: str, size: int, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": int(size), "platform": _platform()}
    if annotations:
        d["annotations"] = dict(annotations)
    return d


async def _blob(store: Store, media_type: str, data: bytes) -> dict[str, Any]:
    return _desc(media_type, await store.write(data), len(data))


async def _rw_diff(store: Store, container: containers_pb2.Container) -> dict[str, Any]:
    """The diff of the container's snapshot over its parent, as a gzip layer in the content
    store (containerd's rootfs.CreateDiff: a view of the parent against the active snapshot)."""
    snapshotter, key = container.snapshotter, container.snapshot_key
    info = await store.call(store.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key))
    view = f"{info.info.parent}-parent-view-{uuid.uuid4().hex[:12]}"
    lower = await store.call(store.snapshots.View, snapshots_pb2.ViewSnapshotRequest(
        snapshotter=snapshotter, key=view, parent=info.info.parent))
    try:
        upper = await store.call(store.snapshots.Mounts, snapshots_pb2.MountsRequest(snapshotter=snapshotter, key=key))
        r = await store.call(store.conn.stub(diff_pb2_grpc.DiffStub).Diff, diff_pb2.DiffRequest(
            left=lower.mounts, right=upper.mounts, media_type=RW_LAYER, ref=f"checkpoint-rw-{key}"))
    finally:
        with contextlib.suppress(errdefs.KetchError):
            await store.call(store.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                snapshotter=snapshotter, key=view))
    return _desc(r.diff.media_type, r.diff.digest, r.diff.size, r.diff.annotations)


async def _written_anyway(store: Store, c: containers_pb2.Container, ours: list[str]) -> list[dict[str, Any]]:
    """The CRIU tar and spec descriptors of a Tasks.Checkpoint that answered AlreadyExists.

    containerd (1.6 and on) commits the spec it checkpoints as a blob of its own and fails when
    that blob is there already, as it is from an earlier checkpoint of the same container; the
    CRIU tar is committed by then, under our lease. So the tar is the one blob of the lease
    that is not ours, and the spec's descriptor is that of the container's spec, serialized as
    containerd serializes it (a protobuf Any)."""
    from ketch.api.containerd.services.content.v1 import content_pb2
    from ketch.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
    from ketch.client._images import _sha256

    spec = c.spec.SerializeToString()
    leased = await store.call(store.conn.stub(leases_pb2_grpc.LeasesStub).ListResources,
                              leases_pb2.ListResourcesRequest(id=store.lease or ""))
    theirs = [r.id for r in leased.resources if r.type == "content" and r.id not in (*ours, _sha256(spec))]
    if len(theirs) != 1 or not await store.has(_sha256(spec)):
        raise errdefs.AlreadyExists(f"the daemon's checkpoint of {c.id} clashed with content it has, and what it "
                                    f"wrote cannot be told apart ({len(theirs)} new blobs)")
    info = await store.call(store.content.Info, content_pb2.InfoRequest(digest=theirs[0]))
    return [_desc(CRIU_TAR, theirs[0], info.info.size), _desc(CONFIG, _sha256(spec), len(spec))]


async def checkpoint(conn: Connection, container_id: str, ref: str, *, task: bool = True, rw: bool = False,
                     exit: bool = False, runtime: bool = True, image: bool = True,
                     options: oci_pb2.CheckpointOptions | None = None) -> Image:
    """The checkpoint of the container ``container_id`` as the image ``ref`` (see the module)."""
    containers = conn.stub(containers_pb2_grpc.ContainersStub)
    tasks = conn.stub(tasks_pb2_grpc.TasksStub)
    c = (await conn.call(containers.Get, containers_pb2.GetContainerRequest(id=container_id))).container
    if not c.image:
        raise errdefs.FailedPrecondition(f"container {container_id} was not made from an image: a checkpoint "
                                         "names the image to restore it on")
    store = Store(conn, c.snapshotter or "overlayfs")
    with contextlib.suppress(errdefs.NotFound):
        await store.call(store.images.Get, images_pb2.GetImageRequest(name=ref))
        raise errdefs.AlreadyExists(f"image {ref!r} exists: remove it or choose another name for the checkpoint")
    source = (await store.call(store.images.Get, images_pb2.GetImageRequest(name=c.image))).image
    copts = oci_pb2.CheckpointOptions(file_locks=True)
    if options is not None:
        copts.CopyFrom(options)
    copts.exit = copts.exit or exit
    packed = any_pb2.Any(type_url=copts.DESCRIPTOR.full_name, value=copts.SerializeToString())

    paused = False
    if task:
        status = (await conn.call(tasks.Get, tasks_pb2.GetRequest(container_id=container_id))).process.status
        if status == task_types.Status.RUNNING:  # freeze it: the rw layer and the memory of one moment
            await conn.call(tasks.Pause, tasks_pb2.PauseTaskRequest(container_id=container_id))
            paused = True
    manifests: list[dict[str, Any]] = []
    resumed = False
    try:
        async with store.leased():
            if runtime and c.runtime.HasField("options"):
                manifests.append(await _blob(store, RUNTIME_OPTIONS, c.runtime.options.SerializeToString()))
            if image:
                t = source.target
                manifests.append({"mediaType": t.media_type, "digest": t.digest, "size": int(t.size),
                                  **({"annotations": dict(t.annotations)} if t.annotations else {})})
            if rw:
                if not c.snapshot_key:
                    raise errdefs.FailedPrecondition(f"container {container_id} has no snapshot to take the rw layer of")
                manifests.append(await _rw_diff(store, c))
            if task:
                try:
                    r = await store.call(tasks.Checkpoint, tasks_pb2.CheckpointTaskRequest(
                        container_id=container_id, options=packed))
                    written = [_desc(d.media_type, d.digest, d.size, d.annotations) for d in r.descriptors]
                except errdefs.AlreadyExists:
                    written = await _written_anyway(store, c, [m["digest"] for m in manifests])
                manifests.extend(written)
                manifests.append(await _blob(store, OPTIONS, packed.SerializeToString()))
                if copts.exit:
                    resumed = True  # it is gone: nothing to resume
            else:
                # the spec, as Tasks.Checkpoint stores it: a restore without the process needs it
                manifests.append(await _blob(store, CONFIG, c.spec.SerializeToString()))
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
                     "annotations": {IMAGE_NAME: c.image, RUNTIME_NAME: c.runtime.name,
                                     SNAPSHOTTER_NAME: c.snapshotter}}
            data = json.dumps(index).encode()
            labels = {f"containerd.io/gc.ref.content.{i}": m["digest"] for i, m in enumerate(manifests)}
            digest = await store.write(data, None, labels)
            record = images_pb2.Image(name=ref, labels={CHECKPOINT_LABEL: "true"}, target=descriptor_pb2.Descriptor(
                media_type=OCI_INDEX, digest=digest, size=len(data)))
            created = await store.call(store.images.Create, images_pb2.CreateImageRequest(image=record))
    finally:
        if paused and not resumed:
            with contextlib.suppress(errdefs.NotFound, errdefs.FailedPrecondition):
                await conn.call(tasks.Resume, tasks_pb2.ResumeTaskRequest(container_id=container_id))
    return _image_of(created.image)


def is_checkpoint(index: Mapping[str, Any]) -> bool:
    """Whether an OCI index (as a dict) is a checkpoint's: it holds a container spec."""
    return any(m.get("mediaType") == CONFIG for m in index.get("manifests") or [])


async def _index(store: Store, ref: str) -> dict[str, Any]:
    record = _image_of((await store.call(store.images.Get, images_pb2.GetImageRequest(name=ref))).image)
    index: dict[str, Any] = await store.read_json(record.digest) if record.media_type == OCI_INDEX else {}
    if not is_checkpoint(index):
        raise errdefs.InvalidArgument(f"image {ref!r} is not a checkpoint (no container spec in an OCI index)")
    return index


def _find(index: Mapping[str, Any], media_type: str) -> dict[str, Any] | None:
    for m in index.get("manifests") or []:
        if m.get("mediaType") == media_type:
            return dict(m)
    return None


async def checkpoint_descriptor(conn: Connection, ref: str) -> descriptor_pb2.Descriptor:
    """The descriptor of the CRIU images in the checkpoint ``ref``, for Tasks.Create."""
    index = await _index(Store(conn), ref)
    d = _find(index, CRIU_TAR)
    if d is None:
        raise errdefs.InvalidArgument(f"checkpoint {ref!r} has no task in it (it was made without the task)")
    return descriptor_pb2.Descriptor(media_type=d["mediaType"], digest=d["digest"], size=int(d["size"]),
                                     annotations=d.get("annotations") or {})


async def restore(client: AsyncClient, id: str, ref: str, *, live: bool = True, rw: bool = True, io: IOSpec = None,
                  labels: Mapping[str, str] | None = None) -> Task:
    """A new container ``id`` from the checkpoint ``ref`` (see :meth:`AsyncClient.restore`)."""
    identifiers.validate(id)
    probe = Store(client.conn)
    index = await _index(probe, ref)
    notes = index.get("annotations") or {}
    image_name, runtime_name = notes.get(IMAGE_NAME), notes.get(RUNTIME_NAME)
    snapshotter = notes.get(SNAPSHOTTER_NAME) or "overlayfs"
    if not image_name or not runtime_name:
        raise errdefs.InvalidArgument(f"checkpoint {ref!r} does not name its image and runtime")
    rw_layer = _find(index, RW_LAYER)
    if rw and rw_layer is None:
        raise errdefs.InvalidArgument(f"checkpoint {ref!r} has no rw layer (it was made without rw): restore it "
                                      "without rw")
    if live and _find(index, CRIU_TAR) is None:
        raise errdefs.InvalidArgument(f"checkpoint {ref!r} has no task in it: restore it without live")
    store = Store(client.conn, snapshotter)
    c = containers_pb2.Container(id=id, image=image_name, snapshotter=snapshotter, snapshot_key=id,
                                 labels=dict(labels or {}))
    c.runtime.name = runtime_name
    spec = _find(index, CONFIG)
    assert spec is not None  # _index checked
    c.spec.ParseFromString(await store.read(spec["digest"]))
    options = _find(index, RUNTIME_OPTIONS)
    if options is not None:
        c.runtime.options.ParseFromString(await store.read(options["digest"]))
    try:
        record = await client.image(image_name)
    except errdefs.NotFound:
        # a checkpoint imported into another daemon brings its image's blobs, not its record
        source = next((m for m in index["manifests"] if m["mediaType"] in (*INDEX_TYPES, *MANIFEST_TYPES)), None)
        if source is None:
            raise errdefs.NotFound(f"image {image_name!r} (checkpoint {ref!r} was made without it)") from None
        record = await store.put_image(image_name, source)
    async with store.leased():
        manifest = await store.manifest_of({"mediaType": record.media_type, "digest": record.digest})
        top = await store.unpack(manifest, manifest["config"]["digest"])
        prepared = await store.call(store.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=id, parent=top))
        try:
            if rw and rw_layer is not None:
                await store.call(client.conn.stub(diff_pb2_grpc.DiffStub).Apply, diff_pb2.ApplyRequest(
                    diff=descriptor_pb2.Descriptor(media_type=rw_layer["mediaType"], digest=rw_layer["digest"],
                                                   size=int(rw_layer["size"])), mounts=prepared.mounts))
            container = await client._create(c)
        except BaseException:
            with contextlib.suppress(errdefs.KetchError):
                await store.call(store.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=snapshotter, key=id))
            raise
    try:
        task = await container.new_task(io, checkpoint=ref if live else None)
    except BaseException:
        await container.delete()
        raise
    try:
        await task.start()
    except BaseException:
        with contextlib.suppress(errdefs.KetchError):
            await task.delete(force=True)
        await container.delete()
        raise
    return task
