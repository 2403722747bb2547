"""The shim's stdio with real pipes and FIFOs (no root, no runc)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.shim.reaper import Monitor
from ketch.shim.stdio import Console, ProcessIO, Stdio, logger_spawner

from .test_reaper import run


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


# -- where output goes (containerd's runc shim: pkg/process/io.go) ---------------------------------

def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _run_process(stdio: Stdio, writes: dict[int, bytes]) -> None:
    """Make the stdio, play the process (write to its stdout/stderr, exit), drain, close."""

    async def main() -> None:
        io = ProcessIO.create(stdio)
        for i, data in writes.items():
            fd = io.runtime_fds[i]
            assert fd is not None
            os.write(fd, data)
        io.after_spawn()
        await io.drain(timeout=5, reader_timeout=1)
        io.close()

    asyncio.run(main())


def test_a_regular_file_is_appended_to_never_overwritten(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"an earlier line, longer than what follows\n")

    _run_process(Stdio(stdout=str(log), stderr=str(log)), {1: b"out\n", 2: b"err\n"})
    data = log.read_bytes()
    assert data.startswith(b"an earlier line, longer than what follows\n"), data
    assert sorted(data.splitlines()[1:]) == [b"err", b"out"]


def test_a_file_uri_is_created_with_its_directories_and_appended_to(tmp_path: Path) -> None:
    log = tmp_path / "new" / "dirs" / "log"
    uri = f"file://{log}"
    old = os.umask(0o022)
    try:
        for word in (b"one", b"two"):
            _run_process(Stdio(stdout=uri, stderr=uri), {1: word + b"\n"})
    finally:
        os.umask(old)
    assert log.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o644  # as containerd makes it
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o755


@pytest.mark.parametrize("stream", ["stdin", "stdout", "stderr"])
def test_a_path_that_does_not_exist_fails_the_create_and_leaves_no_fd(tmp_path: Path, stream: str) -> None:
    """As containerd's runc shim: a stdio path must exist (only file:// URIs are created); the
    error names the path, and nothing opened before the failure stays open."""
    fifos = {}
    for name in ("stdin", "stdout", "stderr"):
        fifos[name] = tmp_path / name
        os.mkfifo(fifos[name])
    missing = tmp_path / "gone" / stream
    readers = [os.open(fifos[n], os.O_RDONLY | os.O_NONBLOCK) for n in ("stdout", "stderr")]

    async def main() -> tuple[set[str], set[str]]:
        paths = {n: str(missing if n == stream else fifos[n]) for n in fifos}
        before = _open_fds()
        with pytest.raises(errdefs.InvalidArgument, match=f"{stream} '{missing}': No such file or directory"):
            ProcessIO.create(Stdio(**paths))
        await asyncio.sleep(0)
        return before, _open_fds()

    try:
        before, after = asyncio.run(main())
    finally:
        for fd in readers:
            os.close(fd)
    assert after == before


def test_an_unknown_scheme_is_invalid_argument(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(errdefs.InvalidArgument, match="unknown stdio scheme 'http'"):
            ProcessIO.create(Stdio(stdout="http://example.com/log"))

    asyncio.run(main())


def _send_fd(path: str, fd: int | None, wait: float = 0.0, connected: threading.Event | None = None) -> None:
    """What runc does on a console socket: connect, send the pty master (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        if connected is not None:
            connected.set()
        time.sleep(wait)
        if fd is not None:
            socket.send_fds(s, [b"pty"], [fd])


def test_binary_with_a_terminal_gives_the_logger_the_pty_output(tmp_path: Path) -> None:
    """binary:// with a terminal: the logging binary reads the pty's output on its fd 3 (as
    containerd's runc shim gives it), and nothing is ever written into the binary itself."""
    logger = tmp_path / "logger"
    script = ("#!/bin/sh\n"
              "exec 5>&-\n"
              f'cat <&3 > "{tmp_path}/$CONTAINER_ID.out"\n'
              f'cat <&4 > "{tmp_path}/$CONTAINER_ID.err"\n')
    logger.write_text(script)
    logger.chmod(0o755)

    async def scenario(monitor: Monitor) -> None:
        io = ProcessIO.create(Stdio(stdout=f"binary://{logger}", stderr=f"binary://{logger}", terminal=True),
                              logger=logger_spawner(monitor, "ns", "tty1"))
        assert io.runtime_fds == [None, None, None]
        await io.ready()
        assert io.console is not None
        master, slave = os.openpty()
        attach = asyncio.ensure_future(io.attach_console())
        await asyncio.to_thread(_send_fd, io.console.path, master)
        await attach
        os.close(master)  # the shim holds its own copy now
        os.write(slave, b"through the pty\n")
        os.close(slave)  # the process exits
        await io.drain(timeout=10)
        assert io.logger is not None and io.logger.exited.done(), "the logger saw EOF and exited"
        io.close()

    run(scenario)
    assert (tmp_path / "tty1.out").read_bytes().replace(b"\r\n", b"\n") == b"through the pty\n"
    assert (tmp_path / "tty1.err").read_bytes() == b""
    assert logger.read_text() == script


# -- no fd outlives a failed setup -----------------------------------------------------------------

def test_a_console_that_sends_no_pty_leaves_no_fd(tmp_path: Path) -> None:
    stdin, stdout = tmp_path / "in", tmp_path / "out"
    os.mkfifo(stdin)
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)

    async def main() -> tuple[set[str], set[str]]:
        before = _open_fds()
        io = ProcessIO.create(Stdio(stdin=str(stdin), stdout=str(stdout), terminal=True))
        assert io.console is not None
        attach = asyncio.ensure_future(io.attach_console())
        await asyncio.to_thread(_send_fd, io.console.path, None)  # runc died before sending
        with pytest.raises(errdefs.Internal, match="no pty master"):
            await attach
        io.close()
        await asyncio.sleep(0)
        return before, _open_fds()

    try:
        before, after = asyncio.run(main())
    finally:
        os.close(reader)
    assert after == before


def test_a_logger_that_cannot_start_leaves_no_fd(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> tuple[set[str], set[str]]:
        before = _open_fds()
        with pytest.raises(errdefs.InvalidArgument, match="No such file"):
            ProcessIO.create(Stdio(stdout=f"binary://{tmp_path}/no-logger"),
                             logger=logger_spawner(monitor, "ns", "c1"))
        await asyncio.sleep(0)
        return before, _open_fds()

    before, after = run(scenario)
    assert after == before


# -- the console socket ----------------------------------------------------------------------------

def test_receiving_the_pty_master_does_not_block_the_loop() -> None:
    """runc connects to the console socket and takes its time to send the pty master: the
    shim's loop serves meanwhile (other tasks' calls, exits)."""

    async def main() -> tuple[float, bool]:
        console = Console.listen()
        r, w = os.pipe()
        connected, sent = threading.Event(), threading.Event()

        def runc() -> None:
            _send_fd(console.path, r, wait=1.0, connected=connected)
            sent.set()

        sender = threading.Thread(target=runc)
        sender.start()
        try:
            receiving = asyncio.ensure_future(console.receive(10))
            while not connected.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the receive has accepted and waits for the fd
            started = time.monotonic()
            await asyncio.sleep(0.05)  # the loop keeps turning
            waited, sent_already = time.monotonic() - started, sent.is_set()
            master = await receiving
            assert os.fstat(master).st_ino == os.fstat(r).st_ino
            return waited, sent_already
        finally:
            await asyncio.to_thread(sender.join)
            console.close()
            os.close(r)
            os.close(w)

    waited, sent_already = asyncio.run(main())
    assert not sent_already and waited < 0.5, f"the loop was blocked for {waited:.2f}s"
