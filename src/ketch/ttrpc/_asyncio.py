"""ttrpc over asyncio unix sockets: a thin adapter around the sans-IO Connection.

Each side is an asyncio.Protocol that feeds received bytes to its Connection, acts on the
events that come out, and writes what the Connection returns. The protocol rules live in
_connection.py; this module only moves bytes, runs handlers, and resolves futures. It is also
the one place where OS errors become errdefs errors (see _map_os_errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from ketch import errdefs

from ._connection import CLIENT, SERVER, Connection
from ._errors import LocalProtocolError, ProtocolError
from ._events import (
    NEED_DATA,
    ConnectionClosed,
    FrameIgnored,
    ProtocolErrorEvent,
    RequestReceived,
    ResponseReceived,
)

log = logging.getLogger("ketch.ttrpc")

M = TypeVar("M", bound=Message)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@contextlib.contextmanager
def _map_os_errors(what: str) -> Iterator[None]:
    """Turn an OSError from the transport into the errdefs error a caller can act on."""
    try:
        yield
    except OSError as exc:
        raise _os_error(exc, what) from exc


def _os_error(exc: BaseException | None, what: str) -> errdefs.KetchError:
    detail = f": {exc.strerror or exc}" if isinstance(exc, OSError) else (f": {exc}" if exc else "")
    if isinstance(exc, PermissionError):
        return errdefs.PermissionDenied(what + detail)
    return errdefs.Unavailable(what + detail)


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
        self._connections: set[_ServerProtocol] = set()
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
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(lambda: _ServerProtocol(self), sock=sock)
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)  # before listen(), so no one connects in between
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
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


class _ServerProtocol(asyncio.Protocol):
    """One accepted connection: requests in, one task per request, responses out."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn = Connection(SERVER)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.server._stopped.is_set():  # accepted just as shutdown() began
            transport.abort()
            return
        wanted = self.server.required_peer
        if wanted is not None:
            sock = transport.get_extra_info("socket")
            _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if (wanted[0] != -1 and uid != wanted[0]) or (wanted[1] != -1 and gid != wanted[1]):
                log.warning("ttrpc: refusing connection from uid %d gid %d", uid, gid)
                transport.abort()
                return
        self.server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False  # a client that stops sending is gone, as in ttrpc: close

    def _process(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                log.warning("ttrpc: closing connection: %s", exc)
                self.close()
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, RequestReceived):
                name = f"ttrpc {event.service}/{event.method} #{event.stream_id}"
                self.tasks[event.stream_id] = loop.create_task(self._answer(event), name=name)
            elif isinstance(event, ProtocolErrorEvent):
                log.debug("ttrpc: refused stream %d: %s", event.stream_id, event.message)
                self._write(event.reply)
            elif isinstance(event, FrameIgnored):
                log.debug("ttrpc: ignored frame on stream %d: %s", event.stream_id, event.reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for task in self.tasks.values():
            task.cancel()
        if not self.lost.done():
            self.lost.set_result(None)

    async def _answer(self, event: RequestReceived) -> None:
        try:
            code, message, payload = await self.server._dispatch(event)
            try:
                data = self.conn.send_response(event.stream_id, code, message, payload)
            except LocalProtocolError as exc:  # response too big: say so instead
                data = self.conn.send_response(event.stream_id, exc.code, str(exc))
            self._write(data)
        finally:
            self.tasks.pop(event.stream_id, None)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        for task in self.tasks.values():
            if task is not asyncio.current_task():
                task.cancel()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _ClientProtocol(asyncio.Protocol):
    """The client's connection: resolves one future per stream as responses arrive."""

    def __init__(self, address: str, on_close: Callable[[], object] | None) -> None:
        self.address = address
        self.conn = Connection(CLIENT)
        self.calls: dict[int, asyncio.Future[ResponseReceived]] = {}
        self.transport: asyncio.Transport | None = None
        self.close_reason: str | None = None  # set once closing; later calls fail with it
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False

    def _process(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError as exc:
                self.close(f"ttrpc: {exc}")
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, (ResponseReceived, ProtocolErrorEvent)):
                future = self.calls.pop(event.stream_id, None)
                if future is None or future.done():
                    continue
                if isinstance(event, ResponseReceived):
                    future.set_result(event)
                else:
                    future.set_exception(errdefs.from_status(event.code, event.message))
            elif isinstance(event, FrameIgnored):
                log.debug("ttrpc: ignored frame on stream %d: %s", event.stream_id, event.reason)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_reason is None:
            self.close_reason = _os_error(exc, "ttrpc: connection closed").message
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(errdefs.Unavailable(self.close_reason))
        self.writable.set()
        if not self.lost.done():
            self.lost.set_result(None)
        if self.on_close is not None:
            try:
                self.on_close()
            except Exception:
                log.exception("ttrpc: on_close callback failed")

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.close()


class Client:
    """A ttrpc connection to one server; make it with ``await connect(address)``."""

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol

    @property
    def address(self) -> str:
        return self._protocol.address

    @property
    def closed(self) -> bool:
        """True once closing started, by close() or by the connection dropping."""
        return self._protocol.close_reason is not None

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
        p = self._protocol
        if p.close_reason is not None:
            raise errdefs.Unavailable(p.close_reason)
        if timeout is not None and timeout <= 0:
            raise errdefs.DeadlineExceeded(f"{service}/{method}")
        pairs: list[tuple[str, str]] = []
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                pairs.append((key.lower(), value))  # ttrpc's MD lower-cases keys
        try:
            stream_id, data = p.conn.send_request(
                service,
                method,
                request.SerializeToString(),
                timeout_nano=0 if timeout is None or not send_timeout else max(1, int(timeout * 1e9)),
                metadata=pairs,
            )
        except LocalProtocolError as exc:
            raise errdefs.from_status(exc.code, str(exc)) from None
        future: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        p.calls[stream_id] = future
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                assert p.transport is not None
                p.transport.write(data)
                await p.writable.wait()
                response = await future
        except TimeoutError:
            if not scope.expired():
                raise
            raise errdefs.DeadlineExceeded(f"{service}/{method}") from None
        finally:
            if p.calls.pop(stream_id, None) is not None:
                p.conn.abandon(stream_id)  # timed out or cancelled: a late answer is ignored
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
        self._protocol.close("ttrpc: closed")
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._protocol.lost)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _socket_path(address: str) -> str:
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    elif "://" in address:
        raise errdefs.InvalidArgument(f"ttrpc: unsupported address {address!r} (only unix sockets)")
    if address.startswith("@"):  # abstract socket namespace
        return "\0" + address[1:]
    return address


async def connect(
    address: str, *, timeout: float | None = 10.0, on_close: Callable[[], object] | None = None
) -> Client:
    """Connect to a ttrpc server at ``unix:///path``, a plain path, or ``unix://@abstract``.

    A missing or refusing socket raises Unavailable naming the address; ``timeout`` passing
    raises DeadlineExceeded. ``on_close`` is called once the connection is gone.
    """
    path = _socket_path(address)
    loop = asyncio.get_running_loop()
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            with _map_os_errors(f"ttrpc: dial {address}"):
                _, protocol = await loop.create_unix_connection(lambda: _ClientProtocol(address, on_close), path)
    except TimeoutError:
        if not scope.expired():
            raise
        raise errdefs.DeadlineExceeded(f"ttrpc: dial {address}") from None
    return Client(protocol)
