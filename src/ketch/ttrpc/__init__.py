"""ttrpc, the RPC protocol between containerd and its shims (the v1.1 wire format: unary calls).

The protocol itself is a sans-IO state machine, Connection, that turns bytes into events and
calls into bytes (_connection.py). One asyncio adapter runs it for both roles (_stream.py)
over a unix socket (_unix.py) or an in-memory pair (_memory.py): Server (_server.py) serves
either; connect() dials a socket and connect_in_memory() joins a Client to a Server in this
process, for tests without sockets (_client.py). The wire messages are ttrpc.proto's.
"""

from ._client import Client, connect, connect_in_memory
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
from ._server import Context, Method, Server

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
    "connect_in_memory",
    "decode_header",
    "encode_header",
]
