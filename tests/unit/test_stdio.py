"""The shim's stdio with real pipes and FIFOs (no root, no runc)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ketch.shim.stdio import ProcessIO, Stdio


def test_output_waits_for_a_client_that_opens_its_fifo_late(tmp_path: Path) -> None:
    """The process wrote and exited before its client opened the FIFO (a loaded host): the
    output waits for the reader instead of being dropped at the drain's EOF bound."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)

    async def main() -> bytes:
        io = ProcessIO.create(Stdio(stdout=str(fifo)))
        w = io.runtime_fds[1]
        assert w is not None
        os.write(w, b"hello, late reader\n")
        io.after_spawn()  # the process's end: it has exited

        def read_all() -> bytes:
            fd = os.open(fifo, os.O_RDONLY)  # blocks until the shim opens its writer
            data = b""
            try:
                while chunk := os.read(fd, 4096):
                    data += chunk
            finally:
                os.close(fd)
            return data

        async def late_reader() -> bytes:
            await asyncio.sleep(0.3)
            async with asyncio.timeout(5):
                return await asyncio.to_thread(read_all)

        reader = asyncio.ensure_future(late_reader())
        await io.drain(timeout=0.05, reader_timeout=5)
        io.close()
        return await reader

    assert asyncio.run(main()) == b"hello, late reader\n"


def test_a_client_that_never_reads_delays_the_exit_only_so_long(tmp_path: Path) -> None:
    fifo = tmp_path / "out"
    os.mkfifo(fifo)

    async def main() -> float:
        io = ProcessIO.create(Stdio(stdout=str(fifo)))
        io.after_spawn()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await io.drain(timeout=0.05, reader_timeout=0.2)
        io.close()
        return loop.time() - started

    assert asyncio.run(main()) < 2
