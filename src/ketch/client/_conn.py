"""The connection: where the daemon is, which namespace a call is in, and errors.

Every call goes through :meth:`Connection.call`, which adds the namespace header, converts a
gRPC status into ketch's typed error (``except NotFound`` works as in the daemon) and, when
asked, rides out a daemon restart (``wait_for_ready``: the call waits for the socket to answer
again instead of failing with Unavailable).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from ketch import errdefs, identifiers

__all__ = ["Connection", "default_address", "default_namespace", "from_grpc"]

#: gRPC's reconnect backoff grows to two minutes by default; a client of a local daemon that
#: restarts wants to be back within a fraction of a second
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def default_address(address: str | None = None) -> str:
    """The daemon's socket: ``address``, else $KETCH_ADDRESS, else $CONTAINERD_ADDRESS, else
    ketchd's default socket."""
    if address:
        return address
    for var in ("KETCH_ADDRESS", "CONTAINERD_ADDRESS"):
        if os.environ.get(var):
            return os.environ[var]
    from ketch import config

    return config.load().grpc.address


def default_namespace(namespace: str | None = None) -> str:
    """``namespace``, else $KETCH_NAMESPACE, else $CONTAINERD_NAMESPACE, else ``default``."""
    for value in (namespace, os.environ.get("KETCH_NAMESPACE"), os.environ.get("CONTAINERD_NAMESPACE")):
        if value:
            identifiers.validate(value)
            return value
    return "default"


def from_grpc(err: grpc.aio.AioRpcError, address: str = "") -> errdefs.KetchError:
    """The typed error a gRPC status means; an unreachable daemon names its socket."""
    code = err.code().value[0]
    message = err.details() or ""
    if code == errdefs.Code.UNAVAILABLE and address:
        message = f"cannot reach the daemon at {address}: {message}"
    return errdefs.from_status(code, message)


class Connection:
    """One channel to the daemon, shared by everything a client makes."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        target = address if "://" in address else f"unix://{address}"
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stubs: dict[type, Any] = {}
        #: the process IO copies made through this connection (ketch.client._io.ProcessIO)
        self.ios: set[Any] = set()

    def stub(self, cls: type) -> Any:
        """The stub of one service (made once)."""
        if cls not in self._stubs:
            self._stubs[cls] = cls(self.channel)
        return self._stubs[cls]

    def metadata(self, namespace: str | None = None) -> tuple[tuple[str, str], ...]:
        return ((identifiers.GRPC_NAMESPACE_KEY, namespace or self.namespace),)

    async def call(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None,
                   wait_for_ready: bool = False, namespace: str | None = None) -> Any:
        """``method(request)`` in the namespace; a gRPC error becomes its typed error."""
        try:
            return await method(request, metadata=self.metadata(namespace), timeout=timeout,
                                wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.address) from None

    async def stream(self, method: Callable[..., Any], request: Any, *, wait_for_ready: bool = False,
                     namespace: str | None = None) -> AsyncIterator[Any]:
        """The messages of a server stream, errors typed."""
        call = method(request, metadata=self.metadata(namespace), wait_for_ready=wait_for_ready)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.address) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for io in list(self.ios):
            await io.close()
        self.ios.clear()
        await self.channel.close()
