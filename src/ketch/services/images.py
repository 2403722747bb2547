"""Images, Snapshots and Diff: what ``ctr images import/pull`` and ``ctr run IMAGE`` use.

Blocking work (disk IO, hashing, tar) runs in threads; the core stores are thread-safe. Every
snapshotter call does: it may wait for a create that holds the snapshotter's metadata lock
while it flushes the new directory.
A lease named in the call's ``containerd-lease`` metadata holds what the call creates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import grpc
from google.protobuf import empty_pb2

from ketch import errdefs, metadata, timestamps
from ketch.gc import Collector
from ketch.api.containerd.services.diff.v1 import diff_pb2 as dapi
from ketch.api.containerd.services.diff.v1 import diff_pb2_grpc
from ketch.api.containerd.services.images.v1 import images_pb2 as iapi
from ketch.api.containerd.services.images.v1 import images_pb2_grpc
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2 as sapi
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2, mount_pb2
from ketch.diff.service import DiffService
from ketch.images import ImageService
from ketch.mount import Mount
from ketch.services._common import lease_of, namespace, stream, unary
from ketch.snapshots import Info as SnapshotInfo
from ketch.snapshots import Kind, Snapshotter
from ketch.snapshots.service import SnapshotService



# -- images ----------------------------------------------------------------------------------------

def _image_to_proto(image: metadata.Image) -> iapi.Image:
    t = image.target
    out = iapi.Image(name=image.name, labels=image.labels, target=descriptor_pb2.Descriptor(
        media_type=t.media_type, digest=t.digest, size=t.size, annotations=t.annotations))
    timestamps.stamp(out.created_at, image.created_at)
    timestamps.stamp(out.updated_at, image.updated_at)
    return out


def _image_from_proto(image: iapi.Image) -> metadata.Image:
    t = image.target
    return metadata.Image(name=image.name, labels=dict(image.labels), target=metadata.Descriptor(
        media_type=t.media_type, digest=t.digest, size=t.size, annotations=dict(t.annotations)))


class Images(images_pb2_grpc.ImagesServicer):
    def __init__(self, images: ImageService, collector: Collector) -> None:
        self.images = images
        self.collector = collector

    @unary
    async def Get(self, request: iapi.GetImageRequest, context: grpc.aio.ServicerContext) -> iapi.GetImageResponse:
        return iapi.GetImageResponse(image=_image_to_proto(self.images.get(namespace(context), request.name)))

    @unary
    async def List(self, request: iapi.ListImagesRequest, context: grpc.aio.ServicerContext) -> iapi.ListImagesResponse:
        found = self.images.list(namespace(context), list(request.filters))
        return iapi.ListImagesResponse(images=[_image_to_proto(i) for i in found])

    @unary
    async def Create(self, request: iapi.CreateImageRequest,
                     context: grpc.aio.ServicerContext) -> iapi.CreateImageResponse:
        created = self.images.create(namespace(context), _image_from_proto(request.image))
        return iapi.CreateImageResponse(image=_image_to_proto(created))

    @unary
    async def Update(self, request: iapi.UpdateImageRequest,
                     context: grpc.aio.ServicerContext) -> iapi.UpdateImageResponse:
        updated = self.images.update(namespace(context), _image_from_proto(request.image),
                                     list(request.update_mask.paths))
        return iapi.UpdateImageResponse(image=_image_to_proto(updated))

    @unary
    async def Delete(self, request: iapi.DeleteImageRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.images.delete(namespace(context), request.name)
        await self.collector.after_delete(request.sync)
        return empty_pb2.Empty()


# -- snapshots ---------------------------------------------------------------------------------------

def _mounts(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _from_mounts(mounts: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options)) for m in mounts]


def _kind(value: int) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        known = ", ".join(f"{k.value} ({k.name})" for k in Kind)
        raise errdefs.InvalidArgument(f"snapshot kind {value} is not one of {known}") from None


def _snapshot_info(info: SnapshotInfo) -> sapi.Info:
    out = sapi.Info(name=info.name, parent=info.parent, kind=cast(Any, int(info.kind)), labels=info.labels)
    timestamps.stamp(out.created_at, info.created_at)
    timestamps.stamp(out.updated_at, info.updated_at)
    return out




class Snapshots(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshots: SnapshotService) -> None:
        self.snapshots = snapshots

    def _get(self, name: str) -> Snapshotter:
        return self.snapshots.get(name)

    @unary
    async def Prepare(self, request: sapi.PrepareSnapshotRequest,
                      context: grpc.aio.ServicerContext) -> sapi.PrepareSnapshotResponse:
        mounts = await self.snapshots.prepare(namespace(context), request.snapshotter, request.key, request.parent,
                                              dict(request.labels), lease_of(context))
        return sapi.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @unary
    async def View(self, request: sapi.ViewSnapshotRequest,
                   context: grpc.aio.ServicerContext) -> sapi.ViewSnapshotResponse:
        mounts = await self.snapshots.view(namespace(context), request.snapshotter, request.key, request.parent,
                                           dict(request.labels), lease_of(context))
        return sapi.ViewSnapshotResponse(mounts=_mounts(mounts))

    @unary
    async def Mounts(self, request: sapi.MountsRequest, context: grpc.aio.ServicerContext) -> sapi.MountsResponse:
        mounts = await asyncio.to_thread(self._get(request.snapshotter).mounts, namespace(context), request.key)
        return sapi.MountsResponse(mounts=_mounts(mounts))

    @unary
    async def Commit(self, request: sapi.CommitSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.snapshots.commit(namespace(context), request.snapshotter, request.name, request.key,
                                    dict(request.labels), lease_of(context))
        return empty_pb2.Empty()

    @unary
    async def Remove(self, request: sapi.RemoveSnapshotRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.snapshots.remove(namespace(context), request.snapshotter, request.key)
        return empty_pb2.Empty()

    @unary
    async def Stat(self, request: sapi.StatSnapshotRequest,
                   context: grpc.aio.ServicerContext) -> sapi.StatSnapshotResponse:
        info = await asyncio.to_thread(self._get(request.snapshotter).stat, namespace(context), request.key)
        return sapi.StatSnapshotResponse(info=_snapshot_info(info))

    @unary
    async def Update(self, request: sapi.UpdateSnapshotRequest,
                     context: grpc.aio.ServicerContext) -> sapi.UpdateSnapshotResponse:
        info = SnapshotInfo(kind=_kind(request.info.kind), name=request.info.name, parent=request.info.parent,
                            labels=dict(request.info.labels))
        updated = await asyncio.to_thread(self._get(request.snapshotter).update, namespace(context), info,
                                          list(request.update_mask.paths))
        return sapi.UpdateSnapshotResponse(info=_snapshot_info(updated))

    @stream
    async def List(self, request: sapi.ListSnapshotsRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[sapi.ListSnapshotsResponse]:
        infos = await asyncio.to_thread(self._get(request.snapshotter).walk, namespace(context), list(request.filters))
        for start in range(0, len(infos), 100):
            yield sapi.ListSnapshotsResponse(info=[_snapshot_info(i) for i in infos[start:start + 100]])

    @unary
    async def Usage(self, request: sapi.UsageRequest, context: grpc.aio.ServicerContext) -> sapi.UsageResponse:
        usage = await asyncio.to_thread(self._get(request.snapshotter).usage, namespace(context), request.key)
        return sapi.UsageResponse(size=usage.size, inodes=usage.inodes)

    @unary
    async def Cleanup(self, request: sapi.CleanupRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await asyncio.to_thread(self._get(request.snapshotter).cleanup)
        return empty_pb2.Empty()


# -- diff ---------------------------------------------------------------------------------------------

class Diff(diff_pb2_grpc.DiffServicer):
    def __init__(self, diffs: DiffService) -> None:
        self.diffs = diffs

    @unary
    async def Apply(self, request: dapi.ApplyRequest, context: grpc.aio.ServicerContext) -> dapi.ApplyResponse:
        media_type, digest, size = await self.diffs.apply(namespace(context), request.diff.digest,
                                                          request.diff.media_type, _from_mounts(request.mounts))
        return dapi.ApplyResponse(applied=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size))

    @unary
    async def Diff(self, request: dapi.DiffRequest, context: grpc.aio.ServicerContext) -> dapi.DiffResponse:
        media_type, digest, size = await self.diffs.diff(
            namespace(context), _from_mounts(request.left), _from_mounts(request.right), media_type=request.media_type,
            ref=request.ref, labels=dict(request.labels), lease=lease_of(context))
        return dapi.DiffResponse(diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size))
