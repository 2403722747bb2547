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
from ketch.content import WriteSession, WriteStep, ContentStore, Status
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
        session = None
        try:
            session = WriteSession(self.content, namespace(context), lease_of(context))
            async for req in request_iterator:
                st, digest = await asyncio.to_thread(session.step, WriteStep(
                    action=req.action, ref=req.ref, total=req.total, expected=req.expected, offset=req.offset,
                    data=req.data, labels=dict(req.labels)))
                yield capi.WriteContentResponse(
                    action=req.action, offset=st.offset, total=st.total or session.total, digest=digest,
                    started_at=timestamps.timestamp(st.started_at), updated_at=timestamps.timestamp(st.updated_at))
        except errdefs.KetchError as e:
            await abort(context, e)
        finally:
            if session is not None:
                await asyncio.to_thread(session.close)  # fsyncs what was written

    @unary
    async def Abort(self, request: capi.AbortRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        # waits for a running sweep, then removes the ingest's files: in a thread
        await asyncio.to_thread(self.content.abort, namespace(context), request.ref, lease=lease_of(context))
        return empty_pb2.Empty()
