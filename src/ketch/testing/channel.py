"""gRPC servicers in-process: a grpc.aio server on a private unix socket and a channel to it,
for unit tests of the faces without a daemon."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable

import grpc


@contextlib.asynccontextmanager
async def channel_for(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[grpc.aio.Channel]:
    """Serve what ``register`` adds to a fresh server; yield a channel to it; stop both."""
    with tempfile.TemporaryDirectory(prefix="ketch-grpc-") as d:
        server = grpc.aio.server()
        register(server)
        address = f"unix://{d}/grpc.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                yield channel
        finally:
            await server.stop(grace=None)
