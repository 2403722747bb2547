"""The ttrpc protocol as a state machine over bytes, with no IO (and no asyncio).

A Connection is one end of one ttrpc connection, either the CLIENT or the SERVER end. The
caller moves bytes; the Connection turns them into events and turns calls into bytes::

    conn.receive_data(chunk)            # b"" when the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                             # RequestReceived, ResponseReceived, ...
    stream_id, data = conn.send_request(service, method, payload)   # client
    data = conn.send_response(stream_id, code, message, payload)    # server

It owns the receive buffer and the stream table: the streams a client awaits answers on, or
the requests a server has yet to answer. The rules for bad input follow ttrpc v1.1.1 and all
keep the connection up:

* a frame longer than MESSAGE_LENGTH_MAX is discarded as its bytes arrive (it is never
  buffered) and then reported on its stream with RESOURCE_EXHAUSTED;
* server: a request payload that is not a ttrpc.Request, an even stream id, or a stream id
  already in use is refused on that stream with INVALID_ARGUMENT;
* frames of a type the role does not handle, and responses for streams nobody awaits, are
  dropped with a FrameIgnored event.

Errors raised (as opposed to reported): LocalProtocolError from the ``send_*`` methods when
the caller breaks the rules, RemoteProtocolError from ``next_event`` when the peer closes in
the middle of a frame.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from ketch.errdefs import Code

from . import ttrpc_pb2
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    ConnectionClosed,
    FrameIgnored,
    NextEvent,
    ProtocolErrorEvent,
    RequestReceived,
    ResponseReceived,
)
from ._frames import HEADER_LENGTH, MESSAGE_LENGTH_MAX, STREAM_ID_MAX, FrameType, decode_header, encode_frame


class Role(enum.Enum):
    CLIENT = "client"  #: sends requests on odd stream ids, receives responses
    SERVER = "server"  #: receives requests, sends responses


CLIENT = Role.CLIENT
SERVER = Role.SERVER


def _too_long(length: int) -> str:
    # ttrpc v1.1.1's wording, so logs read the same whichever side produced them.
    return f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"


class Connection:
    """One end of a ttrpc connection. Not thread-safe; one owner drives it."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self._buffer = bytearray()
        # An oversize frame being discarded: bytes still to drop, and (stream id, type,
        # declared length) to report once they are gone.
        self._skip_left = 0
        self._skipping: tuple[int, int, int] | None = None
        self._eof = False
        self._next_stream_id = 1
        # client: streams awaiting a response; server: requests awaiting our response
        self._streams: set[int] = set()

    # -- state, for callers and tests -------------------------------------------------

    @property
    def open_streams(self) -> frozenset[int]:
        """Stream ids with a request and no response yet."""
        return frozenset(self._streams)

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events (not counting discarded ones)."""
        return len(self._buffer)

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its end."""
        if self._eof:
            raise LocalProtocolError("receive_data() after the end of the stream")
        if not data:
            self._eof = True
            return
        if self._skip_left and not self._buffer:
            # Inside an oversize frame: drop its bytes here, without buffering them.
            dropped = min(self._skip_left, len(data))
            self._skip_left -= dropped
            if dropped == len(data):
                return
            data = memoryview(data)[dropped:]
        self._buffer += data

    def next_event(self) -> NextEvent:
        """The next event from the bytes received so far, or NEED_DATA."""
        buffer = self._buffer
        while True:
            if self._skipping is not None:
                if self._skip_left:
                    dropped = min(self._skip_left, len(buffer))
                    del buffer[:dropped]
                    self._skip_left -= dropped
                    if self._skip_left:
                        return self._out_of_data()
                event = self._oversize_skipped()
                if event is not None:
                    return event
                continue
            if len(buffer) < HEADER_LENGTH:
                return self._out_of_data()
            length, stream_id, frame_type, _flags = decode_header(buffer)
            if length > MESSAGE_LENGTH_MAX:
                del buffer[:HEADER_LENGTH]
                self._skipping = (stream_id, frame_type, length)
                self._skip_left = length
                continue
            end = HEADER_LENGTH + length
            if len(buffer) < end:
                return self._out_of_data()
            with memoryview(buffer) as view:
                payload = view[HEADER_LENGTH:end].tobytes()
            del buffer[:end]
            if self.role is SERVER:
                return self._on_server_frame(stream_id, frame_type, payload)
            return self._on_client_frame(stream_id, frame_type, payload)

    def _out_of_data(self) -> NextEvent:
        if not self._eof:
            return NEED_DATA
        if self._buffer or self._skip_left:
            left = len(self._buffer) + self._skip_left
            self._buffer.clear()
            self._skip_left = 0
            self._skipping = None
            raise RemoteProtocolError(
                f"peer closed the connection in the middle of a frame ({left} bytes missing or unread)",
                Code.UNAVAILABLE,
            )
        return ConnectionClosed()

    def _oversize_skipped(self) -> ProtocolErrorEvent | FrameIgnored | None:
        assert self._skipping is not None
        stream_id, frame_type, length = self._skipping
        self._skipping = None
        message = _too_long(length)
        if self.role is SERVER:
            if frame_type != FrameType.REQUEST:
                return FrameIgnored(stream_id=stream_id, frame_type=frame_type, reason=message)
            return self._refuse(stream_id, Code.RESOURCE_EXHAUSTED, message)
        if frame_type == FrameType.RESPONSE and stream_id in self._streams:
            self._streams.discard(stream_id)
            return ProtocolErrorEvent(stream_id=stream_id, code=Code.RESOURCE_EXHAUSTED, message=message)
        return FrameIgnored(stream_id=stream_id, frame_type=frame_type, reason=message)

    def _on_server_frame(self, stream_id: int, frame_type: int, payload: bytes) -> NextEvent:
        if frame_type != FrameType.REQUEST:
            return FrameIgnored(
                stream_id=stream_id, frame_type=frame_type, reason=f"frame type {frame_type} is not a request"
            )
        # Same order of checks as ttrpc v1.1.1: decode first, then the stream id.
        try:
            request = ttrpc_pb2.Request.FromString(payload)
        except DecodeError as exc:
            return self._refuse(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        if stream_id % 2 != 1:
            return self._refuse(
                stream_id, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        if stream_id in self._streams:
            return self._refuse(stream_id, Code.INVALID_ARGUMENT, f"stream {stream_id} already has a request")
        self._streams.add(stream_id)
        return RequestReceived(
            stream_id=stream_id,
            service=request.service,
            method=request.method,
            payload=request.payload,
            timeout_nano=request.timeout_nano,
            metadata=tuple((kv.key, kv.value) for kv in request.metadata),
        )

    def _on_client_frame(self, stream_id: int, frame_type: int, payload: bytes) -> NextEvent:
        if frame_type != FrameType.RESPONSE:
            return FrameIgnored(
                stream_id=stream_id, frame_type=frame_type, reason=f"frame type {frame_type} is not a response"
            )
        if stream_id not in self._streams:
            return FrameIgnored(
                stream_id=stream_id, frame_type=frame_type, reason=f"response for unknown stream {stream_id}"
            )
        self._streams.discard(stream_id)
        try:
            response = ttrpc_pb2.Response.FromString(payload)
        except DecodeError as exc:
            return ProtocolErrorEvent(
                stream_id=stream_id, code=Code.UNKNOWN, message=f"unmarshal response error: {exc}"
            )
        return ResponseReceived(
            stream_id=stream_id,
            code=response.status.code,
            message=response.status.message,
            payload=response.payload,
        )

    def _refuse(self, stream_id: int, code: Code, message: str) -> ProtocolErrorEvent:
        reply = self._encode_response(stream_id, code, message, b"")
        return ProtocolErrorEvent(stream_id=stream_id, code=code, message=message, reply=reply)

    # -- sending ------------------------------------------------------------------------

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Frame a call; returns the new stream id and the bytes to write."""
        if self.role is not CLIENT:
            raise LocalProtocolError("only a client sends requests")
        stream_id = self._next_stream_id
        if stream_id > STREAM_ID_MAX:
            raise LocalProtocolError("stream ids exhausted; open a new connection", Code.RESOURCE_EXHAUSTED)
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
        for key, value in metadata:
            request.metadata.add(key=key, value=value)
        body = request.SerializeToString()
        if len(body) > MESSAGE_LENGTH_MAX:
            raise LocalProtocolError(_too_long(len(body)), Code.RESOURCE_EXHAUSTED)
        self._next_stream_id = stream_id + 2
        self._streams.add(stream_id)
        return stream_id, encode_frame(stream_id, FrameType.REQUEST, body)

    def abandon(self, stream_id: int) -> None:
        """Client: stop waiting on a stream (the call timed out or was cancelled); a late
        response for it then comes out as FrameIgnored."""
        self._streams.discard(stream_id)

    def send_response(self, stream_id: int, code: int, message: str = "", payload: bytes = b"") -> bytes:
        """Frame the answer to the request on ``stream_id``; returns the bytes to write.

        Raises LocalProtocolError if that stream has no unanswered request, or (code
        RESOURCE_EXHAUSTED, the stream still open) if the response is too big to send; the
        caller can then answer with an error instead.
        """
        if self.role is not SERVER:
            raise LocalProtocolError("only a server sends responses")
        if stream_id not in self._streams:
            raise LocalProtocolError(f"stream {stream_id} has no request to answer")
        data = self._encode_response(stream_id, code, message, payload)
        self._streams.discard(stream_id)
        return data

    @staticmethod
    def _encode_response(stream_id: int, code: int, message: str, payload: bytes) -> bytes:
        response = ttrpc_pb2.Response(payload=payload)
        # Always present, as Go's status.Proto() is, even for OK: an empty field 1.
        response.status.SetInParent()
        response.status.code = code
        response.status.message = message
        body = response.SerializeToString()
        if len(body) > MESSAGE_LENGTH_MAX:
            raise LocalProtocolError(_too_long(len(body)), Code.RESOURCE_EXHAUSTED)
        return encode_frame(stream_id, FrameType.RESPONSE, body)
