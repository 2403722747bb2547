"""What every gRPC servicer shares: the namespace of a call, and errdefs → gRPC status.

Servicers are thin: decode, call the core, encode. A core error (errdefs.KetchError) becomes
the gRPC status containerd would send, once, here; any other exception is Unknown and logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ketch import errdefs, identifiers, logfields

log = logging.getLogger("ketch.services")

LEASE_HEADER = "containerd-lease"

_STATUS = {code.value[0]: code for code in grpc.StatusCode}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])


def namespace(context: grpc.aio.ServicerContext) -> str:
    """The namespace of the call, validated; FailedPrecondition when there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == identifiers.GRPC_NAMESPACE_KEY:
            return identifiers.require_namespace(str(value))
    return identifiers.require_namespace("")


def lease_of(context: grpc.aio.ServicerContext) -> str | None:
    """The lease named in the call's ``containerd-lease`` metadata, if any: it holds what the
    call creates."""
    for key, value in context.invocation_metadata() or ():
        if key == LEASE_HEADER:
            return str(value)
    return None


def bind_log_fields(request: Any, context: grpc.aio.ServicerContext) -> None:
    """The call's namespace, container and exec ids on every line it logs (ketch.logfields)."""
    ns = ""
    for key, value in context.invocation_metadata() or ():
        if key == identifiers.GRPC_NAMESPACE_KEY:
            ns = str(value)
    logfields.bind(namespace=ns, container=str(getattr(request, "container_id", "") or ""),
                   exec=str(getattr(request, "exec_id", "") or ""))


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = errdefs.to_status(exc)
    return _STATUS.get(code, grpc.StatusCode.UNKNOWN), message


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status for ``exc`` (raises grpc's AbortError)."""
    code, message = _status(exc)
    await context.abort(code, message)


def unary(fn: F) -> F:
    """Map errors of a unary method to gRPC statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        bind_log_fields(request, context)
        try:
            return await fn(self, request, context)
        except errdefs.KetchError as e:
            await abort(context, e)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # noqa: BLE001 - the one place where the unexpected becomes Unknown
            log.exception("%s failed", fn.__qualname__)
            await context.abort(grpc.StatusCode.UNKNOWN, str(e) or type(e).__name__)

    return wrapper  # type: ignore[return-value]


def stream(fn: G) -> G:
    """Map errors of a server-streaming method to gRPC statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bind_log_fields(request, context)
        try:
            async for item in fn(self, request, context):
                yield item
        except errdefs.KetchError as e:
            await abort(context, e)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", fn.__qualname__)
            await context.abort(grpc.StatusCode.UNKNOWN, str(e) or type(e).__name__)

    return wrapper  # type: ignore[return-value]
