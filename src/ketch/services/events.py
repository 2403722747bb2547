"""Events: containerd.services.events.v1 over gRPC, and the ttrpc Forward shims call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from ketch import timestamps, ttrpc
from ketch.api.containerd.services.events.v1 import events_pb2 as api
from ketch.api.containerd.services.events.v1 import events_pb2_grpc
from ketch.api.containerd.services.ttrpc.events.v1 import events_pb2 as ttrpc_api
from ketch.events import Envelope, Exchange
from ketch.services._common import namespace, stream, unary

TTRPC_SERVICE = "containerd.services.events.ttrpc.v1.Events"


def _envelope(e: api.Envelope | ttrpc_api.Envelope) -> Envelope:
    return Envelope(timestamp=timestamps.seconds(e.timestamp), namespace=e.namespace, topic=e.topic,
                    type_url=e.event.type_url, value=e.event.value)


def _to_proto(e: Envelope) -> api.Envelope:
    out = api.Envelope(namespace=e.namespace, topic=e.topic)
    timestamps.stamp(out.timestamp, e.timestamp)
    out.event.type_url, out.event.value = e.type_url, e.value
    return out


class Events(events_pb2_grpc.EventsServicer):
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    @unary
    async def Publish(self, request: api.PublishRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.exchange.publish(namespace(context), request.topic, request.event.type_url, request.event.value)
        return empty_pb2.Empty()

    @unary
    async def Forward(self, request: api.ForwardRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.exchange.forward(_envelope(request.envelope))
        return empty_pb2.Empty()

    @stream
    async def Subscribe(self, request: api.SubscribeRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[api.Envelope]:
        async with self.exchange.subscribe(list(request.filters)) as subscription:
            async for envelope in subscription:
                yield _to_proto(envelope)


def forward_service(exchange: Exchange) -> tuple[str, dict[str, ttrpc.Method]]:
    """The ttrpc Events service shims forward their task events to."""

    async def forward(request: ttrpc_api.ForwardRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        exchange.forward(_envelope(request.envelope))
        return empty_pb2.Empty()

    return TTRPC_SERVICE, {"Forward": ttrpc.Method(ttrpc_api.ForwardRequest, forward)}
