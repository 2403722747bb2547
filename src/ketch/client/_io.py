"""A process's standard IO, as the client sets it up.

What a caller asks for (:class:`Stdio`, :class:`LogURI`, or nothing) becomes, per process, the
three strings the daemon is told (FIFO paths, a log URI, or empty) and, for FIFOs, copies
between them and Python streams, files, fds or memory.

The FIFOs are the client's, in a directory of its own under the client's fifo dir, made before
the daemon hears of them. An output FIFO is opened for reading at once, together with a write
end the client holds until the process has started: the shim opens its end during Create (a
task) or Start (an exec), and a process that writes and exits at once could otherwise leave the
reader an EOF before the shim had opened anything. Once the process runs, EOF means every
writer (the shim's copy) is done. Stdin is opened read-write (so the open does not wait for the
shim), and closed, with the daemon told to close its end, when the source is exhausted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Union

from ketch import errdefs

__all__ = ["Capture", "LogURI", "ProcessIO", "Stdio"]

CHUNK = 65536


@dataclass
class Capture:
    """Output collected in memory, at most ``limit`` bytes (None: no limit); what went past
    the limit is read and dropped, and ``truncated`` says so."""

    limit: int | None = None
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def feed(self, chunk: bytes) -> None:
        if self.limit is not None and len(self.data) + len(chunk) > self.limit:
            self.data += chunk[: max(0, self.limit - len(self.data))]
            self.truncated = True
        else:
            self.data += chunk

    def __bytes__(self) -> bytes:
        return bytes(self.data)


Source = Union[bytes, BinaryIO, int, None]
Sink = Union[Capture, BinaryIO, int, Callable[[bytes], None], None]


@dataclass
class Stdio:
    """FIFOs the client copies: ``stdin`` from bytes, a binary file or an fd; ``stdout`` and
    ``stderr`` to a :class:`Capture`, a binary file, an fd or a callable. None: not connected.
    With ``terminal`` the process gets a pty and its output all comes on ``stdout``."""

    stdin: Source = None
    stdout: Sink = None
    stderr: Sink = None
    terminal: bool = False


@dataclass(frozen=True)
class LogURI:
    """stdout and stderr go where the shim sends them, with no client in between:
    ``file:///path`` appends both to a file, ``binary:///path/to/logger?k=v`` starts a logging
    binary with the two streams (containerd's contract)."""

    uri: str

    def __post_init__(self) -> None:
        scheme, sep, rest = self.uri.partition("://")
        if not sep or scheme not in ("file", "binary") or not rest.startswith("/"):
            raise errdefs.InvalidArgument(
                f"log destination {self.uri!r}: want file:///absolute/path or binary:///absolute/path[?args]")


IOSpec = Union[Stdio, LogURI, None]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _deliver(sink: Sink, chunk: bytes) -> None:
    if isinstance(sink, Capture):
        sink.feed(chunk)
    elif isinstance(sink, int):
        _write_all(sink, chunk)
    elif callable(sink):
        sink(chunk)
    elif sink is not None:
        sink.write(chunk)
        sink.flush()


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _copy_out(fd: int, sink: Sink) -> None:
    """Everything from ``fd`` (non-blocking) to ``sink`` until EOF."""
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            await _readable(fd)
            continue
        if not chunk:
            return
        _deliver(sink, chunk)


def _fileno(source: object) -> int | None:
    if isinstance(source, int):
        return source
    try:
        return int(source.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


async def _copy_in(fd: int, source: Source) -> None:
    """``source`` into ``fd`` (non-blocking), until the source's end. An fd source (or a file
    with one) is read when the loop says it is readable, so cancelling never leaves a thread
    stuck in a read; other file objects are read in a thread."""
    loop = asyncio.get_running_loop()

    async def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _writable(fd)

    try:
        if isinstance(source, (bytes, bytearray)):
            await write(bytes(source))
            return
        src = _fileno(source)
        if src is not None:
            pollable = True
            while True:
                if pollable:
                    try:
                        await _readable(src)
                    except PermissionError:
                        pollable = False  # a regular file: always readable
                try:
                    chunk = os.read(src, CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                await write(chunk)
        elif source is not None and not isinstance(source, int):
            stream = source
            read = stream.read1 if hasattr(stream, "read1") else stream.read
            while chunk := await loop.run_in_executor(None, read, CHUNK):
                await write(chunk)
    except BrokenPipeError:
        pass  # nobody reads any more


class ProcessIO:
    """The IO of one process: the strings for the daemon, and the copies for FIFOs."""

    def __init__(self, stdin: str = "", stdout: str = "", stderr: str = "", terminal: bool = False,
                 spec: Stdio | None = None, directory: str | None = None) -> None:
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.spec = spec
        self.directory = directory
        self._fds: list[int] = []  # stdin's end, then stdout's and stderr's read ends
        self._keep: list[int] = []  # write ends held until the process has started
        self._out: list[asyncio.Task[None]] = []
        self._in: asyncio.Task[None] | None = None
        self._registry: set[ProcessIO] | None = None

    def register(self, registry: set[ProcessIO]) -> ProcessIO:
        """Be closed with ``registry``'s owner (a client closing closes its copies; the FIFOs
        stay for a client that attaches again)."""
        if self.spec is not None:
            self._registry = registry
            registry.add(self)
        return self

    # -- making ----------------------------------------------------------------------------

    @classmethod
    def create(cls, spec: IOSpec, fifo_dir: str, process_id: str) -> ProcessIO:
        """The IO ``spec`` asks for, FIFOs made and opened (see the module's docstring)."""
        if spec is None:
            return cls()
        if isinstance(spec, LogURI):
            return cls("", spec.uri, spec.uri)
        os.makedirs(fifo_dir, mode=0o700, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="io-", dir=fifo_dir)
        io = cls(terminal=spec.terminal, spec=spec, directory=directory)
        try:
            if spec.stdin is not None:
                io.stdin = os.path.join(directory, f"{process_id}-stdin")
                os.mkfifo(io.stdin, 0o700)
                io._fds.append(os.open(io.stdin, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            # containerd's runc shim opens both output FIFOs or none (a terminal has no
            # stderr): an unwanted stream gets one too, and is dropped
            wanted = spec.stdout is not None or (spec.stderr is not None and not spec.terminal)
            for name in ("stdout", "stderr"):
                if not wanted or (name == "stderr" and spec.terminal):
                    continue
                path = os.path.join(directory, f"{process_id}-{name}")
                os.mkfifo(path, 0o700)
                setattr(io, name, path)
                io._fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                io._keep.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except BaseException:
            for fd in (*io._fds, *io._keep):
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return io

    @classmethod
    def attach(cls, spec: IOSpec, stdin: str, stdout: str, stderr: str, terminal: bool) -> ProcessIO:
        """Copies for a process that runs already (a client that restarted): its FIFOs, as
        the daemon reports them, opened again. The shim holds their other ends."""
        io = cls(stdin, stdout, stderr, terminal)
        if not isinstance(spec, Stdio):
            return io
        io.spec = spec
        try:
            if spec.stdin is not None and _is_fifo(stdin):
                io._fds.append(os.open(stdin, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            else:
                io.stdin = ""
            for name in ("stdout", "stderr"):
                path = getattr(io, name)
                if getattr(spec, name) is not None and _is_fifo(path) and not (name == "stderr" and path == stdout):
                    io._fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                else:
                    setattr(io, name, "")
        except BaseException:
            for fd in io._fds:
                os.close(fd)
            raise
        io.copy()
        return io

    # -- copying ---------------------------------------------------------------------------

    def copy(self) -> None:
        """Start copying output (stdin waits for :meth:`started`)."""
        if self.spec is None:
            return
        fds = iter(self._fds[1:] if self.stdin else self._fds)
        for name in ("stdout", "stderr"):
            if getattr(self, name):
                self._out.append(asyncio.ensure_future(_copy_out(next(fds), getattr(self.spec, name))))

    def started(self, close_stdin: Callable[[], Awaitable[None]]) -> None:
        """The process runs: drop the held write ends, and feed stdin (then tell the daemon,
        through ``close_stdin``, to close it)."""
        for fd in self._keep:
            os.close(fd)
        self._keep = []
        if self.stdin and self.spec is not None and self._in is None:
            fd = self._fds[0]
            source = self.spec.stdin

            async def feed() -> None:
                await _copy_in(fd, source)
                self._fds.remove(fd)
                os.close(fd)
                with contextlib.suppress(errdefs.NotFound, errdefs.FailedPrecondition):
                    await close_stdin()

            self._in = asyncio.ensure_future(feed())

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the output copies reach EOF; False if ``timeout`` passed first (the
        copies go on)."""
        if not self._out:
            return True
        done, _ = await asyncio.wait(self._out, timeout=timeout)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return len(done) == len(self._out)

    async def close(self) -> None:
        """Stop copying and close every fd (the FIFO files stay until :meth:`remove`)."""
        tasks = [*self._out, *([self._in] if self._in else [])]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for fd in (*self._fds, *self._keep):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds, self._keep, self._out, self._in = [], [], [], None

    async def remove(self) -> None:
        """close, and remove the FIFOs."""
        await self.close()
        if self._registry is not None:
            self._registry.discard(self)
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
