"""The ttrpc server: registered services, one task per call, peer credentials and shutdown.

Connections arrive through any backend (a unix socket via serve()/serve_path(), or an
in-memory pair via connect_in_memory()); each is a _ServerStream, and all are served alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from ketch import errdefs

from . import _unix
from ._connection import SERVER
from ._errors import LocalProtocolError, ProtocolError
from ._events import ProtocolErrorEvent, RequestReceived
from ._stream import Stream, StreamEvent

log = logging.getLogger("ketch.ttrpc")


class Context:
    """What a handler knows about its call besides the request message."""

    __slots__ = ("service", "method", "metadata", "deadline")

    def __init__(
        self, service: str, method: str, metadata: dict[str, list[str]], deadline: float | None
    ) -> None:
        self.service = service
        self.method = method
        #: the caller's metadata; keys as sent, values in order (e.g. containerd-namespace-ttrpc)
        self.metadata = metadata
        #: loop.time() by which the caller gives up, or None; the handler runs under it
        self.deadline = deadline


Handler = Callable[[Any, Context], Awaitable[Message]]


class Method:
    """One method of a service: how to decode its request, and the coroutine that answers."""

    __slots__ = ("request_type", "handler")

    def __init__(self, request_type: type[Message], handler: Handler) -> None:
        self.request_type = request_type
        self.handler = handler


class Server:
    """Serves registered services to any number of connections; each call is its own task."""

    def __init__(self, *, require_same_user: bool = True) -> None:
        #: (uid, gid) a peer must connect with (-1 for any), or None to accept everyone.
        #: Defaults to ours, as containerd's UnixSocketRequireSameUser does.
        self.required_peer: tuple[int, int] | None = (os.geteuid(), os.getegid()) if require_same_user else None
        self._services: dict[str, dict[str, Method]] = {}
        self._listeners: set[asyncio.AbstractServer] = set()
        self._connections: set[_ServerStream] = set()
        self._stopped = asyncio.Event()

    def register(self, service: str, methods: dict[str, Method]) -> None:
        if service in self._services:
            raise ValueError(f"ttrpc service {service!r} is already registered")
        self._services[service] = dict(methods)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def serve(self, sock: socket.socket, started: asyncio.Future[None] | None = None) -> None:
        """Accept calls on a bound, listening unix socket until shutdown(). Takes ownership of
        ``sock``. Resolves ``started`` once accepting."""
        if self._stopped.is_set():
            sock.close()
            return
        listener = await _unix.listen(sock, self._stream)
        self._listeners.add(listener)
        try:
            if started is not None and not started.done():
                started.set_result(None)
            await self._stopped.wait()
        finally:
            self._listeners.discard(listener)
            listener.close()

    async def serve_path(
        self, path: str, started: asyncio.Future[None] | None = None, *, mode: int = 0o600, backlog: int = 128
    ) -> None:
        """Bind ``path`` (which must not exist), make it ``mode``, serve until shutdown(), and
        remove it again."""
        sock = _unix.bind(path, mode, backlog)
        try:
            await self.serve(sock, started)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting; give running calls up to ``grace`` seconds; then cancel the rest
        and close every connection. Do not await this from a handler (its own answer would
        be lost): start it as a task instead, with a grace."""
        self._stopped.set()
        for listener in list(self._listeners):
            listener.close()
        me = asyncio.current_task()
        if grace > 0:
            running = [t for c in self._connections for t in c.tasks.values() if t is not me]
            if running:
                await asyncio.wait(running, timeout=grace)
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        tasks = [t for c in connections for t in c.tasks.values() if t is not me]
        if connections:
            _, stuck = await asyncio.wait([c.lost for c in connections], timeout=1.0)
            for conn in connections:
                if conn.lost in stuck:  # the peer does not read: drop what we buffered
                    conn.abort()
            await asyncio.wait([c.lost for c in connections])
        if tasks:
            await asyncio.wait(tasks)

    def _stream(self) -> _ServerStream:
        """A new connection, whatever its backend."""
        return _ServerStream(self)

    def _admit(self, stream: _ServerStream) -> bool:
        """Whether to serve a connection that just arrived: not once stopping, and only from
        the required user (credentials as the backend reports them; unknown ones fail)."""
        if self._stopped.is_set():  # accepted just as shutdown() began
            return False
        wanted = self.required_peer
        if wanted is not None:
            assert stream.transport is not None
            creds = _unix.peer_credentials(stream.transport)
            if creds is None:
                log.warning("ttrpc: refusing connection: peer credentials unknown")
                return False
            _pid, uid, gid = creds
            if (wanted[0] != -1 and uid != wanted[0]) or (wanted[1] != -1 and gid != wanted[1]):
                log.warning("ttrpc: refusing connection from uid %d gid %d", uid, gid)
                return False
        self._connections.add(stream)
        return True

    async def _dispatch(self, event: RequestReceived) -> tuple[int, str, bytes]:
        """Run one call; the one place where its outcome becomes a status."""
        try:
            methods = self._services.get(event.service)
            if methods is None:
                raise errdefs.Unimplemented(f"service {event.service}")
            method = methods.get(event.method)
            if method is None:
                raise errdefs.Unimplemented(f"method {event.method}")
            try:
                request = method.request_type.FromString(event.payload)
            except DecodeError as exc:
                raise errdefs.InvalidArgument(f"ttrpc: error unmarshalling payload: {exc}") from None
            metadata: dict[str, list[str]] = {}
            for key, value in event.metadata:
                metadata.setdefault(key, []).append(value)
            deadline = None
            if event.timeout_nano:
                deadline = asyncio.get_running_loop().time() + event.timeout_nano / 1e9
            ctx = Context(event.service, event.method, metadata, deadline)
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    response = await method.handler(request, ctx)
            except TimeoutError:
                if not scope.expired():
                    raise
                raise errdefs.DeadlineExceeded(f"{event.service}/{event.method}") from None
            if not isinstance(response, Message):
                raise errdefs.Internal(f"ttrpc: {event.method} returned {type(response).__name__}, not a message")
            return 0, "", response.SerializeToString()
        except errdefs.KetchError as exc:
            code, message = errdefs.to_status(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # we are being cancelled: let it through
            code, message = errdefs.to_status(errdefs.Cancelled(f"{event.service}/{event.method}"))
        except Exception as exc:
            log.exception("ttrpc: %s/%s failed", event.service, event.method)
            code, message = errdefs.to_status(exc)
        return code, message, b""


class _ServerStream(Stream):
    """One served connection: requests in, one task per request, responses out."""

    def __init__(self, server: Server) -> None:
        super().__init__(SERVER)
        self.server = server
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.server._admit(self):
            self.abort()

    def event_received(self, event: StreamEvent) -> None:
        if isinstance(event, RequestReceived):
            name = f"ttrpc {event.service}/{event.method} #{event.stream_id}"
            self.tasks[event.stream_id] = asyncio.get_running_loop().create_task(self._answer(event), name=name)
        elif isinstance(event, ProtocolErrorEvent):
            log.debug("ttrpc: refused stream %d: %s", event.stream_id, event.message)
            self.write(event.reply)

    def protocol_failed(self, exc: ProtocolError) -> None:
        log.warning("ttrpc: closing connection: %s", exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for task in self.tasks.values():
            task.cancel()
        super().connection_lost(exc)

    async def _answer(self, event: RequestReceived) -> None:
        try:
            code, message, payload = await self.server._dispatch(event)
            try:
                data = self.conn.send_response(event.stream_id, code, message, payload)
            except LocalProtocolError as exc:  # response too big: say so instead
                data = self.conn.send_response(event.stream_id, exc.code, str(exc))
            self.write(data)
        finally:
            self.tasks.pop(event.stream_id, None)

    def close(self) -> None:
        for task in self.tasks.values():
            if task is not asyncio.current_task():
                task.cancel()
        super().close()
