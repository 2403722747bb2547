"""The unix-socket backend: addresses, dialling, binding, listening and peer credentials.

Streams run over asyncio's own unix-socket transports; this module only makes them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

from ketch import errdefs

from ._stream import Stream, map_os_errors

S = TypeVar("S", bound=Stream)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(address: str) -> str:
    """The path to connect() to for ``unix:///path``, a plain path, or ``unix://@abstract``."""
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    elif "://" in address:
        raise errdefs.InvalidArgument(f"ttrpc: unsupported address {address!r} (only unix sockets)")
    if address.startswith("@"):  # abstract socket namespace
        return "\0" + address[1:]
    return address


async def dial(address: str, stream: Callable[[], S]) -> S:
    """Connect to ``address`` and run a new ``stream()`` over it. A missing or refusing socket
    raises Unavailable naming the address."""
    path = socket_path(address)
    with map_os_errors(f"ttrpc: dial {address}"):
        _, protocol = await asyncio.get_running_loop().create_unix_connection(stream, path)
    return protocol


def bind(path: str, mode: int, backlog: int) -> socket.socket:
    """A listening socket at ``path`` (which must not exist) with permissions ``mode``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen(), so no one connects in between
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen(sock: socket.socket, stream: Callable[[], Stream]) -> asyncio.AbstractServer:
    """Accept on a bound, listening socket (taking ownership), a new ``stream()`` per connection."""
    return await asyncio.get_running_loop().create_unix_server(stream, sock=sock)


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end, or None if unknown. A transport may
    state them as its "peercred" extra (the in-memory pair does: its peer is this process);
    for a unix socket they come from SO_PEERCRED."""
    creds: tuple[int, int, int] | None = transport.get_extra_info("peercred")
    if creds is not None:
        return creds
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid
