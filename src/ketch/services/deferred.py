"""Services that load after ketchd serves: their methods are known to the server from the
start, and a call that arrives before they are loaded waits for them instead of failing.

ketchd answers containerd's API as soon as it can (a restarted daemon's clients are waiting);
what only some clients need (the Kubernetes CRI: its protos, CNI, the streaming server) is
imported and set up right after. :class:`Deferred` stands in for those services: registered
before the server starts, it takes every call to their methods; until :meth:`Deferred.load`
it holds a call (reading it as raw bytes: on the wire a unary call is a stream of one
message), then hands it to the real handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc


class Registrations:
    """Stands in for a grpc server to the generated ``add_*Servicer_to_server`` functions:
    keeps the handlers they register."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    def find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        found = self.methods.get(details.method)
        for generic in self.generic:
            if found is not None:
                break
            found = generic.service(details)
        return found


def _identity(data: Any) -> Any:
    return data


class Deferred(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc has no types
    """The methods under ``prefixes`` (e.g. ``"/runtime.v1."``), served once :meth:`load`ed."""

    def __init__(self, prefixes: tuple[str, ...], what: str) -> None:
        self._prefixes = prefixes
        self._what = what
        self._registered: Registrations | None = None
        self._loaded: asyncio.Future[Registrations] | None = None
        self._error = ""

    def _future(self) -> asyncio.Future[Registrations]:
        if self._loaded is None:
            self._loaded = asyncio.get_running_loop().create_future()
        return self._loaded

    def load(self, register: Callable[[Registrations], None]) -> None:
        """Register the real services (``register`` is handed a server stand-in) and let the
        waiting calls in."""
        registered = Registrations()
        register(registered)
        self._registered = registered
        future = self._future()
        if not future.done():
            future.set_result(registered)

    def fail(self, reason: str) -> None:
        """The services will not load: waiting and later calls are Unavailable with ``reason``."""
        self._error = reason
        future = self._future()
        if not future.done():
            future.set_exception(RuntimeError(reason))
            future.exception()  # retrieved: nobody may be waiting

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if not details.method.startswith(self._prefixes):
            return None
        if self._registered is not None:
            return self._registered.find(details)
        return grpc.stream_stream_rpc_method_handler(self._waiting(details))

    def _waiting(self, details: grpc.HandlerCallDetails) -> Callable[..., AsyncIterator[bytes]]:
        async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                registered = await asyncio.shield(self._future())
            except RuntimeError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._what} is not available: {self._error}")
            handler = registered.find(details)
            if handler is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {details.method}")
            assert handler is not None
            decode = handler.request_deserializer or _identity
            encode = handler.response_serializer or _identity
            if handler.request_streaming:
                async def decoded() -> AsyncIterator[Any]:
                    async for raw in requests:
                        yield decode(raw)
                request: Any = decoded()
            else:
                request = None
                async for raw in requests:
                    request = decode(raw)
                    break
            if handler.unary_unary is not None:
                yield encode(await handler.unary_unary(request, context))
            elif handler.stream_unary is not None:
                yield encode(await handler.stream_unary(request, context))
            else:
                stream = handler.unary_stream or handler.stream_stream
                assert stream is not None
                async for response in stream(request, context):
                    yield encode(response)
        return relay
