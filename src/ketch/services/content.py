"""The Content service (``containerd.services.content.v1.Content``): decode, call
:class:`ketch.content.ContentStore`, encode.

The rules (digests, Read ranges, write offsets, commit checks) are the store's; blocking IO
runs in a thread. A lease named in the call's ``containerd-lease`` metadata holds what the
call creates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from ketch import errdefs, metadata, timestamps
from ketch.api.containerd.services.content.v1 import content_pb2 as capi
from ketch.api.containerd.services.content.v1 import content_pb2_grpc
from ketch.content import ContentStore, Status
from ketch.services._common import abort, lease_of, namespace, stream, unary
from ketch.gc import Collector

__all__ = ["Content"]

#: the most data one ReadContentResponse carries
READ_CHUNK = 1 << 20


def _info(info: metadata.ContentInfo) -> capi.Info:
    out = capi.Info(digest=info.digest, size=info.size, labels=info.labels)
    timestamps.stamp(out.created_at, info.created_at)
    timestamps.stamp(out.updated_at, info.updated_at)
    return out


def _status(s: Status) -> capi.Status:
    out = capi.Status(ref=s.ref, offset=s.offset, total=s.total, expected=s.expected)
    timestamps.stamp(out.started_at, s.started_at)
    timestamps.stamp(out.updated_at, s.updated_at)
    return out


class Content(content_pb2_grpc.ContentServicer):
    def __init__(self, content: ContentStore, collector: Collector) -> None:
        self.content = content
        self.collector = collector

    @unary
    async def Info(self, request: capi.InfoRequest, context: grpc.aio.ServicerContext) -> capi.InfoResponse:
        return capi.InfoResponse(info=_info(self.content.info(namespace(context), request.digest)))

    @unary
    async def Update(self, request: capi.UpdateRequest, context: grpc.aio.ServicerContext) -> capi.UpdateResponse:
        info = metadata.ContentInfo(digest=request.info.digest, size=request.info.size,
                                    labels=dict(request.info.labels))
        updated = self.content.update(namespace(context), info, list(request.update_mask.paths))
        return capi.UpdateResponse(info=_info(updated))

    @stream
    async def List(self, request: capi.ListContentRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[capi.ListContentResponse]:
        infos = self.content.list(namespace(context), list(request.filters))
        for start in range(0, len(infos), 100):
            yield capi.ListContentResponse(info=[_info(i) for i in infos[start:start + 100]])

    @unary
    async def Delete(self, request: capi.DeleteContentRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.content.delete(namespace(context), request.digest, lease=lease_of(context))
        self.collector.schedule()
        return empty_pb2.Empty()

    @stream
    async def Read(self, request: capi.ReadContentRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[capi.ReadContentResponse]:
        with self.content.reader(namespace(context), request.digest) as reader:
            chunks = reader.chunks(request.offset, request.size, READ_CHUNK)
            while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
                yield capi.ReadContentResponse(offset=piece[0], data=piece[1])

    @unary
    async def Status(self, request: capi.StatusRequest, context: grpc.aio.ServicerContext) -> capi.StatusResponse:
        return capi.StatusResponse(status=_status(self.content.status(namespace(context), request.ref)))

    @unary
    async def ListStatuses(self, request: capi.ListStatusesRequest,
                           context: grpc.aio.ServicerContext) -> capi.ListStatusesResponse:
        statuses = self.content.list_statuses(namespace(context), list(request.filters))
        return capi.ListStatusesResponse(statuses=[_status(s) for s in statuses])

    async def Write(self, request_iterator: AsyncIterator[capi.WriteContentRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[capi.WriteContentResponse]:
        """The bidirectional write: the first message names the ref; each request (STAT,
        WRITE, COMMIT) gets one response with the writer's state."""
        writer = None
        try:
            ns = namespace(context)
            lease = lease_of(context)
            async for req in request_iterator:
                if writer is None:
                    if not req.ref:
                        raise errdefs.InvalidArgument("first message of a write must have a ref")
                    writer = await asyncio.to_thread(self.content.writer, ns, req.ref, req.total, req.expected,
                                                     lease=lease)
                    total, expected = req.total, req.expected
                if req.total:
                    total = req.total
                if req.expected:
                    expected = req.expected
                if req.action in (capi.WRITE, capi.COMMIT):
                    if req.data:
                        await asyncio.to_thread(writer.write, req.data, req.offset)
                    elif req.action == capi.WRITE and req.offset == 0 and writer.offset:
                        await asyncio.to_thread(writer.truncate, 0)
                    if req.action == capi.COMMIT:
                        await asyncio.to_thread(writer.commit, total, expected, dict(req.labels) or None)
                elif req.action != capi.STAT:
                    raise errdefs.InvalidArgument(f"unknown write action {req.action}")
                st = writer.status()
                resp = capi.WriteContentResponse(action=req.action, offset=st.offset, total=st.total or total,
                                                 digest=writer.digest())
                timestamps.stamp(resp.started_at, st.started_at)
                timestamps.stamp(resp.updated_at, st.updated_at)
                yield resp
        except errdefs.KetchError as e:
            await abort(context, e)
        finally:
            if writer is not None:
                writer.close()

    @unary
    async def Abort(self, request: capi.AbortRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.content.abort(namespace(context), request.ref, lease=lease_of(context))
        return empty_pb2.Empty()
