"""The sans-IO ttrpc core, driven byte by byte: no sockets, no event loop."""

from __future__ import annotations

import struct

import pytest

from ketch.api.google.rpc import status_pb2
from ketch.errdefs import Code
from ketch.ttrpc import ttrpc_pb2
from ketch.ttrpc import (
    CLIENT,
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    NEED_DATA,
    SERVER,
    Connection,
    ConnectionClosed,
    Event,
    FrameIgnored,
    FrameType,
    LocalProtocolError,
    ProtocolErrorEvent,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    decode_header,
    encode_header,
)


def events(conn: Connection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def frame(stream_id: int, frame_type: int, payload: bytes) -> bytes:
    return encode_header(len(payload), stream_id, frame_type) + payload


def request_bytes(**fields: object) -> bytes:
    return ttrpc_pb2.Request(**fields).SerializeToString()  # type: ignore[arg-type]


class ConnectionPair:
    """A client and a server Connection; what one sends, the test hands to the other."""

    def __init__(self) -> None:
        self.client = Connection(CLIENT)
        self.server = Connection(SERVER)

    def to_server(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        return events(self.server)

    def to_client(self, data: bytes) -> list[Event]:
        self.client.receive_data(data)
        return events(self.client)

    def call(self, service: str = "svc", method: str = "M", payload: bytes = b"req") -> tuple[int, RequestReceived]:
        stream_id, data = self.client.send_request(service, method, payload)
        [event] = self.to_server(data)
        assert isinstance(event, RequestReceived)
        return stream_id, event


def test_header_round_trip() -> None:
    header = encode_header(0x01020304, 0xA0B0C0D, FrameType.RESPONSE, 0x5)
    assert header == bytes.fromhex("01020304 0a0b0c0d 02 05")
    assert len(header) == HEADER_LENGTH
    assert decode_header(header) == (0x01020304, 0xA0B0C0D, 2, 5)
    assert decode_header(b"xx" + header, 2) == (0x01020304, 0xA0B0C0D, 2, 5)
    with pytest.raises(LocalProtocolError):
        decode_header(header[:9])
    with pytest.raises(LocalProtocolError):
        encode_header(1 << 32, 1, FrameType.REQUEST)


def test_round_trip() -> None:
    pair = ConnectionPair()
    stream_id, data = pair.client.send_request(
        "containerd.task.v2.Task", "State", b"\x0a\x02c1", timeout_nano=5, metadata=[("k", "a"), ("k", "b")]
    )
    assert stream_id == 1
    assert pair.client.open_streams == {1}
    [request] = pair.to_server(data)
    assert request == RequestReceived(
        stream_id=1,
        service="containerd.task.v2.Task",
        method="State",
        payload=b"\x0a\x02c1",
        timeout_nano=5,
        metadata=(("k", "a"), ("k", "b")),
    )
    assert pair.server.open_streams == {1}

    [response] = pair.to_client(pair.server.send_response(1, 0, "", b"answer"))
    assert response == ResponseReceived(stream_id=1, code=0, message="", payload=b"answer")
    assert pair.client.open_streams == pair.server.open_streams == frozenset()


def test_stream_ids_are_odd_and_increase() -> None:
    client = Connection(CLIENT)
    assert [client.send_request("s", "m", b"")[0] for _ in range(4)] == [1, 3, 5, 7]


def test_error_status_round_trip() -> None:
    pair = ConnectionPair()
    stream_id, _ = pair.call()
    [response] = pair.to_client(pair.server.send_response(stream_id, Code.NOT_FOUND, "container x: not found"))
    assert response == ResponseReceived(
        stream_id=stream_id, code=Code.NOT_FOUND, message="container x: not found", payload=b""
    )


def test_partial_frames_byte_by_byte() -> None:
    pair = ConnectionPair()
    _, data = pair.client.send_request("svc", "M", b"x" * 300)
    for byte in data[:-1]:
        assert pair.to_server(bytes([byte])) == []
    [request] = pair.to_server(data[-1:])
    assert isinstance(request, RequestReceived)
    assert request.payload == b"x" * 300
    assert pair.server.buffered == 0


def test_two_frames_in_one_chunk() -> None:
    pair = ConnectionPair()
    (_, first), (_, second) = pair.client.send_request("s", "A", b"1"), pair.client.send_request("s", "B", b"2")
    # and the start of a third, which waits
    _, third = pair.client.send_request("s", "C", b"3")
    got = pair.to_server(first + second + third[:4])
    assert [(e.stream_id, e.method) for e in got if isinstance(e, RequestReceived)] == [(1, "A"), (3, "B")]
    assert len(got) == 2
    [event] = pair.to_server(third[4:])
    assert isinstance(event, RequestReceived) and event.method == "C"


def test_oversize_request_is_skipped_across_chunks_and_refused() -> None:
    pair = ConnectionPair()
    big_id, _ = pair.client.send_request("svc", "Big", b"")  # as if it had sent a huge one
    length = MESSAGE_LENGTH_MAX + 1
    header = encode_header(length, big_id, FrameType.REQUEST)
    _, after = pair.client.send_request("svc", "After", b"ok")

    assert pair.to_server(header + b"\0" * 1000) == []
    chunk = b"\0" * 65536
    sent = 1000
    while sent + len(chunk) < length:
        assert pair.to_server(chunk) == []
        assert pair.server.buffered == 0  # discarded as it arrives, never buffered
        sent += len(chunk)
    # the end of the big frame and the next frame arrive together
    got = pair.to_server(b"\0" * (length - sent) + after)
    assert len(got) == 2
    refused, request = got
    assert isinstance(refused, ProtocolErrorEvent)
    assert refused.stream_id == big_id
    assert refused.code == Code.RESOURCE_EXHAUSTED
    assert refused.message == f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"
    assert isinstance(request, RequestReceived) and request.stream_id == 3 and request.method == "After"
    assert pair.server.open_streams == {3}

    # the reply the server is to write fails the client's call on that stream only
    [failed] = pair.to_client(refused.reply)
    assert failed == ResponseReceived(
        stream_id=big_id, code=Code.RESOURCE_EXHAUSTED, message=refused.message, payload=b""
    )
    [answer] = pair.to_client(pair.server.send_response(3, 0, "", b"fine"))
    assert isinstance(answer, ResponseReceived) and answer.payload == b"fine"


def test_exactly_max_length_is_accepted() -> None:
    body = request_bytes(service="s", method="m", payload=b"p" * (MESSAGE_LENGTH_MAX - 11))
    assert len(body) == MESSAGE_LENGTH_MAX
    server = Connection(SERVER)
    server.receive_data(frame(1, FrameType.REQUEST, body))
    [event] = events(server)
    assert isinstance(event, RequestReceived)


def test_oversize_response_fails_that_call_only() -> None:
    client = Connection(CLIENT)
    first, _ = client.send_request("s", "m", b"")
    second, _ = client.send_request("s", "m", b"")
    length = MESSAGE_LENGTH_MAX + 10
    client.receive_data(encode_header(length, first, FrameType.RESPONSE))
    assert events(client) == []
    client.receive_data(b"\0" * length)
    [failed] = events(client)
    assert failed == ProtocolErrorEvent(
        stream_id=first,
        code=Code.RESOURCE_EXHAUSTED,
        message=f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}",
    )
    assert client.open_streams == {second}


def test_even_stream_id_is_refused_on_that_stream() -> None:
    pair = ConnectionPair()
    [refused] = pair.to_server(frame(2, FrameType.REQUEST, request_bytes(service="s", method="m")))
    assert isinstance(refused, ProtocolErrorEvent)
    assert (refused.stream_id, refused.code) == (2, Code.INVALID_ARGUMENT)
    assert refused.message == "StreamID must be odd for client initiated streams"
    response = ttrpc_pb2.Response.FromString(refused.reply[HEADER_LENGTH:])
    assert decode_header(refused.reply)[1] == 2
    assert (response.status.code, response.status.message) == (Code.INVALID_ARGUMENT, refused.message)
    assert pair.server.open_streams == frozenset()
    # and the connection still works
    assert pair.call()[1].stream_id == 1


def test_garbage_payload_is_refused_on_that_stream() -> None:
    pair = ConnectionPair()
    [refused] = pair.to_server(frame(7, FrameType.REQUEST, b"\xff\xff\xff\xff"))
    assert isinstance(refused, ProtocolErrorEvent)
    assert (refused.stream_id, refused.code) == (7, Code.INVALID_ARGUMENT)
    assert refused.message.startswith("unmarshal request error")
    assert pair.call()[1].stream_id == 1


def test_stream_id_in_use_is_refused() -> None:
    server = Connection(SERVER)
    request = frame(1, FrameType.REQUEST, request_bytes(service="s", method="m"))
    server.receive_data(request + request)
    first, second = events(server)
    assert isinstance(first, RequestReceived)
    assert isinstance(second, ProtocolErrorEvent) and second.code == Code.INVALID_ARGUMENT
    assert server.open_streams == {1}


def test_response_for_unknown_stream_is_ignored() -> None:
    pair = ConnectionPair()
    stream_id, _ = pair.call()
    bogus = frame(41, FrameType.RESPONSE, ttrpc_pb2.Response(payload=b"?").SerializeToString())
    [ignored] = pair.to_client(bogus)
    assert isinstance(ignored, FrameIgnored) and ignored.stream_id == 41
    # the real answer still gets through
    [response] = pair.to_client(pair.server.send_response(stream_id, 0, "", b"fine"))
    assert isinstance(response, ResponseReceived) and response.payload == b"fine"


def test_late_response_after_abandon_is_ignored() -> None:
    pair = ConnectionPair()
    stream_id, _ = pair.call()
    pair.client.abandon(stream_id)
    [ignored] = pair.to_client(pair.server.send_response(stream_id, 0))
    assert isinstance(ignored, FrameIgnored)


@pytest.mark.parametrize("frame_type", [FrameType.DATA, 0, 9, 255])
def test_unknown_frame_type_is_ignored(frame_type: int) -> None:
    pair = ConnectionPair()
    [ignored] = pair.to_server(frame(1, frame_type, b"whatever"))
    reason = f"frame type {frame_type} is not a request"
    assert ignored == FrameIgnored(stream_id=1, frame_type=frame_type, reason=reason)
    assert pair.call()[1].stream_id == 1
    [ignored] = pair.to_client(frame(1, frame_type, b""))
    assert isinstance(ignored, FrameIgnored)
    assert pair.client.open_streams == {1}


def test_garbage_response_fails_that_call() -> None:
    pair = ConnectionPair()
    stream_id, _ = pair.call()
    [failed] = pair.to_client(frame(stream_id, FrameType.RESPONSE, b"\xff\xff\xff"))
    assert isinstance(failed, ProtocolErrorEvent)
    assert failed.stream_id == stream_id and failed.code == Code.UNKNOWN
    assert pair.client.open_streams == frozenset()


def test_close_between_frames_and_mid_frame() -> None:
    server = Connection(SERVER)
    server.receive_data(b"")
    assert events(server) == [ConnectionClosed()]
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")

    server = Connection(SERVER)
    server.receive_data(frame(1, FrameType.REQUEST, b"abc")[:-1])
    assert events(server) == []
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == Code.UNAVAILABLE
    assert server.next_event() == ConnectionClosed()


def test_local_protocol_errors() -> None:
    client, server = Connection(CLIENT), Connection(SERVER)
    with pytest.raises(LocalProtocolError):
        server.send_request("s", "m", b"")
    with pytest.raises(LocalProtocolError):
        client.send_response(1, 0)
    with pytest.raises(LocalProtocolError, match="no request"):
        server.send_response(1, 0)
    with pytest.raises(LocalProtocolError) as info:
        client.send_request("s", "m", b"x" * MESSAGE_LENGTH_MAX)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.open_streams == frozenset()
    assert client.send_request("s", "m", b"")[0] == 1  # the failed call used no stream id

    server.receive_data(frame(1, FrameType.REQUEST, request_bytes(service="s", method="m")))
    events(server)
    with pytest.raises(LocalProtocolError) as info:
        server.send_response(1, 0, "", b"x" * MESSAGE_LENGTH_MAX)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert server.open_streams == {1}  # still answerable, with an error instead
    server.send_response(1, Code.RESOURCE_EXHAUSTED, str(info.value))


# -- containerd's ttrpc v1.1.1 bytes ---------------------------------------------------
#
# Built by hand from the protobuf encoding rules, not with our encoder: this is what a Go
# ttrpc client sends for the shim call
#   client.Call(ctx /* namespace "default", 5 s deadline */, "containerd.task.v2.Task",
#               "State", &StateRequest{ID: "c1"}, &resp)
# gogo/protobuf writes fields in number order; ttrpc's channel writes the 10-byte header.

SERVICE = b"containerd.task.v2.Task"
STATE_REQUEST = b"\x0a\x02c1"  # StateRequest{id (1, bytes) = "c1"}
METADATA = b"\x0a\x1acontainerd-namespace-ttrpc" + b"\x12\x07default"  # KeyValue{1: key, 2: value}
GO_REQUEST = (
    b"\x0a" + bytes([len(SERVICE)]) + SERVICE  # 1: service
    + b"\x12\x05State"  # 2: method
    + b"\x1a" + bytes([len(STATE_REQUEST)]) + STATE_REQUEST  # 3: payload
    + b"\x20\x80\xe4\x97\xd0\x12"  # 4: timeout_nano = 5_000_000_000 (varint)
    + b"\x2a" + bytes([len(METADATA)]) + METADATA  # 5: metadata
)
GO_FRAME = struct.pack(">IIBB", len(GO_REQUEST), 1, 1, 0) + GO_REQUEST


def test_decodes_a_go_clients_request() -> None:
    assert GO_FRAME[:10] == bytes.fromhex("00000053 00000001 01 00")  # 83 payload bytes, stream 1, request
    server = Connection(SERVER)
    server.receive_data(GO_FRAME)
    [event] = events(server)
    assert event == RequestReceived(
        stream_id=1,
        service="containerd.task.v2.Task",
        method="State",
        payload=STATE_REQUEST,
        timeout_nano=5_000_000_000,
        metadata=(("containerd-namespace-ttrpc", "default"),),
    )


def test_encodes_what_a_go_client_sends() -> None:
    client = Connection(CLIENT)
    _, data = client.send_request(
        "containerd.task.v2.Task",
        "State",
        STATE_REQUEST,
        timeout_nano=5_000_000_000,
        metadata=[("containerd-namespace-ttrpc", "default")],
    )
    assert data == GO_FRAME


def test_encodes_responses_as_a_go_server_does() -> None:
    # Go's server always sets Response.status (status.Proto() of OK is an empty message),
    # so an OK answer starts with field 1 of length 0.
    server = Connection(SERVER)
    server.receive_data(GO_FRAME)
    events(server)
    data = server.send_response(1, 0, "", b"\x08\x2a")
    assert data == bytes.fromhex("00000006 00000001 02 00") + b"\x0a\x00" + b"\x12\x02\x08\x2a"

    server.receive_data(frame(3, FrameType.REQUEST, GO_REQUEST))
    events(server)
    data = server.send_response(3, Code.NOT_FOUND, "nope")
    status = b"\x08\x05" + b"\x12\x04nope"
    assert data[HEADER_LENGTH:] == b"\x0a" + bytes([len(status)]) + status
    assert status_pb2.Status.FromString(status) == status_pb2.Status(code=5, message="nope")
