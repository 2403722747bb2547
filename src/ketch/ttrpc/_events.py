"""What ``Connection.next_event()`` reports.

Events are immutable value objects with keyword-only constructors. They are written by hand
rather than with ``dataclasses`` only to keep that import (and its class-building cost) out of
the shim's start-up path; they behave like ``@dataclass(frozen=True, slots=True, kw_only=True)``.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal, Union

_set = object.__setattr__


class _Event:
    __slots__: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Event)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        parts = []
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bytes) and len(value) > 32:
                text = f"{value[:32]!r}...({len(value)} bytes)"
            else:
                text = repr(value)
            parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"


class RequestReceived(_Event):
    """A client's call (server role). Answer it with ``send_response(stream_id, ...)``."""

    __slots__ = ("stream_id", "service", "method", "payload", "timeout_nano", "metadata")
    stream_id: int
    #: full protobuf service name, e.g. ``containerd.task.v2.Task``
    service: str
    #: bare method name, e.g. ``Create``
    method: str
    #: the serialized request message
    payload: bytes
    #: the caller's remaining time in nanoseconds; 0 means no deadline
    timeout_nano: int
    #: ``(key, value)`` pairs in the order sent; a key may repeat
    metadata: tuple[tuple[str, str], ...]

    def __init__(
        self,
        *,
        stream_id: int,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "service", service)
        _set(self, "method", method)
        _set(self, "payload", payload)
        _set(self, "timeout_nano", timeout_nano)
        _set(self, "metadata", metadata)


class ResponseReceived(_Event):
    """The server's answer to one of our requests (client role)."""

    __slots__ = ("stream_id", "code", "message", "payload")
    stream_id: int
    #: gRPC status code; 0 is OK
    code: int
    message: str
    #: the serialized response message (empty when code is not 0)
    payload: bytes

    def __init__(self, *, stream_id: int, code: int, message: str, payload: bytes) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "code", code)
        _set(self, "message", message)
        _set(self, "payload", payload)


class ProtocolErrorEvent(_Event):
    """The peer broke the protocol on one stream; the connection itself is still fine.

    Server role: the request on ``stream_id`` was refused (oversize, even stream id,
    undecodable, stream id in use) and ``reply`` holds the encoded error response to write.
    Client role: the response on ``stream_id`` could not be read (oversize, undecodable);
    the call waiting on that stream should fail with ``code``/``message``, and ``reply`` is
    empty.
    """

    __slots__ = ("stream_id", "code", "message", "reply")
    stream_id: int
    code: int
    message: str
    reply: bytes

    def __init__(self, *, stream_id: int, code: int, message: str, reply: bytes = b"") -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "code", code)
        _set(self, "message", message)
        _set(self, "reply", reply)


class FrameIgnored(_Event):
    """A frame was dropped without an answer: a type this role does not handle (ttrpc keeps
    unknown types for future use), or a response for a stream we are not waiting on. Worth a
    debug log line, nothing more."""

    __slots__ = ("stream_id", "frame_type", "reason")
    stream_id: int
    frame_type: int
    reason: str

    def __init__(self, *, stream_id: int, frame_type: int, reason: str) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "frame_type", frame_type)
        _set(self, "reason", reason)


class ConnectionClosed(_Event):
    """The peer closed its end (``receive_data(b"")``) and every complete frame was read."""

    __slots__ = ()


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: ``next_event()`` has nothing more until ``receive_data()`` is given more bytes
NEED_DATA: Final = _Sentinel.NEED_DATA

Event = Union[RequestReceived, ResponseReceived, ProtocolErrorEvent, FrameIgnored, ConnectionClosed]
NextEvent = Union[Event, Literal[_Sentinel.NEED_DATA]]
