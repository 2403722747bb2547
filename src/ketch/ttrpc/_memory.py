"""The in-memory backend: two asyncio transports joined back to back, no socket, no thread.

``pair(a, b)`` connects two protocols as if ``a`` had dialled ``b`` over a unix socket. What
one side writes reaches the other in order on a later loop iteration (one ``call_soon`` per
write), as socket reads would; nothing is ever paused. Closing behaves as a socket does:

* ``close()``: what was written is delivered first; then the closing side's protocol gets
  ``connection_lost(None)`` and the other side ``eof_received()`` (and, if that returns
  false, as ttrpc's protocols do, it closes in turn);
* ``abort()``: the other side gets ``connection_lost(ConnectionResetError)``;
* a side that is closing reads nothing more.

Each transport answers ``get_extra_info("peercred")`` with this process's (pid, uid, gid):
the peer is this process.
"""

from __future__ import annotations

import asyncio
import errno
import os


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory pair; make them with pair()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__({"peercred": (os.getpid(), os.geteuid(), os.getegid())})
        self._loop = loop
        self._protocol = protocol
        self._peer: MemoryTransport | None = None
        self._closing = False
        self._lost = False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._peer is None or not data:
            return
        self._loop.call_soon(self._peer._receive, bytes(data))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._shut, False)  # after the writes already queued

    def abort(self) -> None:
        self._closing = True
        self._loop.call_soon(self._shut, True)

    # -- the other end calls these ------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        if not self._closing:
            self._protocol.data_received(data)

    def _shut(self, reset: bool) -> None:
        if self._lost:
            return
        self._lost = True
        self._protocol.connection_lost(None)
        peer = self._peer
        if peer is not None:
            peer._peer_gone(reset)

    def _peer_gone(self, reset: bool) -> None:
        if self._lost:
            return
        if reset:
            self._closing = self._lost = True
            self._protocol.connection_lost(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
        elif not self._closing and not self._protocol.eof_received():
            self.close()


def pair(client: asyncio.Protocol, server: asyncio.Protocol) -> None:
    """Join two protocols with a pair of in-memory transports; both are connected on return
    (``connection_made`` was called, the client's first)."""
    loop = asyncio.get_running_loop()
    a, b = MemoryTransport(loop, client), MemoryTransport(loop, server)
    a._peer, b._peer = b, a
    client.connection_made(a)
    server.connection_made(b)
