"""SPDY/3.1, as Kubernetes' streaming (exec, attach, port-forward) speaks it: a sans-IO core
(:mod:`._frames`, :mod:`._connection`) and a thin asyncio adapter (:mod:`._asyncio`)."""

from ketch.spdy._asyncio import ServerConnection, Stream
from ketch.spdy._connection import (DEFAULT_WINDOW, Connection, ConnectionClosed, DataReceived, Event, ProtocolError,
                                    StreamOpened, StreamReset, WindowOpened)
from ketch.spdy._frames import DICTIONARY, FrameError

__all__ = ["DEFAULT_WINDOW", "DICTIONARY", "Connection", "ConnectionClosed", "DataReceived", "Event", "FrameError",
           "ProtocolError", "ServerConnection", "Stream", "StreamOpened", "StreamReset", "WindowOpened"]
