"""The one seam between a byte transport and the sans-IO Connection, for both roles.

A Stream is an asyncio.Protocol over any asyncio.Transport: a unix socket (_unix.py) or one
end of an in-memory pair (_memory.py). It feeds what arrives to its Connection, hands each
event to its role (the server's or the client's subclass), and writes what the role asks to
send. This is the only place that feeds bytes and drains events; the roles only act on them::

    data_received(chunk) → conn.receive_data(chunk) → conn.next_event() … → event_received(e)

It is also the one place where a transport's OSError becomes an errdefs error
(transport_error, map_os_errors). No task per message: everything runs in the transport's
callbacks, and only the server starts a task per request (its handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from ketch import errdefs

from ._connection import Connection, Role
from ._errors import ProtocolError
from ._events import NEED_DATA, ConnectionClosed, FrameIgnored, ProtocolErrorEvent, RequestReceived, ResponseReceived

log = logging.getLogger("ketch.ttrpc")

#: what a role is handed; FrameIgnored is logged here, NEED_DATA and ConnectionClosed end a feed
StreamEvent = RequestReceived | ResponseReceived | ProtocolErrorEvent


def transport_error(exc: BaseException | None, what: str) -> errdefs.KetchError:
    """The errdefs error a caller can act on for a transport failure (``exc`` None: a clean close)."""
    detail = f": {exc.strerror or exc}" if isinstance(exc, OSError) else (f": {exc}" if exc else "")
    if isinstance(exc, PermissionError):
        return errdefs.PermissionDenied(what + detail)
    return errdefs.Unavailable(what + detail)


@contextlib.contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """Turn an OSError from the transport into the errdefs error a caller can act on."""
    try:
        yield
    except OSError as exc:
        raise transport_error(exc, what) from exc


class Stream(asyncio.Protocol):
    """One ttrpc connection over a transport. Subclasses implement event_received and
    protocol_failed, and extend connection_made/connection_lost."""

    def __init__(self, role: Role) -> None:
        self.conn = Connection(role)
        self.transport: asyncio.Transport | None = None
        #: resolved once the transport is gone
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- what a role implements ------------------------------------------------------------

    def event_received(self, event: StreamEvent) -> None:
        raise NotImplementedError

    def protocol_failed(self, exc: ProtocolError) -> None:
        """The peer broke the protocol beyond repair (e.g. closed mid-frame); close."""
        raise NotImplementedError

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return False  # a peer that stops sending is gone, as in ttrpc: close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def _process(self) -> None:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                self.protocol_failed(exc)
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, FrameIgnored):
                log.debug("ttrpc: ignored frame on stream %d: %s", event.stream_id, event.reason)
            else:
                self.event_received(event)

    # -- for the role ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        """Close after flushing what was written; the peer sees the end of the stream."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping anything not yet written."""
        if self.transport is not None:
            self.transport.abort()
