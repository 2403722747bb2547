"""The one set of Read rules (containerd 1.6 ``Content/Read``), and every reader path using it.

containerd's contentserver.Read: a negative offset reads from 0; an offset past the end is
OutOfRange ``read past object length N bytes``; a size of 0 or less, or one reaching past
the end, reads to the end.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ketch import errdefs, identifiers
from ketch.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from ketch.content import ContentStore, read_span
from ketch.metadata import Store
from ketch.services.content import Content

DATA = bytes(range(256)) * 40  # 10240 bytes
N = len(DATA)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()

# (offset, size) asked → (offset, size) read; None: OutOfRange
RULES: list[tuple[int, int, tuple[int, int] | None]] = [
    (0, 0, (0, N)),            # size 0: to the end
    (0, -1, (0, N)),           # negative size: to the end
    (0, 10, (0, 10)),
    (100, 50, (100, 50)),
    (-4, 10, (0, 10)),         # negative offset: from 0
    (-4, 0, (0, N)),
    (N - 5, 100, (N - 5, 5)),  # past the end: to the end
    (10_000, 1_000_000, (10_000, N - 10_000)),
    (N, 0, (N, 0)),            # at the end: nothing
    (N, 10, (N, 0)),
    (N + 1, 0, None),          # beyond the end: OutOfRange
    (N + 1, 1, None),
]


@pytest.mark.parametrize("offset, size, expected", RULES)
def test_read_span(offset: int, size: int, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(errdefs.OutOfRange) as info:
            read_span(offset, size, N)
        assert info.value.message == f"read past object length {N} bytes"
    else:
        assert read_span(offset, size, N) == expected


def test_read_span_of_an_empty_blob() -> None:
    assert read_span(0, 0, 0) == (0, 0)
    assert read_span(-1, 5, 0) == (0, 0)
    with pytest.raises(errdefs.OutOfRange):
        read_span(1, 0, 0)


@pytest.fixture
def cs(tmp_path: Path) -> Iterator[ContentStore]:
    store = Store(str(tmp_path / "meta.db"))
    cs = ContentStore(tmp_path / "content", store)
    with cs.writer("default", "data") as w:
        w.write(DATA)
        w.commit(N, DIGEST)
    yield cs
    store.close()


def _expect(offset: int, size: int) -> bytes:
    start, length = read_span(offset, size, N)
    return DATA[start:start + length]


@pytest.mark.parametrize("offset, size, expected", RULES)
def test_every_reader_path_follows_the_rules(cs: ContentStore, offset: int, size: int,
                                             expected: tuple[int, int] | None) -> None:
    with cs.reader("default", DIGEST) as r:
        paths = [
            lambda: r.read_at(offset, size),
            lambda: b"".join(d for _, d in r.chunks(offset, size, chunk_size=999)),
            lambda: b"".join(cs.read("default", DIGEST, offset, size, chunk_size=999)),
        ]
        for read in paths:
            if expected is None:
                with pytest.raises(errdefs.OutOfRange):
                    read()
            else:
                assert read() == _expect(offset, size)


def test_chunks_carry_their_offsets(cs: ContentStore) -> None:
    with cs.reader("default", DIGEST) as r:
        pieces = list(r.chunks(-3, 2500, chunk_size=1000))
    assert [(o, len(d)) for o, d in pieces] == [(0, 1000), (1000, 1000), (2000, 500)]


class _Collector:
    def schedule(self) -> None:
        pass


async def _read_over_grpc(cs: ContentStore, socket: str,
                          requests: list[tuple[int, int]]) -> list[tuple[list[int], bytes] | grpc.StatusCode]:
    server = grpc.aio.server()
    content_pb2_grpc.add_ContentServicer_to_server(Content(cs, _Collector()), server)  # type: ignore[arg-type]
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    out: list[tuple[list[int], bytes] | grpc.StatusCode] = []
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            stub = content_pb2_grpc.ContentStub(channel)
            md = ((identifiers.GRPC_NAMESPACE_KEY, "default"),)
            for offset, size in requests:
                try:
                    resps = [r async for r in stub.Read(content_pb2.ReadContentRequest(
                        digest=DIGEST, offset=offset, size=size), metadata=md)]
                except grpc.aio.AioRpcError as exc:
                    out.append(exc.code())
                else:
                    out.append(([r.offset for r in resps], b"".join(r.data for r in resps)))
    finally:
        await server.stop(None)
    return out


def test_the_read_service_follows_the_rules(cs: ContentStore, tmp_path: Path) -> None:
    got = asyncio.run(_read_over_grpc(cs, str(tmp_path / "s.sock"), [(o, s) for o, s, _ in RULES]))
    for (offset, size, expected), answer in zip(RULES, got, strict=True):
        if expected is None:
            assert answer == grpc.StatusCode.OUT_OF_RANGE
        else:
            assert not isinstance(answer, grpc.StatusCode)
            offsets, data = answer
            assert data == _expect(offset, size)
            assert offsets == ([expected[0]] if expected[1] else [])
