"""ttrpc client and server over real unix sockets in a temporary directory, and over the
in-memory pair (connect_in_memory): the scenarios that do not write raw bytes run over both."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from ketch import errdefs
from ketch.api.google.rpc import status_pb2
from ketch.errdefs import Code
from ketch.ttrpc import (
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    Client,
    Context,
    FrameType,
    Method,
    Server,
    connect,
    connect_in_memory,
    decode_header,
    encode_header,
)
from ketch.ttrpc.ttrpc_pb2 import KeyValue, Request, Response

T = TypeVar("T")
SERVICE = "ketch.test.v1.Echo"


def run(test: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body with a safety timeout, on a fresh event loop."""

    async def main() -> T:
        async with asyncio.timeout(10):
            return await test()

    return asyncio.run(main())


class EchoService:
    """A test service; its handlers record what they saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.contexts: list[Context] = []

    def methods(self) -> dict[str, Method]:
        return {
            "Echo": Method(KeyValue, self.echo),
            "Wait": Method(KeyValue, self.wait),
            "Block": Method(KeyValue, self.block),
            "Fail": Method(KeyValue, self.fail),
            "Crash": Method(KeyValue, self.crash),
            "Meta": Method(KeyValue, self.meta),
            "Big": Method(KeyValue, self.big),
        }

    async def echo(self, request: KeyValue, ctx: Context) -> KeyValue:
        self.contexts.append(ctx)
        return KeyValue(key=request.key, value=request.value)

    async def wait(self, request: KeyValue, ctx: Context) -> KeyValue:
        await self.release.wait()
        return KeyValue(key=request.key, value="released")

    async def block(self, request: KeyValue, ctx: Context) -> KeyValue:
        self.contexts.append(ctx)
        self.blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def fail(self, request: KeyValue, ctx: Context) -> KeyValue:
        raise errdefs.NotFound(f"container {request.key!r}")

    async def crash(self, request: KeyValue, ctx: Context) -> KeyValue:
        raise RuntimeError("handler bug")

    async def meta(self, request: KeyValue, ctx: Context) -> KeyValue:
        return KeyValue(key=request.key, value=",".join(ctx.metadata.get(request.key, [])))

    async def big(self, request: KeyValue, ctx: Context) -> KeyValue:
        return KeyValue(value="x" * MESSAGE_LENGTH_MAX)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, server: Server | None = None) -> AsyncIterator[tuple[Server, EchoService, str]]:
    server = server or Server()
    service = EchoService()
    server.register(SERVICE, service.methods())
    path = str(tmp_path / "ttrpc.sock")
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve_path(path, started))
    await started
    try:
        yield server, service, path
    finally:
        await server.shutdown()
        await task
    assert not os.path.exists(path)


Dial = Callable[..., Awaitable[Client]]
BACKENDS = ["unix", "memory"]


@contextlib.asynccontextmanager
async def served(
    backend: str, tmp_path: Path, server: Server | None = None
) -> AsyncIterator[tuple[Server, EchoService, Dial]]:
    """A served EchoService and a way to connect to it: over a unix socket, or in memory (then
    with no listener at all: connect_in_memory needs none)."""
    if backend == "unix":
        async with serving(tmp_path, server) as (server, service, path):
            yield server, service, lambda **kw: connect(path, **kw)
        return
    server = server or Server()
    service = EchoService()
    server.register(SERVICE, service.methods())
    try:
        yield server, service, lambda **kw: connect_in_memory(server, **kw)
    finally:
        await server.shutdown()


def raw_request(stream_id: int, method: str, payload: bytes, timeout_nano: int = 0) -> bytes:
    """A request frame built by hand, on any stream id we like."""
    body = Request(service=SERVICE, method=method, payload=payload, timeout_nano=timeout_nano)
    data = body.SerializeToString()
    return encode_header(len(data), stream_id, FrameType.REQUEST) + data


async def read_responses(path: str, data: bytes, count: int) -> dict[int, Response]:
    """Write ``data`` on a plain socket and read ``count`` response frames back."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        got: dict[int, Response] = {}
        while len(got) < count:
            header = await reader.readexactly(HEADER_LENGTH)
            length, stream_id, frame_type, _ = decode_header(header)
            assert frame_type == FrameType.RESPONSE
            got[stream_id] = Response.FromString(await reader.readexactly(length))
        return got
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_round_trip(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (server, service, path):
            async with await connect(f"unix://{path}") as client:
                reply = await client.call(SERVICE, "Echo", KeyValue(key="k", value="v"), KeyValue)
                assert reply == KeyValue(key="k", value="v")
                assert server.connections == 1
                [ctx] = service.contexts
                assert (ctx.service, ctx.method, ctx.deadline) == (SERVICE, "Echo", None)
                # many calls in flight on the one connection
                replies = await asyncio.gather(
                    *(client.call(SERVICE, "Echo", KeyValue(key=str(i)), KeyValue) for i in range(50))
                )
                assert [r.key for r in replies] == [str(i) for i in range(50)]
            assert client.closed

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_call_does_not_hold_up_a_fast_one(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, service, path):
            async with await connect(path) as client:
                finished: list[str] = []

                async def call(method: str) -> None:
                    await client.call(SERVICE, method, KeyValue(), KeyValue)
                    finished.append(method)

                slow = asyncio.create_task(call("Wait"))
                await call("Echo")
                assert finished == ["Echo"] and not slow.done()
                service.release.set()
                await slow
                assert finished == ["Echo", "Wait"]

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_service_and_method_are_unimplemented(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, _, path):
            async with await connect(path) as client:
                with pytest.raises(errdefs.Unimplemented, match="service nope.v1.Nope"):
                    await client.call("nope.v1.Nope", "Echo", KeyValue(), KeyValue)
                with pytest.raises(errdefs.Unimplemented, match="method Nope"):
                    await client.call(SERVICE, "Nope", KeyValue(), KeyValue)

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_handler_errors_keep_their_class(backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, _, path):
            async with await connect(path) as client:
                with pytest.raises(errdefs.NotFound) as info:
                    await client.call(SERVICE, "Fail", KeyValue(key="web"), KeyValue)
                assert str(info.value) == "container 'web': not found"
                with caplog.at_level(logging.ERROR, logger="ketch.ttrpc"):
                    with pytest.raises(errdefs.Unknown, match="handler bug"):
                        await client.call(SERVICE, "Crash", KeyValue(), KeyValue)
                assert "handler bug" in caplog.text
                # a response too big to send becomes an error on that call only
                with pytest.raises(errdefs.ResourceExhausted, match="exceed maximum message size"):
                    await client.call(SERVICE, "Big", KeyValue(), KeyValue)
                assert (await client.call(SERVICE, "Echo", KeyValue(key="ok"), KeyValue)).key == "ok"

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_and_deadline_reach_the_handler(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, service, path):
            async with await connect(path) as client:
                reply = await client.call(
                    SERVICE,
                    "Meta",
                    KeyValue(key="containerd-namespace-ttrpc"),
                    KeyValue,
                    metadata={"containerd-namespace-ttrpc": "default"},
                )
                assert reply.value == "default"
                reply = await client.call(
                    SERVICE, "Meta", KeyValue(key="x-list"), KeyValue, metadata={"X-List": ["a", "b"]}
                )
                assert reply.value == "a,b"

                loop = asyncio.get_running_loop()
                before = loop.time()
                await client.call(SERVICE, "Echo", KeyValue(), KeyValue, timeout=30)
                deadline = service.contexts[-1].deadline
                assert deadline is not None and before + 29 < deadline <= loop.time() + 30

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_is_deadline_exceeded(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, service, path):
            async with await connect(path) as client:
                with pytest.raises(errdefs.DeadlineExceeded, match="Block"):
                    await client.call(SERVICE, "Block", KeyValue(), KeyValue, timeout=0.05)
                # the server cancels the handler when the deadline it was sent passes
                await asyncio.wait_for(service.cancelled.wait(), 5)
                # and the connection is still good
                assert (await client.call(SERVICE, "Echo", KeyValue(key="k"), KeyValue)).key == "k"

    run(body)


def test_server_enforces_the_deadline_it_was_sent(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, _, path):
            data = raw_request(1, "Block", b"", timeout_nano=50_000_000)
            got = await read_responses(path, data, 1)
            assert got[1].status.code == Code.DEADLINE_EXCEEDED

    run(body)


def test_bad_frames_are_answered_and_the_connection_survives(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, _, path):
            length = MESSAGE_LENGTH_MAX + 1
            oversize = encode_header(length, 1, FrameType.REQUEST) + b"\0" * length
            garbage = raw_request(3, "Echo", b"\xff\xff\xff")  # not a KeyValue
            even = raw_request(8, "Echo", b"")
            good = raw_request(9, "Echo", KeyValue(key="fine").SerializeToString())
            got = await read_responses(path, oversize + garbage + even + good, 4)
            assert got[1].status.code == Code.RESOURCE_EXHAUSTED
            assert got[3].status.code == Code.INVALID_ARGUMENT and "unmarshal" in got[3].status.message
            assert got[8].status.code == Code.INVALID_ARGUMENT and "odd" in got[8].status.message
            assert got[9].status.code == Code.OK and KeyValue.FromString(got[9].payload).key == "fine"

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_fails_pending_calls_with_unavailable(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        closed: list[bool] = []
        async with serving(tmp_path) as (server, service, path):
            client = await connect(path, on_close=lambda: closed.append(True))
            pending = asyncio.create_task(client.call(SERVICE, "Block", KeyValue(), KeyValue))
            await service.blocked.wait()
            await server.shutdown()
            assert service.cancelled.is_set()
            assert server.connections == 0
            with pytest.raises(errdefs.Unavailable, match="connection closed"):
                await pending
            await client.wait_closed()
            assert client.closed and closed == [True]
            with pytest.raises(errdefs.Unavailable):
                await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
            await client.close()  # harmless when already closed

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_grace_lets_running_calls_finish(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (server, service, path):
            async with await connect(path) as client:
                call = asyncio.create_task(client.call(SERVICE, "Wait", KeyValue(key="w"), KeyValue))
                await asyncio.sleep(0.01)
                stopping = asyncio.create_task(server.shutdown(grace=5))
                await asyncio.sleep(0.01)
                service.release.set()
                assert (await call).value == "released"
                await stopping

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_close_fails_its_pending_calls(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, service, path):
            client = await connect(path)
            pending = asyncio.create_task(client.call(SERVICE, "Block", KeyValue(), KeyValue))
            await service.blocked.wait()
            await client.close()
            with pytest.raises(errdefs.Unavailable, match="ttrpc: closed"):
                await pending
            await asyncio.wait_for(service.cancelled.wait(), 5)  # the server noticed

    run(body)


def test_connecting_to_a_missing_socket_is_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        address = f"unix://{tmp_path}/missing.sock"
        with pytest.raises(errdefs.Unavailable, match="missing.sock"):
            await connect(address)
        # a socket file with no one listening
        path = str(tmp_path / "dead.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
        with pytest.raises(errdefs.Unavailable, match="dead.sock"):
            await connect(path)
        with pytest.raises(errdefs.InvalidArgument):
            await connect("tcp://127.0.0.1:1")

    run(body)


def test_serve_an_inherited_listening_socket(tmp_path: Path) -> None:
    async def body() -> None:
        path = str(tmp_path / "inherited.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        server = Server()
        server.register(SERVICE, EchoService().methods())
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(server.serve(sock, started))
        await started
        async with await connect(path) as client:
            assert (await client.call(SERVICE, "Echo", KeyValue(key="x"), KeyValue)).key == "x"
        await server.shutdown()
        await task
        assert sock.fileno() == -1  # serve() owned it and closed it

    run(body)


def test_socket_mode_and_peer_credentials(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (server, _, path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            server.required_peer = (os.geteuid() + 1, -1)  # someone else
            client = await connect(path)
            with pytest.raises(errdefs.Unavailable):
                await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
            await client.wait_closed()
            assert server.connections == 0

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_a_call_leaves_the_connection_usable(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, service, path):
            async with await connect(path) as client:
                call = asyncio.create_task(client.call(SERVICE, "Wait", KeyValue(), KeyValue))
                await asyncio.sleep(0.01)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                service.release.set()  # its late answer is dropped
                assert (await client.call(SERVICE, "Echo", KeyValue(key="k"), KeyValue)).key == "k"

    run(body)


@pytest.mark.parametrize("backend", BACKENDS)
def test_status_messages_work_as_requests(backend: str, tmp_path: Path) -> None:
    async def body() -> None:
        server = Server()

        async def bump(request: status_pb2.Status, ctx: Context) -> status_pb2.Status:
            return status_pb2.Status(code=request.code + 1, message=request.message)

        server.register("ketch.test.v1.Status", {"Bump": Method(status_pb2.Status, bump)})
        async with serving(tmp_path, server) as (_, _, path):
            async with await connect(path) as client:
                request = status_pb2.Status(code=4, message="m")
                reply = await client.call("ketch.test.v1.Status", "Bump", request, status_pb2.Status)
                assert (reply.code, reply.message) == (5, "m")

    run(body)


def test_server_dying_mid_response_fails_the_call(tmp_path: Path) -> None:
    async def body() -> None:
        async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            length, stream_id, _, _ = decode_header(await reader.readexactly(HEADER_LENGTH))
            await reader.readexactly(length)
            writer.write(encode_header(100, stream_id, FrameType.RESPONSE) + b"\0" * 10)
            writer.close()
            await writer.wait_closed()

        path = str(tmp_path / "flaky.sock")
        server = await asyncio.start_unix_server(half_answer, path)
        async with server:
            client = await connect(path)
            with pytest.raises(errdefs.Unavailable, match="middle of a frame"):
                await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
            await client.wait_closed()
            assert client.closed

    run(body)


# -- connect_in_memory: what a unit test of a ttrpc service relies on ----------------------------


def test_in_memory_client_is_a_served_connection_from_the_start() -> None:
    async def body() -> None:
        server = Server()
        server.register(SERVICE, EchoService().methods())
        client = await connect_in_memory(server)
        assert server.connections == 1 and not client.closed
        assert client.address == "memory://"
        assert (await client.call(SERVICE, "Echo", KeyValue(key="k"), KeyValue)).key == "k"
        await server.shutdown()

    run(body)


def test_server_shutdown_closes_in_memory_and_socket_clients_alike(tmp_path: Path) -> None:
    async def body() -> None:
        closed: list[str] = []
        async with serving(tmp_path) as (server, service, path):
            memory = await connect_in_memory(server, on_close=lambda: closed.append("memory"))
            sock = await connect(path, on_close=lambda: closed.append("unix"))
            pending = [
                asyncio.create_task(client.call(SERVICE, "Block", KeyValue(), KeyValue)) for client in (memory, sock)
            ]
            while len(service.contexts) < 2:
                await asyncio.sleep(0.001)
            assert server.connections == 2
            await server.shutdown()
            assert server.connections == 0
            for call in pending:
                with pytest.raises(errdefs.Unavailable, match="connection closed"):
                    await call
            await memory.wait_closed()
            await sock.wait_closed()
            assert sorted(closed) == ["memory", "unix"]  # each once, after its calls failed
            for client in (memory, sock):
                with pytest.raises(errdefs.Unavailable):
                    await client.call(SERVICE, "Echo", KeyValue(), KeyValue)

    run(body)


def test_in_memory_client_close_is_seen_by_the_server() -> None:
    async def body() -> None:
        closed: list[bool] = []
        server = Server()
        service = EchoService()
        server.register(SERVICE, service.methods())
        client = await connect_in_memory(server, on_close=lambda: closed.append(True))
        pending = asyncio.create_task(client.call(SERVICE, "Block", KeyValue(), KeyValue))
        await service.blocked.wait()
        await client.close()
        assert closed == [True]
        with pytest.raises(errdefs.Unavailable, match="ttrpc: closed"):
            await pending
        await asyncio.wait_for(service.cancelled.wait(), 5)  # the server cancelled the handler
        assert server.connections == 0
        await server.shutdown()
        assert closed == [True]

    run(body)


def test_connect_in_memory_to_a_stopped_server_is_unavailable() -> None:
    async def body() -> None:
        server = Server()
        await server.shutdown()
        with pytest.raises(errdefs.Unavailable, match="shut down"):
            await connect_in_memory(server)

    run(body)


def test_in_memory_peer_is_this_process_for_the_credential_check() -> None:
    async def body() -> None:
        server = Server()
        server.register(SERVICE, EchoService().methods())
        server.required_peer = (os.geteuid(), os.getegid())
        async with await connect_in_memory(server) as client:
            assert (await client.call(SERVICE, "Echo", KeyValue(key="me"), KeyValue)).key == "me"
        server.required_peer = (os.geteuid() + 1, -1)  # someone else
        client = await connect_in_memory(server)
        with pytest.raises(errdefs.Unavailable, match="reset"):
            await client.call(SERVICE, "Echo", KeyValue(), KeyValue)
        await client.wait_closed()
        assert server.connections == 0
        await server.shutdown()

    run(body)
