"""The ttrpc client: one future per call, resolved as responses arrive on its stream.

connect() dials a unix socket; connect_in_memory() joins a Client to a Server in this
process with no socket at all. Either way the client runs over the same _ClientStream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ketch import errdefs

from . import _memory, _unix
from ._connection import CLIENT
from ._errors import LocalProtocolError, ProtocolError
from ._events import ProtocolErrorEvent, ResponseReceived
from ._server import Server
from ._stream import Stream, StreamEvent, transport_error

log = logging.getLogger("ketch.ttrpc")

M = TypeVar("M", bound=Message)

#: the address of a client made by connect_in_memory()
MEMORY_ADDRESS = "memory://"


class _ClientStream(Stream):
    """The client's connection: resolves one future per stream as responses arrive."""

    def __init__(self, address: str, on_close: Callable[[], object] | None) -> None:
        super().__init__(CLIENT)
        self.address = address
        self.calls: dict[int, asyncio.Future[ResponseReceived]] = {}
        self.close_reason: str | None = None  # set once closing; later calls fail with it
        self.writable = asyncio.Event()
        self.writable.set()
        self.on_close = on_close

    def event_received(self, event: StreamEvent) -> None:
        future = self.calls.pop(event.stream_id, None)
        if future is None or future.done():
            return
        if isinstance(event, ResponseReceived):
            future.set_result(event)
        elif isinstance(event, ProtocolErrorEvent):  # its answer was unreadable or too big
            future.set_exception(errdefs.from_status(event.code, event.message))

    def protocol_failed(self, exc: ProtocolError) -> None:
        self.close_with(f"ttrpc: {exc}")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_reason is None:
            self.close_reason = transport_error(exc, "ttrpc: connection closed").message
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(errdefs.Unavailable(self.close_reason))
        self.writable.set()
        super().connection_lost(exc)
        if self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                log.exception("ttrpc: on_close callback failed")

    def close_with(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.close()


class Client:
    """A ttrpc connection to one server; make it with ``await connect(address)`` or
    ``await connect_in_memory(server)``."""

    def __init__(self, stream: _ClientStream) -> None:
        self._stream = stream

    @property
    def address(self) -> str:
        return self._stream.address

    @property
    def closed(self) -> bool:
        """True once closing started, by close() or by the connection dropping."""
        return self._stream.close_reason is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: dict[str, str | list[str]] | None = None,
        send_timeout: bool = True,
    ) -> M:
        """Call ``service/method`` and return its decoded response; a non-OK status raises
        the errdefs error for its code. ``timeout`` (seconds) is enforced here
        (DeadlineExceeded) and, unless ``send_timeout`` is false, travels with the call.

        Keep it off the wire where the server's handler leaves work running on the call's
        context after answering: a Go ttrpc server cancels a deadline-carrying context when
        the handler returns (containerd's runc shim then loses the stdio FIFO it was still
        opening for Create and Start)."""
        s = self._stream
        if s.close_reason is not None:
            raise errdefs.Unavailable(s.close_reason)
        if timeout is not None and timeout <= 0:
            raise errdefs.DeadlineExceeded(f"{service}/{method}")
        pairs: list[tuple[str, str]] = []
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                pairs.append((key.lower(), value))  # ttrpc's MD lower-cases keys
        try:
            stream_id, data = s.conn.send_request(
                service,
                method,
                request.SerializeToString(),
                timeout_nano=0 if timeout is None or not send_timeout else max(1, int(timeout * 1e9)),
                metadata=pairs,
            )
        except LocalProtocolError as exc:
            raise errdefs.from_status(exc.code, str(exc)) from None
        future: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        s.calls[stream_id] = future
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                assert s.transport is not None
                s.transport.write(data)
                await s.writable.wait()
                response = await future
        except TimeoutError:
            if not scope.expired():
                raise
            raise errdefs.DeadlineExceeded(f"{service}/{method}") from None
        finally:
            if s.calls.pop(stream_id, None) is not None:
                s.conn.abandon(stream_id)  # timed out or cancelled: a late answer is ignored
            if future.done() and not future.cancelled():
                future.exception()  # consumed, even if we are leaving by cancellation
        if response.code != 0:
            raise errdefs.from_status(response.code, response.message)
        try:
            decoded: M = response_type.FromString(response.payload)
            return decoded
        except DecodeError as exc:
            raise errdefs.Internal(f"ttrpc: cannot decode {service}/{method} response: {exc}") from None

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with Unavailable."""
        self._stream.close_with("ttrpc: closed")
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._stream.lost)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def connect(
    address: str, *, timeout: float | None = 10.0, on_close: Callable[[], object] | None = None
) -> Client:
    """Connect to a ttrpc server at ``unix:///path``, a plain path, or ``unix://@abstract``.

    A missing or refusing socket raises Unavailable naming the address; ``timeout`` passing
    raises DeadlineExceeded. ``on_close`` is called once the connection is gone.
    """
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            stream = await _unix.dial(address, lambda: _ClientStream(address, on_close))
    except TimeoutError:
        if not scope.expired():
            raise
        raise errdefs.DeadlineExceeded(f"ttrpc: dial {address}") from None
    return Client(stream)


async def connect_in_memory(server: Server, *, on_close: Callable[[], object] | None = None) -> Client:
    """A Client whose peer is ``server``, in this process: no socket, no thread.

    The server serves it exactly as a connection accepted on its socket (same dispatch and
    error mapping; counted by ``server.connections`` from the moment this returns; the
    credential check passes, the peer being this process). ``await server.shutdown()``
    closes it as it would a socket's: pending calls fail with Unavailable and then
    ``on_close`` is called, as when a real shim dies. ``await client.close()`` is seen by the
    server as a client hanging up. A server already shutting down raises Unavailable, as
    dialling its removed socket would. ``client.address`` is ``"memory://"``.
    """
    if server._stopped.is_set():
        raise errdefs.Unavailable(f"ttrpc: dial {MEMORY_ADDRESS}: server is shut down")
    stream = _ClientStream(MEMORY_ADDRESS, on_close)
    _memory.pair(stream, server._stream())
    return Client(stream)
