"""The SPDY/3.1 protocol core, without I/O: bytes in (:meth:`Connection.receive`), events out,
bytes to send (:meth:`Connection.data_to_send`).

It is the server side as Kubernetes' streaming clients use it: the client opens every stream
(odd ids) and the server answers each with SYN_REPLY; either side half-closes a stream with
FIN and may reset it; PINGs from the peer are echoed; GOAWAY ends the connection.

Flow control (SPDY/3.1 section 2.6.8): each stream's receive window starts at 64 KiB; the
application says how much it consumed (:meth:`Connection.consumed`) and a WINDOW_UPDATE gives
that back to the peer once half the window is used. The send window of each stream and of
the connection starts at 64 KiB (or the peer's SETTINGS_INITIAL_WINDOW_SIZE) and grows by the
peer's WINDOW_UPDATEs; :meth:`Connection.send_data` sends no more than the window allows and
says how much it took; a peer overrunning our window has the stream reset. Go's spdystream,
which Kubernetes' clients and kubelet use, neither sends WINDOW_UPDATE nor heeds it (it relies
on TCP's flow control alone): with ``flow_control=False`` the windows are counted and given
back as above, but neither side's is enforced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ketch.spdy._frames import (FLAG_FIN, GOAWAY_OK, GOAWAY_PROTOCOL_ERROR, RST_FLOW_CONTROL_ERROR,
                                RST_INVALID_STREAM, RST_PROTOCOL_ERROR, RST_STREAM_IN_USE,
                                SETTINGS_INITIAL_WINDOW_SIZE, DataFrame, Frame, FrameError, GoAway,
                                HeaderCompressor, HeaderDecompressor, Headers, Ping, RstStream, Settings, SynReply,
                                SynStream, WindowUpdate, encode, parse)

__all__ = ["Connection", "Event", "StreamOpened", "DataReceived", "StreamReset", "ConnectionClosed",
           "WindowOpened", "DEFAULT_WINDOW", "ProtocolError"]

DEFAULT_WINDOW = 64 * 1024
#: the largest DATA frame we send
MAX_DATA = 16 * 1024


class ProtocolError(Exception):
    """What the application asked breaks the protocol (a stream not open, sending after FIN)."""


@dataclass
class StreamOpened:
    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass
class DataReceived:
    stream_id: int
    data: bytes
    fin: bool


@dataclass
class StreamReset:
    stream_id: int
    status: int


@dataclass
class WindowOpened:
    """A send window grew: data held back may go now (stream 0: the connection's)."""

    stream_id: int


@dataclass
class ConnectionClosed:
    """The peer sent GOAWAY, or broke the protocol (then we sent GOAWAY)."""

    last_good_stream_id: int
    status: int
    error: str = ""


Event = StreamOpened | DataReceived | StreamReset | WindowOpened | ConnectionClosed


@dataclass
class _Stream:
    id: int
    send_window: int
    recv_window: int = DEFAULT_WINDOW
    recv_unacked: int = 0
    local_closed: bool = False
    remote_closed: bool = False


@dataclass
class Connection:
    flow_control: bool = True
    _out: bytearray = field(default_factory=bytearray)
    _in: bytearray = field(default_factory=bytearray)
    _compressor: HeaderCompressor = field(default_factory=HeaderCompressor)
    _decompressor: HeaderDecompressor = field(default_factory=HeaderDecompressor)
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _initial_send_window: int = DEFAULT_WINDOW
    _conn_send_window: int = DEFAULT_WINDOW
    _last_stream_id: int = 0
    closed: bool = False

    # -- bytes in, bytes out ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send(self, frame: Frame) -> None:
        self._out += encode(frame, self._compressor)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the peer; the events they make."""
        if self.closed:
            return []
        self._in += data
        events: list[Event] = []
        while True:
            try:
                frame, size = parse(self._in, self._decompressor)
            except FrameError as e:
                self._in.clear()
                self._send(GoAway(self._last_stream_id, GOAWAY_PROTOCOL_ERROR))
                self.closed = True
                events.append(ConnectionClosed(self._last_stream_id, GOAWAY_PROTOCOL_ERROR, str(e)))
                return events
            if not size:
                return events
            del self._in[:size]
            if frame is not None:
                events.extend(self._handle(frame))
                if self.closed:
                    return events

    def _handle(self, frame: Frame) -> list[Event]:
        if isinstance(frame, SynStream):
            sid = frame.stream_id
            if sid in self._streams:
                self._reset(sid, RST_STREAM_IN_USE)
                return [StreamReset(sid, RST_STREAM_IN_USE)]
            if sid == 0 or sid % 2 == 0 or sid <= self._last_stream_id:
                self._send(RstStream(sid, RST_PROTOCOL_ERROR))
                return []
            self._last_stream_id = sid
            fin = bool(frame.flags & FLAG_FIN)
            self._streams[sid] = _Stream(sid, self._initial_send_window, remote_closed=fin)
            return [StreamOpened(sid, frame.headers, fin)]
        if isinstance(frame, DataFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is None or stream.remote_closed:
                self._send(RstStream(frame.stream_id, RST_INVALID_STREAM))
                return []
            stream.recv_window -= len(frame.data)
            if stream.recv_window < 0 and self.flow_control:
                self._reset(stream.id, RST_FLOW_CONTROL_ERROR)
                return [StreamReset(stream.id, RST_FLOW_CONTROL_ERROR)]
            fin = bool(frame.flags & FLAG_FIN)
            stream.remote_closed = stream.remote_closed or fin
            self._forget_if_done(stream)
            return [DataReceived(frame.stream_id, frame.data, fin)]
        if isinstance(frame, Headers):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and frame.flags & FLAG_FIN:
                stream.remote_closed = True
                self._forget_if_done(stream)
                return [DataReceived(frame.stream_id, b"", True)]
            return []
        if isinstance(frame, RstStream):
            if self._streams.pop(frame.stream_id, None) is None:
                return []
            return [StreamReset(frame.stream_id, frame.status)]
        if isinstance(frame, Settings):
            for _, id, value in frame.entries:
                if id == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self._initial_send_window
                    self._initial_send_window = value
                    for s in self._streams.values():
                        s.send_window += delta
            return []
        if isinstance(frame, Ping):
            if frame.id % 2 == 1:  # the client's (odd ids); ours would be even and we send none
                self._send(Ping(frame.id))
            return []
        if isinstance(frame, GoAway):
            self.closed = True
            return [ConnectionClosed(frame.last_good_stream_id, frame.status)]
        if isinstance(frame, WindowUpdate):
            if frame.stream_id == 0:
                self._conn_send_window += frame.delta
                return [WindowOpened(0)]
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return []
            stream.send_window += frame.delta
            if stream.send_window > 0x7FFFFFFF:
                self._reset(stream.id, RST_FLOW_CONTROL_ERROR)
                return [StreamReset(stream.id, RST_FLOW_CONTROL_ERROR)]
            return [WindowOpened(stream.id)]
        return []  # SYN_REPLY: we open no streams

    # -- what the application does --------------------------------------------------------------

    def _open(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ProtocolError(f"stream {stream_id} is not open")
        return stream

    def _forget_if_done(self, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._streams.pop(stream.id, None)

    def reply(self, stream_id: int, headers: dict[str, str] | None = None, fin: bool = False) -> None:
        stream = self._open(stream_id)
        self._send(SynReply(stream_id, headers or {}, FLAG_FIN if fin else 0))
        if fin:
            stream.local_closed = True
            self._forget_if_done(stream)

    def send_window(self, stream_id: int) -> int:
        """How much :meth:`send_data` would take now."""
        stream = self._open(stream_id)
        if not self.flow_control:
            return 1 << 30
        return max(0, min(stream.send_window, self._conn_send_window))

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> int:
        """Send what the windows allow of ``data`` (and FIN once all of it went); how many
        bytes were taken."""
        stream = self._open(stream_id)
        if stream.local_closed:
            raise ProtocolError(f"stream {stream_id} was closed already")
        n = min(len(data), self.send_window(stream_id))
        for start in range(0, n, MAX_DATA):
            chunk = data[start:min(n, start + MAX_DATA)]
            last = start + MAX_DATA >= n
            self._send(DataFrame(stream_id, chunk, FLAG_FIN if fin and last and n == len(data) else 0))
        stream.send_window -= n
        self._conn_send_window -= n
        if fin and n == len(data):
            if not n:
                self._send(DataFrame(stream_id, b"", FLAG_FIN))
            stream.local_closed = True
            self._forget_if_done(stream)
        return n

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took ``n`` bytes of the stream's data: give them back to the peer
        (a WINDOW_UPDATE once half the window is used)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.recv_unacked += n
        if stream.recv_unacked >= DEFAULT_WINDOW // 2:
            self._send(WindowUpdate(stream_id, stream.recv_unacked))
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def reset(self, stream_id: int, status: int) -> None:
        if stream_id in self._streams:
            self._reset(stream_id, status)

    def _reset(self, stream_id: int, status: int) -> None:
        self._streams.pop(stream_id, None)
        self._send(RstStream(stream_id, status))

    def go_away(self, status: int = GOAWAY_OK) -> None:
        if not self.closed:
            self._send(GoAway(self._last_stream_id, status))
            self.closed = True

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams
