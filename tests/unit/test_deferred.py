"""Services registered after the server serves: a call that comes first waits for them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ketch.services.deferred import Deferred, Registrations


# messages are lists (grpc itself encodes a str before its serializer sees it)
def _encode(message: list[str]) -> bytes:
    return json.dumps(message).encode()


def _decode(data: bytes) -> list[str]:
    message: list[str] = json.loads(data)
    return message


def _register(into: Registrations) -> None:
    async def echo(request: list[str], context: grpc.aio.ServicerContext) -> list[str]:
        return ["echo", *request]

    async def count(request: list[str], context: grpc.aio.ServicerContext) -> AsyncIterator[list[str]]:
        for i in range(int(request[0])):
            yield [str(i)]

    async def join(requests: AsyncIterator[list[str]], context: grpc.aio.ServicerContext) -> list[str]:
        return ["+".join([r[0] async for r in requests])]

    into.add_registered_method_handlers("test.v1.Slow", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, _decode, _encode),
        "Count": grpc.unary_stream_rpc_method_handler(count, _decode, _encode),
        "Join": grpc.stream_unary_rpc_method_handler(join, _decode, _encode),
    })


async def _serving(tmp_path: Path, gate: Deferred) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((gate,))
    server.add_insecure_port(f"unix:{tmp_path / 's.sock'}")
    await server.start()
    return server, grpc.aio.insecure_channel(f"unix:{tmp_path / 's.sock'}")


def test_calls_made_before_the_services_load_wait_and_are_answered(tmp_path: Path) -> None:
    async def main() -> None:
        gate = Deferred(("/test.v1.",), "the slow services")
        server, channel = await _serving(tmp_path, gate)
        try:
            echo = asyncio.ensure_future(channel.unary_unary("/test.v1.Slow/Echo", _encode, _decode)(["hi"]))
            counted = channel.unary_stream("/test.v1.Slow/Count", _encode, _decode)(["3"])
            counting = asyncio.ensure_future(_collect(counted))
            join = channel.stream_unary("/test.v1.Slow/Join", _encode, _decode)
            joined = asyncio.ensure_future(join(_aiter([["a"], ["b"], ["c"]])))
            await asyncio.sleep(0.2)
            assert not echo.done() and not counting.done() and not joined.done()  # waiting, not refused
            gate.load(_register)
            assert await echo == ["echo", "hi"]
            assert await counting == [["0"], ["1"], ["2"]]
            assert await joined == ["a+b+c"]
            # once loaded, calls go straight to the real handlers
            assert await channel.unary_unary("/test.v1.Slow/Echo", _encode, _decode)(["again"]) == ["echo", "again"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await channel.unary_unary("/test.v1.Slow/Nope", _encode, _decode)(["x"])
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(main())


def test_services_that_fail_to_load_answer_unavailable_with_why(tmp_path: Path) -> None:
    async def main() -> None:
        gate = Deferred(("/test.v1.",), "the slow services")
        server, channel = await _serving(tmp_path, gate)
        try:
            waiting = asyncio.ensure_future(channel.unary_unary("/test.v1.Slow/Echo", _encode, _decode)(["hi"]))
            await asyncio.sleep(0.1)
            gate.fail("overlayfs is broken")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await waiting
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == "the slow services is not available: overlayfs is broken"
            with pytest.raises(grpc.aio.AioRpcError) as e:  # and later ones too
                await channel.unary_unary("/test.v1.Slow/Echo", _encode, _decode)(["hi"])
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as e:  # another service: not the gate's
                await channel.unary_unary("/other.v1.Svc/Call", _encode, _decode)(["hi"])
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(main())


async def _aiter(items: list[list[str]]) -> AsyncIterator[list[str]]:
    for item in items:
        yield item


async def _collect(call: AsyncIterator[list[str]]) -> list[list[str]]:
    return [item async for item in call]
