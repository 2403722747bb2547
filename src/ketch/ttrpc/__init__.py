"""ttrpc, the RPC protocol between containerd and its shims (the v1.1 wire format: unary calls).

The protocol itself is a sans-IO state machine, Connection, that turns bytes into events and
calls into bytes. Server, Client and connect() run it over asyncio unix sockets.
"""

from ._asyncio import Client, Context, Method, Server, connect
from ._connection import CLIENT, SERVER, Connection, Role
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    FrameIgnored,
    ProtocolErrorEvent,
    RequestReceived,
    ResponseReceived,
)
from ._frames import HEADER_LENGTH, MESSAGE_LENGTH_MAX, FrameType, decode_header, encode_header

__all__ = [
    "CLIENT",
    "HEADER_LENGTH",
    "MESSAGE_LENGTH_MAX",
    "NEED_DATA",
    "SERVER",
    "Client",
    "Connection",
    "ConnectionClosed",
    "Context",
    "Event",
    "FrameIgnored",
    "FrameType",
    "LocalProtocolError",
    "Method",
    "ProtocolError",
    "ProtocolErrorEvent",
    "RemoteProtocolError",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "Server",
    "connect",
    "decode_header",
    "encode_header",
]
