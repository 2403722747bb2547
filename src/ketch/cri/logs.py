"""Container logs in the CRI format, and the FIFOs a CRI container's stdio goes through.

Each line the container writes becomes ``<RFC 3339 time with nanoseconds> <stream> <tag>
<content>\\n``: the stream is ``stdout`` or ``stderr``; the tag is ``F`` for a full line and
``P`` for a part of a line longer than :data:`MAX_LINE` (the rest follows in later records),
as the kubelet reads it. :class:`LogWriter` turns two byte streams into that file;
``reopen`` starts a new file at the same path (after the kubelet rotated the old one).

:class:`Fifos` makes a process's FIFOs and opens their reading ends without blocking and
without an early end of file: a placeholder writer holds each until the shim has opened its
own (:meth:`Fifos.writers_ready`), after which the end of file means the process is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["MAX_LINE", "ByteReader", "Fifos", "LogWriter", "format_time"]

#: the longest record content; a longer line is split into P records
MAX_LINE = 16 * 1024
_READ = 64 * 1024


def format_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, in UTC, as Go's time.RFC3339Nano writes it (no trailing zeros)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


class LogWriter:
    """Writes CRI log records to ``path``; every record is one write, so a reader never sees
    half a record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.reopen()

    def reopen(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def record(self, stream: str, content: bytes, partial: bool) -> None:
        import time

        line = b"%s %s %s " % (format_time(time.time_ns()).encode(), stream.encode(), b"P" if partial else b"F")
        os.write(self._fd, line + content + b"\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


async def copy_lines(reader: ByteReader, stream: str, out: LogWriter) -> None:
    """Copy ``reader`` into ``out`` line by line until its end."""
    pending = b""
    while True:
        chunk = await reader.read(_READ)
        if not chunk:
            break
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl < 0 or nl > MAX_LINE:
                if len(pending) >= MAX_LINE:
                    out.record(stream, pending[:MAX_LINE], True)
                    pending = pending[MAX_LINE:]
                    continue
                break
            out.record(stream, pending[:nl], False)
            pending = pending[nl + 1:]
    if pending:
        out.record(stream, pending, True)


@dataclass
class Fifos:
    """The stdio FIFOs of one process under ``dir``."""

    dir: str
    stdin: bool = False
    _holders: list[int] = field(default_factory=list)

    @property
    def paths(self) -> tuple[str, str, str]:
        return (os.path.join(self.dir, "stdin") if self.stdin else "", os.path.join(self.dir, "stdout"),
                os.path.join(self.dir, "stderr"))

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamReader]:
        """Make the FIFOs and open stdout's and stderr's reading ends."""
        loop = asyncio.get_running_loop()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        readers = []
        for path in self.paths:
            if not path:
                continue
            with contextlib.suppress(FileExistsError):
                os.mkfifo(path, 0o600)
            if path.endswith("stdin"):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._holders.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            reader = asyncio.StreamReader(limit=2 * _READ)
            protocol = asyncio.StreamReaderProtocol(reader)
            await loop.connect_read_pipe(lambda: protocol, os.fdopen(fd, "rb", 0))
            readers.append(reader)
        return readers[0], readers[1]

    def writers_ready(self) -> None:
        """The shim has opened its ends: let the readers see its end of file."""
        for fd in self._holders:
            os.close(fd)
        self._holders.clear()

    def remove(self) -> None:
        self.writers_ready()
        shutil.rmtree(self.dir, ignore_errors=True)
