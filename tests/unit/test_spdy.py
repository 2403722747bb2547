"""The SPDY/3.1 core (frames, header compression with SPDY/3's dictionary, stream lifecycle,
flow control) through bytes in and out, the asyncio adapter over a socket pair, and the CRI
streaming server's HTTP upgrade and remotecommand/portforward protocols over real TCP with a
stand-in runtime (the runtime side is proven end to end in tests/interop/test_cri.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ketch import errdefs
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.cri import streaming
from ketch.cri.containers import StreamIO
from ketch.spdy import (DICTIONARY, Connection, ConnectionClosed, DataReceived, ServerConnection, StreamOpened,
                        StreamReset, WindowOpened)
from ketch.spdy._frames import (FLAG_FIN, FLAG_UNIDIRECTIONAL, RST_CANCEL, RST_FLOW_CONTROL_ERROR,
                                SETTINGS_INITIAL_WINDOW_SIZE, DataFrame, Frame, GoAway, HeaderCompressor,
                                HeaderDecompressor, Headers, Ping, RstStream, Settings, SynReply, SynStream,
                                WindowUpdate, encode, parse)

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 20))  # type: ignore[arg-type]


class Peer:
    """The client's side: frames to bytes and back, with its own compression state."""

    def __init__(self) -> None:
        self.out = HeaderCompressor()
        self.back = HeaderDecompressor()
        self.buf = bytearray()

    def __call__(self, *frames: Frame) -> bytes:
        return b"".join(encode(f, self.out) for f in frames)

    def frames(self, data: bytes) -> list[Frame]:
        self.buf += data
        out = []
        while True:
            frame, size = parse(self.buf, self.back)
            if not size:
                return out
            del self.buf[:size]
            assert frame is not None
            out.append(frame)


# -- frames and headers ---------------------------------------------------------------------


def test_the_dictionary_is_spdy3s_byte_for_byte() -> None:
    assert len(DICTIONARY) == 1423
    assert DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert b"\x00\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\x07version" in DICTIONARY
    assert DICTIONARY.endswith(b",*,enq=0.")
    assert hashlib.sha256(DICTIONARY).hexdigest() == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


@pytest.mark.parametrize("frame", [
    DataFrame(5, b"hello", FLAG_FIN),
    DataFrame(0x7FFFFFFF, b""),
    SynStream(1, {"streamtype": "error", "port": "80"}, FLAG_UNIDIRECTIONAL, 0, 3, 0),
    SynReply(3, {}, FLAG_FIN),
    Headers(7, {"a": "b"}),
    RstStream(9, RST_CANCEL),
    Settings([(0, SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (1, 4, 100)]),
    Ping(41),
    GoAway(11, 1),
    WindowUpdate(13, 12345),
])
def test_frames_round_trip(frame: Frame) -> None:
    comp, decomp = HeaderCompressor(), HeaderDecompressor()
    data = encode(frame, comp)
    assert parse(data[:-1] if len(data) > 8 else data[:7], decomp) == (None, 0)  # not whole yet
    assert parse(data + b"rest", decomp) == (frame, len(data))


def test_a_control_frame_header_is_version_3_type_flags_length() -> None:
    data = encode(Ping(7), HeaderCompressor())
    assert data == bytes([0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 7])
    assert encode(DataFrame(1, b"x", FLAG_FIN), HeaderCompressor()) == bytes([0, 0, 0, 1, 1, 0, 0, 1]) + b"x"


def test_header_blocks_are_one_zlib_stream_primed_with_the_dictionary() -> None:
    comp, decomp = HeaderCompressor(), HeaderDecompressor()
    headers = {"streamType": "stdout", "X-Multi": "a\x00b"}
    first = comp.compress(headers)
    second = comp.compress(headers)
    assert len(second) < len(first)  # the second refers back to the first: one stream
    assert decomp.decompress(first) == {"streamtype": "stdout", "x-multi": "a\x00b"}
    assert decomp.decompress(second) == {"streamtype": "stdout", "x-multi": "a\x00b"}
    with pytest.raises(zlib.error):  # without the dictionary it cannot be read
        zlib.decompressobj().decompress(first)
    raw = zlib.decompressobj(zdict=DICTIONARY).decompress(first)
    assert raw == struct.pack(">I", 2) + b"".join(
        struct.pack(">I", len(x)) + x for x in (b"streamtype", b"stdout", b"x-multi", b"a\x00b"))


def test_a_header_block_of_one_name_twice_joins_the_values() -> None:
    z = zlib.compressobj(zdict=DICTIONARY)
    block = struct.pack(">I", 2) + b"".join(struct.pack(">I", len(x)) + x for x in (b"A", b"1", b"a", b"2"))
    data = z.compress(block) + z.flush(zlib.Z_SYNC_FLUSH)
    assert HeaderDecompressor().decompress(data) == {"a": "1\x002"}


# -- the connection core --------------------------------------------------------------------


def test_a_stream_opens_is_answered_carries_data_both_ways_and_closes() -> None:
    conn, peer = Connection(), Peer()
    events = conn.receive(peer(SynStream(1, {"streamtype": "stdin"})))
    assert events == [StreamOpened(1, {"streamtype": "stdin"}, False)]
    conn.reply(1)
    assert peer.frames(conn.data_to_send()) == [SynReply(1, {})]
    # bytes may come in any pieces
    data = peer(DataFrame(1, b"abc"), DataFrame(1, b"", FLAG_FIN))
    got = [e for b in data for e in conn.receive(bytes([b]))]
    assert got == [DataReceived(1, b"abc", False), DataReceived(1, b"", True)]
    assert conn.send_data(1, b"out", fin=True) == 3
    assert peer.frames(conn.data_to_send()) == [DataFrame(1, b"out", FLAG_FIN)]
    assert not conn.is_open(1)  # both halves closed: forgotten
    conn.receive(peer(DataFrame(1, b"late")))
    assert peer.frames(conn.data_to_send()) == [RstStream(1, 2)]  # INVALID_STREAM


def test_resets_pings_and_goaway() -> None:
    conn, peer = Connection(), Peer()
    conn.receive(peer(SynStream(1), SynStream(3)))
    assert conn.receive(peer(RstStream(1, RST_CANCEL))) == [StreamReset(1, RST_CANCEL)]
    assert not conn.is_open(1) and conn.is_open(3)
    conn.receive(peer(Ping(5)))
    assert peer.frames(conn.data_to_send()) == [Ping(5)]  # the peer's ping, echoed
    conn.reset(3, RST_CANCEL)
    assert peer.frames(conn.data_to_send()) == [RstStream(3, RST_CANCEL)]
    assert conn.receive(peer(GoAway(3))) == [ConnectionClosed(3, 0)]
    assert conn.closed


def test_a_stream_id_reused_or_not_the_clients_is_refused() -> None:
    conn, peer = Connection(), Peer()
    conn.receive(peer(SynStream(1)))
    assert conn.receive(peer(SynStream(1))) == [StreamReset(1, 8)]  # STREAM_IN_USE
    assert conn.receive(peer(SynStream(2))) == []  # even: the server's ids
    assert peer.frames(conn.data_to_send()) == [RstStream(1, 8), RstStream(2, 1)]


def test_another_protocol_version_ends_the_connection_with_goaway() -> None:
    conn = Connection()
    (event,) = conn.receive(struct.pack(">HHI", 0x8002, 6, 4) + b"\0\0\0\1")
    assert isinstance(event, ConnectionClosed) and "version 2" in event.error
    assert Peer().frames(conn.data_to_send()) == [GoAway(0, 1)]
    assert conn.closed


def test_the_send_window_holds_data_until_the_peer_opens_it() -> None:
    conn, peer = Connection(flow_control=True), Peer()
    conn.receive(peer(SynStream(1)))
    big = bytes(range(256)) * 400  # 100 KiB
    assert conn.send_data(1, big, fin=True) == 64 * 1024
    sent = peer.frames(conn.data_to_send())
    assert sum(len(f.data) for f in sent if isinstance(f, DataFrame)) == 64 * 1024
    assert all(isinstance(f, DataFrame) and not f.flags for f in sent)  # no FIN: not all went
    assert conn.send_data(1, big[64 * 1024:], fin=True) == 0
    assert conn.receive(peer(WindowUpdate(1, 10_000))) == [WindowOpened(1)]
    # the connection's window is spent too: a stream's window alone is not enough
    assert conn.send_window(1) == 0
    assert conn.receive(peer(WindowUpdate(0, 1 << 20))) == [WindowOpened(0)]
    assert conn.send_data(1, big[64 * 1024:], fin=True) == 10_000
    conn.receive(peer(WindowUpdate(1, 1 << 20)))
    rest = big[64 * 1024 + 10_000:]
    assert conn.send_data(1, rest, fin=True) == len(rest)
    frames = peer.frames(conn.data_to_send())
    assert frames[-1].flags == FLAG_FIN and b"".join(f.data for f in frames if isinstance(f, DataFrame))[-10:] == big[-10:]


def test_settings_change_the_initial_send_window() -> None:
    conn, peer = Connection(flow_control=True), Peer()
    conn.receive(peer(SynStream(1), Settings([(0, SETTINGS_INITIAL_WINDOW_SIZE, 1000)])))
    assert conn.send_window(1) == 1000
    conn.receive(peer(SynStream(3)))
    assert conn.send_window(3) == 1000


def test_without_flow_control_windows_are_counted_not_enforced() -> None:
    """Go's spdystream (Kubernetes' clients) neither sends WINDOW_UPDATE nor heeds ours: the
    streaming server neither holds its data nor resets a stream that overruns."""
    conn, peer = Connection(flow_control=False), Peer()
    conn.receive(peer(SynStream(1)))
    assert conn.send_data(1, b"x" * 200_000) == 200_000
    assert sum(len(f.data) for f in peer.frames(conn.data_to_send()) if isinstance(f, DataFrame)) == 200_000
    events = conn.receive(peer(DataFrame(1, b"y" * 100_000)))
    assert events == [DataReceived(1, b"y" * 100_000, False)] and conn.is_open(1)
    conn.consumed(1, 100_000)
    assert peer.frames(conn.data_to_send()) == [WindowUpdate(1, 100_000)]


def test_the_receive_window_is_given_back_as_consumed_and_enforced() -> None:
    conn, peer = Connection(), Peer()
    conn.receive(peer(SynStream(1), SynStream(3)))
    conn.receive(peer(DataFrame(1, b"x" * 40_000)))
    conn.consumed(1, 20_000)
    assert conn.data_to_send() == b""  # less than half the window: not yet
    conn.consumed(1, 20_000)
    assert peer.frames(conn.data_to_send()) == [WindowUpdate(1, 40_000)]
    conn.receive(peer(DataFrame(1, b"x" * 60_000)))  # within the window given back
    assert conn.is_open(1)
    # a peer overrunning the window breaks flow control: the stream is reset
    events = conn.receive(peer(DataFrame(3, b"x" * 65_536), DataFrame(3, b"y")))
    assert events[-1] == StreamReset(3, RST_FLOW_CONTROL_ERROR)
    assert peer.frames(conn.data_to_send()) == [RstStream(3, RST_FLOW_CONTROL_ERROR)]


# -- the asyncio adapter --------------------------------------------------------------------


async def _socket_pair() -> tuple[ServerConnection, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    return ServerConnection(sr, sw), cr, cw


async def _frames_until(reader: asyncio.StreamReader, peer: Peer, want: Callable[[list[Frame]], bool]) -> list[Frame]:
    got: list[Frame] = []
    while not want(got):
        data = await reader.read(65536)
        assert data, f"connection ended; frames so far {got}"
        got += peer.frames(data)
    return got


def test_the_adapter_answers_streams_and_moves_bytes() -> None:
    async def scenario() -> None:
        conn, reader, writer = await _socket_pair()
        peer = Peer()
        writer.write(peer(SynStream(1, {"streamtype": "stdin"}), DataFrame(1, b"in"), DataFrame(1, b"", FLAG_FIN)))
        stream = await conn.accept()
        assert stream is not None and stream.headers == {"streamtype": "stdin"}
        assert await stream.read_all() == b"in"
        await stream.write(b"out")
        await stream.close()
        frames = await _frames_until(reader, peer, lambda f: bool(f) and f[-1].flags == FLAG_FIN)
        assert frames == [SynReply(1, {}), DataFrame(1, b"out"), DataFrame(1, b"", FLAG_FIN)]
        writer.write(peer(SynStream(3)))
        second = await conn.accept()
        assert second is not None
        writer.write_eof()  # the peer goes away: reads end, no more streams
        assert await second.read() == b""
        assert await conn.accept() is None
        await conn.close(linger=1)
        writer.close()

    run(scenario)


def test_a_stream_its_reader_does_not_keep_up_with_holds_the_peer_back_through_tcp() -> None:
    async def scenario() -> None:
        conn, reader, writer = await _socket_pair()
        peer = Peer()
        writer.write(peer(SynStream(1)))
        stream = await conn.accept()
        assert stream is not None
        payload = bytes(range(256)) * 4096 * 3  # 3 MiB, in DATA frames of 64 KiB
        sending = asyncio.ensure_future(_send_all(writer, peer, payload))
        await asyncio.sleep(0.5)
        assert not sending.done()  # TCP pushes back: the connection stopped reading
        assert 1024 * 1024 < stream.queued <= 1024 * 1024 + 2 * 65536
        got = bytearray()
        while len(got) < len(payload):
            got += await stream.read()
        assert got == payload
        await sending
        writer.close()
        await conn.close(linger=1)

    run(scenario)


async def _send_all(writer: asyncio.StreamWriter, peer: Peer, payload: bytes) -> None:
    for i in range(0, len(payload), 65536):
        writer.write(peer(DataFrame(1, payload[i:i + 65536])))
        await writer.drain()


# -- the streaming server -------------------------------------------------------------------


class FakeRuntime:
    """Stands in for the containers: exec echoes stdin to stdout, reports sizes to stderr and
    exits with the code the command names; port forward connects to a local echo server."""

    def __init__(self, echo_port: int = 0) -> None:
        self.echo_port = echo_port

    async def exec(self, ref: str, cmd: list[str], tty: bool, io: StreamIO) -> int:
        if cmd[0] == "fail":
            raise errdefs.NotFound("no such thing")
        if io.resizes is not None:
            async for w, h in io.resizes:
                assert io.stdout is not None
                await io.stdout(f"size {w}x{h}\n".encode())
                break
        if io.stdin is not None and io.stdout is not None:
            while chunk := await io.stdin():
                await io.stdout(chunk)
        if io.stderr is not None:
            await io.stderr(b"err\n")
        return int(cmd[1]) if len(cmd) > 1 else 0

    async def attach(self, ref: str, io: StreamIO) -> None:
        assert io.stdout is not None
        await io.stdout(f"attached to {ref}\n".encode())

    async def port_forward(self, sandbox_id: str, port: int) -> socket.socket:
        if port != 80:
            raise ConnectionRefusedError(111, "Connection refused")
        return socket.create_connection(("127.0.0.1", self.echo_port))


class Client:
    """A client as client-go's: HTTP upgrade, then streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
        self.reader, self.writer, self.response = reader, writer, response
        self.peer = Peer()
        self.next_id = 1
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    @classmethod
    async def connect(cls, url: str, protocols: list[str], upgrade: str = "SPDY/3.1") -> Client:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
        head += "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
        writer.write((head + "Content-Length: 0\r\n\r\n").encode())
        response = await reader.readuntil(b"\r\n\r\n")
        if not response.startswith(b"HTTP/1.1 101"):
            response += await reader.read()
        return cls(reader, writer, response)

    def open(self, headers: dict[str, str], data: bytes = b"", fin: bool = False) -> int:
        sid = self.next_id
        self.next_id += 2
        frames: list[Frame] = [SynStream(sid, headers)]
        if data or fin:
            frames.append(DataFrame(sid, data, FLAG_FIN if fin else 0))
        self.writer.write(self.peer(*frames))
        return sid

    def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        self.writer.write(self.peer(DataFrame(sid, data, FLAG_FIN if fin else 0)))

    async def until_ended(self, *sids: int) -> None:
        while not set(sids) <= self.ended:
            data = await self.reader.read(65536)
            assert data, f"connection ended before streams {set(sids) - self.ended} did"
            for f in self.peer.frames(data):
                if isinstance(f, DataFrame):
                    self.data.setdefault(f.stream_id, bytearray()).extend(f.data)
                    if f.flags & FLAG_FIN:
                        self.ended.add(f.stream_id)
                elif isinstance(f, RstStream):
                    self.ended.add(f.stream_id)

    async def close(self) -> None:
        self.writer.close()


def _serve(test: Callable[[streaming.StreamServer], Awaitable[None]], runtime: Any = None) -> None:
    async def scenario() -> None:
        server = streaming.StreamServer(runtime or FakeRuntime())
        await server.start()
        try:
            await test(server)
        finally:
            await server.close()

    run(scenario)


def test_exec_v4_reports_success_and_a_nonzero_exit_code_as_a_status() -> None:
    async def test(server: streaming.StreamServer) -> None:
        for code in (0, 7):
            url = server.url(cri.ExecRequest(container_id="c1", cmd=["run", str(code)], stdin=True, stdout=True,
                                             stderr=True))
            assert url.startswith(server.base_url + "/exec/")
            c = await Client.connect(url, [streaming.V4, streaming.V3])
            assert b"101 Switching Protocols" in c.response and b"X-Stream-Protocol-Version: v4.channel.k8s.io" \
                in c.response and b"Upgrade: SPDY/3.1" in c.response
            error = c.open({"streamType": "error"}, fin=True)
            stdin = c.open({"streamType": "stdin"}, b"typed", fin=True)
            stdout = c.open({"streamType": "stdout"}, fin=True)
            stderr = c.open({"streamType": "stderr"}, fin=True)
            await c.until_ended(error, stdout, stderr)
            assert c.data[stdout] == b"typed" and c.data[stderr] == b"err\n" and stdin not in c.data
            status = json.loads(c.data[error])
            if code == 0:
                assert status == {"metadata": {}, "status": "Success"}
            else:
                assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
                assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
            await c.close()

    _serve(test)


def test_exec_with_a_terminal_takes_sizes_from_the_resize_stream() -> None:
    async def test(server: streaming.StreamServer) -> None:
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["sh"], stdout=True, tty=True))
        c = await Client.connect(url, [streaming.V4])
        error = c.open({"streamType": "error"}, fin=True)
        stdout = c.open({"streamType": "stdout"}, fin=True)
        c.open({"streamType": "resize"}, b'{"Width":80,"Height":2')  # a size may come in pieces
        c.send(c.next_id - 2, b'4}\n')
        await c.until_ended(error, stdout)
        assert c.data[stdout] == b"size 80x24\n"
        await c.close()

    _serve(test)


def test_v2_reports_failures_as_text_and_errors_of_the_runtime_are_reported() -> None:
    async def test(server: streaming.StreamServer) -> None:
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["run", "3"], stdout=True))
        c = await Client.connect(url, [streaming.V2])
        assert b"X-Stream-Protocol-Version: v2.channel.k8s.io" in c.response
        error, stdout = c.open({"streamType": "error"}, fin=True), c.open({"streamType": "stdout"}, fin=True)
        await c.until_ended(error, stdout)
        assert b"non-zero exit code" in c.data[error] and b"exit code 3" in c.data[error]
        await c.close()
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["fail"], stdout=True))
        c = await Client.connect(url, [streaming.V4])
        error, stdout = c.open({"streamType": "error"}, fin=True), c.open({"streamType": "stdout"}, fin=True)
        await c.until_ended(error)
        status = json.loads(c.data[error])
        assert status["status"] == "Failure" and "no such thing" in status["message"]
        await c.close()

    _serve(test)


def test_attach_runs_on_the_runtime() -> None:
    async def test(server: streaming.StreamServer) -> None:
        url = server.url(cri.AttachRequest(container_id="c9", stdout=True))
        assert "/attach/" in url
        c = await Client.connect(url, [streaming.V4])
        error, stdout = c.open({"streamType": "error"}, fin=True), c.open({"streamType": "stdout"}, fin=True)
        await c.until_ended(error, stdout)
        assert c.data[stdout] == b"attached to c9\n"
        await c.close()

    _serve(test)


def test_tokens_are_single_use_expire_and_need_spdy_and_a_spoken_protocol() -> None:
    async def test(server: streaming.StreamServer) -> None:
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["x"], stdout=True))
        c = await Client.connect(url, ["v9.channel.k8s.io"])
        assert c.response.startswith(b"HTTP/1.1 403") and b"v4.channel.k8s.io" in c.response
        await c.close()
        c = await Client.connect(url, [streaming.V4])  # the token went with the first try
        assert c.response.startswith(b"HTTP/1.1 404")
        await c.close()
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["x"], stdout=True))
        c = await Client.connect(url, [streaming.V4], upgrade="websocket")
        assert c.response.startswith(b"HTTP/1.1 400") and b"SPDY/3.1" in c.response
        await c.close()
        c = await Client.connect(server.url(cri.PortForwardRequest(pod_sandbox_id="p")).replace("/portforward/",
                                                                                            "/exec/"), [streaming.V4])
        assert c.response.startswith(b"HTTP/1.1 404")
        await c.close()
        url = server.url(cri.ExecRequest(container_id="c1", cmd=["x"], stdout=True))
        for pending in server._pending.values():
            pending.expires = 0
        c = await Client.connect(url, [streaming.V4])
        assert c.response.startswith(b"HTTP/1.1 404")
        await c.close()

    _serve(test)


def test_port_forward_pairs_streams_by_request_and_reports_failures() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
        writer.close()

    async def scenario() -> None:
        echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        server = streaming.StreamServer(FakeRuntime(echo_server.sockets[0].getsockname()[1]))
        await server.start()
        try:
            url = server.url(cri.PortForwardRequest(pod_sandbox_id="pod"))
            c = await Client.connect(url, [streaming.PORTFORWARD_PROTOCOL])
            assert b"X-Stream-Protocol-Version: portforward.k8s.io" in c.response
            streams = []
            for rid, port in (("0", "80"), ("1", "80"), ("2", "81")):
                streams.append((c.open({"streamType": "error", "port": port, "requestID": rid}, fin=True),
                                c.open({"streamType": "data", "port": port, "requestID": rid})))
            c.send(streams[0][1], b"hello ")
            c.send(streams[1][1], b"other", fin=True)
            c.send(streams[0][1], b"world", fin=True)
            await c.until_ended(*(s for pair in streams for s in pair))
            assert c.data[streams[0][1]] == b"HELLO WORLD" and c.data[streams[1][1]] == b"OTHER"
            assert not c.data.get(streams[0][0])  # nothing went wrong
            assert b"failed to connect to localhost:81 inside namespace of pod pod" in c.data[streams[2][0]]
            await c.close()
        finally:
            await server.close()
            echo_server.close()

    run(scenario)
