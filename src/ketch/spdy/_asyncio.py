"""The asyncio face of :mod:`ketch.spdy._connection`: a server connection over a stream
reader/writer whose peer opens streams; each stream answered (SYN_REPLY) as it arrives and
handed out by :meth:`ServerConnection.accept`.

Without SPDY flow control (``flow_control=False``, for Go's spdystream peers, which ignore
it), TCP's is what holds a fast sender back: the connection stops reading while a stream has
more than :data:`BACKLOG` bytes its reader has not taken yet."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ketch.spdy._connection import (ConnectionClosed, Connection, DataReceived, ProtocolError, StreamOpened,
                                    StreamReset, WindowOpened)
from ketch.spdy._frames import RST_CANCEL

__all__ = ["ServerConnection", "Stream"]

log = logging.getLogger("ketch.spdy")

_READ = 64 * 1024
#: the most bytes a stream holds for its reader before the connection stops reading
BACKLOG = 1024 * 1024


class Stream:
    """One stream the peer opened: its headers, what it sends (until FIN or reset), and our
    half to write and close."""

    def __init__(self, conn: ServerConnection, id: int, headers: dict[str, str], fin: bool) -> None:
        self._conn = conn
        self.id = id
        self.headers = headers
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._window = asyncio.Event()
        self.queued = 0
        self.reset_status = 0
        self.closed = False
        if fin:
            self._chunks.put_nowait(b"")

    async def read(self) -> bytes:
        """The next bytes the peer sent; b"" once it closed its half (or reset the stream, or
        the connection ended)."""
        chunk = await self._chunks.get()
        if not chunk:
            self._chunks.put_nowait(b"")  # stays at its end
        else:
            self.queued -= len(chunk)
            if self.queued <= BACKLOG:
                self._conn._room.set()
            self._conn._core.consumed(self.id, len(chunk))
            await self._conn._flush()
        return chunk

    async def read_all(self, limit: int = 1 << 20) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk[:limit - len(out)]
        return bytes(out)

    async def write(self, data: bytes, fin: bool = False) -> None:
        """Send ``data`` (waiting for the peer's window as it needs); nothing once the stream
        is closed or reset."""
        view = memoryview(data)
        while not self.closed:
            try:
                n = self._conn._core.send_data(self.id, bytes(view), fin)
            except ProtocolError:
                self.closed = True
                return
            view = view[n:]
            if fin and not view:
                self.closed = True
            await self._conn._flush()
            if not view:
                return
            self._window.clear()
            await self._window.wait()

    async def close(self) -> None:
        """Half-close: FIN on our side."""
        if not self.closed:
            await self.write(b"", fin=True)

    async def reset(self, status: int = RST_CANCEL) -> None:
        self.closed = True
        self._conn._core.reset(self.id, status)
        await self._conn._flush()

    def _ended(self) -> None:
        self.closed = True
        self._chunks.put_nowait(b"")
        self._window.set()


class ServerConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 flow_control: bool = False) -> None:
        self._reader = reader
        self._writer = writer
        self._core = Connection(flow_control=flow_control)
        self._room = asyncio.Event()
        self._room.set()
        self._streams: dict[int, Stream] = {}
        self._new: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self.done = asyncio.Event()
        self._reading = asyncio.ensure_future(self._read_loop())

    async def _flush(self) -> None:
        data = self._core.data_to_send()
        if not data or self._writer.is_closing():
            return
        async with self._lock:
            self._writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def accept(self) -> Stream | None:
        """The next stream the peer opens; None once the connection is over."""
        stream = await self._new.get()
        if stream is None:
            self._new.put_nowait(None)
        return stream

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._room.wait()
                try:
                    data = await self._reader.read(_READ)
                except ConnectionError:
                    data = b""
                if not data:
                    break
                for event in self._core.receive(data):
                    if isinstance(event, StreamOpened):
                        stream = self._streams[event.stream_id] = Stream(self, event.stream_id, event.headers,
                                                                         event.fin)
                        self._core.reply(event.stream_id)
                        self._new.put_nowait(stream)
                    elif isinstance(event, DataReceived):
                        target = self._streams.get(event.stream_id)
                        if target is not None:
                            if event.data:
                                target._chunks.put_nowait(event.data)
                                target.queued += len(event.data)
                                if target.queued > BACKLOG:
                                    self._room.clear()
                            if event.fin:
                                target._chunks.put_nowait(b"")
                    elif isinstance(event, StreamReset):
                        gone = self._streams.pop(event.stream_id, None)
                        if gone is not None:
                            gone.reset_status = event.status
                            gone._ended()
                    elif isinstance(event, WindowOpened):
                        for s in ([self._streams[event.stream_id]] if event.stream_id in self._streams
                                  else list(self._streams.values()) if event.stream_id == 0 else []):
                            s._window.set()
                    elif isinstance(event, ConnectionClosed):
                        if event.error:
                            log.info("spdy connection: %s", event.error)
                await self._flush()
                if self._core.closed:
                    break
        finally:
            for s in self._streams.values():
                s._ended()
            self._room.set()
            self._new.put_nowait(None)
            self.done.set()

    async def close(self, linger: float = 2.0) -> None:
        """GOAWAY, then end the connection once the peer did (or after ``linger`` seconds), so
        that what we sent last is not lost to a reset."""
        self._core.go_away()
        await self._flush()
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.done.wait()), linger)
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
