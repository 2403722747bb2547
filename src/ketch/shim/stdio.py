"""A process's stdio: the client's FIFOs (or files) on one side, the process on the other.

Non-terminal processes get one pipe per stream; the shim moves bytes between those pipes and
the client's FIFOs with ``splice`` (kernel to kernel, no per-byte Python). Terminal processes
get a pty whose master runc hands us through a console socket; its bytes are copied with large
reads. Rules that clients rely on:

* stdout/stderr FIFOs are opened for writing once the client has opened them for reading
  (see _open_fifo_writer), then also for reading, so a client that goes away never makes the
  process die of EPIPE.
* stdin: we hold a writer on the client's stdin FIFO so that a client closing its end (or
  reattaching) is not EOF; ``close_stdin`` (CloseIO) drops our writer, and once the client's
  writer is gone too the copy sees EOF and closes the process's stdin.
* when the process exits, its output is drained (bounded) before the exit is reported, then
  every FIFO end we hold is closed so readers see EOF.

Where output may go (checked before the process runs, as containerd's runc shim does): a plain
path names an existing FIFO, or an existing file, which is appended to (never truncated or
overwritten); a ``file://`` URI is created, with its directories, and appended to; a
``binary://`` URI starts a logging binary that reads the output (with a terminal, the pty's).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import tempfile
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ketch import errdefs
from ketch.oci.runc import ExitWatcher, spawn

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20
_CHUNK = 1 << 20
#: how long output may take to drain after a process exited (a daemonized child may keep
#: the pipe open forever)
DRAIN_TIMEOUT = 2.0
#: how long output already in a pipe waits, after the process exited, for its client to open
#: the FIFO (a client on a loaded host opens it late; dropping the output then loses it)
READER_TIMEOUT = 30.0


def _path_of(uri: str) -> tuple[str, str]:
    """(scheme, path) of a stdio destination: ``path`` for a plain path (or a fifo:// URI),
    ``file`` or ``binary`` for those URIs; another scheme is InvalidArgument."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "/" in scheme:
        return "path", uri
    if scheme == "fifo":
        return "path", rest
    if scheme in ("file", "binary"):
        return scheme, rest
    raise errdefs.InvalidArgument(f"unknown stdio scheme {scheme!r} in {uri!r} (want a path, file:// or binary://)")


async def _open_fifo_writer(path: str) -> int:
    """The client's output FIFO, opened for writing once the client has opened it for reading.

    A client may open its reader late (ctr opens it from a goroutine that can run after a
    fast container exited). Had we held the FIFO open ourselves meanwhile, our last close
    would throw the buffered output away before the client came. Linux signals nothing when
    a FIFO gains a reader, and a blocking open would cost a thread per stream, so: a
    non-blocking open, which fails with ENXIO until a reader is there, tried at once and then
    at growing intervals (bounded by the caller: the drain after exit)."""
    delay = 0.001
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        _set_pipe_size(fd)  # a FIFO is a pipe: a larger buffer means fewer wake-ups per MiB
        return fd


async def _wait_fd(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def pump(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` until EOF on ``src`` or an error on ``dst``.

    Both fds must be non-blocking (a regular file destination is fine). Uses splice when
    either side is a pipe and falls back to read/write (ptys, files)."""
    use_splice = True
    pending = b""
    while True:
        if pending:
            try:
                n = os.write(dst, pending)
            except BlockingIOError:
                await _wait_fd(dst, True)
                continue
            except (BrokenPipeError, OSError) as e:
                log.debug("stdio destination closed: %s", e)
                return
            pending = pending[n:]
            continue
        try:
            if use_splice:
                n = os.splice(src, dst, _CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                if n == 0:
                    return
                continue
            data = os.read(src, _CHUNK)
            if not data:
                return
            pending = data
        except BlockingIOError:
            # either the source is empty or the destination is full: find out which
            if _readable(src):
                await _wait_fd(dst, True)
            else:
                await _wait_fd(src, False)
        except OSError as e:
            if use_splice and e.errno == errno.EINVAL:
                use_splice = False
                continue
            if e.errno == errno.EIO:  # a pty master whose slave side closed: EOF
                return
            if e.errno == errno.EPIPE:
                return
            raise


def _readable(fd: int) -> bool:
    import select

    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    return bool(p.poll(0))


def _set_pipe_size(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


def _nonblock(fd: int) -> None:
    os.set_blocking(fd, False)


@dataclass
class Stdio:
    """Where a process's three streams go, as the client named them."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class ProcessIO:
    """The shim's side of one process's stdio, alive from create to delete."""

    stdio: Stdio
    #: fds to hand to runc as the process's 0, 1, 2 (None = /dev/null); closed after spawn
    runtime_fds: list[int | None] = field(default_factory=lambda: [None, None, None])
    console: Console | None = None
    #: the fds we hold that the process's stdio depends on, by role (see :meth:`kept`)
    _held: dict[str, int] = field(default_factory=dict)
    _stdin_keeper: int | None = None
    _stdin_w: int | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _output_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closed: bool = False
    logger: Logger | None = None
    #: called when the set of fds :meth:`kept` returns changes (the keeper holds copies)
    on_change: Callable[[], None] | None = None
    #: set once every output FIFO has its writer open (the client is reading)
    _readers: list[asyncio.Future[None]] = field(default_factory=list)

    @classmethod
    def create(cls, stdio: Stdio, *, uid: int = -1, gid: int = -1, logger: LoggerSpawn | None = None) -> ProcessIO:
        """Open the client's FIFOs and files and make the process's pipes (or a console
        socket), the pipes owned by ``uid``:``gid`` when given (the runtime options' io_uid and
        io_gid: a process in a user namespace must be able to reopen them). ``logger`` starts
        the binary of a binary:// destination (see :class:`Logger`). Bad destinations are
        InvalidArgument; on any failure every fd opened so far is closed."""
        io = cls(stdio)
        try:
            binary = any(uri and _path_of(uri)[0] == "binary" for uri in (stdio.stdout, stdio.stderr))
            if stdio.terminal:
                # one stream, the pty's, as containerd's: stdout's destination gets it
                if stdio.stdout and _path_of(stdio.stdout)[0] == "binary":
                    io._make_logger(logger, uid, gid)
                elif stdio.stdout:
                    io._open_destination("out", stdio.stdout)
                io._open_stdin()
                io.console = Console.listen()
            elif binary:
                io._make_logger(logger, uid, gid)
            else:
                io._make_pipes(uid, gid)
        except BaseException:
            io.close()
            raise
        return io

    def _make_logger(self, spawn: LoggerSpawn | None, uid: int, gid: int) -> None:
        """binary://PATH?ARGS: a logging binary reads the output from pipes, as its fds 3 (stdout)
        and 4 (stderr), as containerd's shims do. The process writes straight into them; with a
        terminal the shim copies the pty's output into the first (see :meth:`_copy_out`), and
        the second is closed at once."""
        s = self.stdio
        uri = s.stdout if s.stdout and _path_of(s.stdout)[0] == "binary" else s.stderr
        if spawn is None:
            raise errdefs.Unimplemented("binary:// stdio needs a logger")
        if s.stdin and not s.terminal:
            raise errdefs.InvalidArgument("binary:// stdio takes no stdin")
        readers: list[int] = []
        try:
            for i in (1, 2):
                r, self.runtime_fds[i] = os.pipe2(os.O_CLOEXEC)
                readers.append(r)
            self.logger = spawn(_path_of(uri)[1], readers[0], readers[1])
        finally:
            for r in readers:
                os.close(r)
        out_w, err_w = self.runtime_fds[1], self.runtime_fds[2]
        assert out_w is not None and err_w is not None
        if s.terminal:
            self.runtime_fds[1] = self.runtime_fds[2] = None
            os.close(err_w)
            _nonblock(out_w)
            self._hold("out.dst", out_w)
        elif uid >= 0 or gid >= 0:
            for fd in (out_w, err_w):
                os.fchown(fd, uid, gid)

    def _open_destination(self, stream: str, uri: str) -> None:
        """Check (and open) where ``stream`` (``out`` or ``err``) goes before the process runs.
        A file:// URI: its directories and the file are created, and it is opened for appending.
        A plain path must exist: a FIFO is opened later, once its client reads it (see
        :meth:`_copy_out`); anything else (a regular file, a device) is opened now for appending,
        never truncated or overwritten. As containerd's runc shim."""
        kind, path = _path_of(uri)
        try:
            if kind == "file":
                os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            elif stat.S_ISFIFO(os.stat(path).st_mode):
                return
            else:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise errdefs.InvalidArgument(
                f"std{stream} {path!r}: {e.strerror or e} (a stdio path names an existing FIFO or file; "
                "file:// URIs are created)") from None
        _nonblock(fd)
        self._hold(f"{stream}.dst", fd)

    def _open_stdin(self) -> int | None:
        """The client's stdin, opened for reading; for a FIFO, our writer on it too (see the
        module doc). None without stdin."""
        if not self.stdio.stdin:
            return None
        path = _path_of(self.stdio.stdin)[1]
        try:
            src = self._hold("in.src", os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            if stat.S_ISFIFO(os.fstat(src).st_mode):
                self._stdin_keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise errdefs.InvalidArgument(f"stdin {path!r}: {e.strerror or e}") from None
        return src

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until a logging binary says it is ready (it closes fd 5 or writes to it)."""
        if self.logger is not None:
            await self.logger.ready(timeout)

    def _hold(self, role: str, fd: int) -> int:
        self._held[role] = fd
        if self.on_change is not None:
            self.on_change()
        return fd

    @property
    def closed(self) -> bool:
        return self._closed

    def kept(self) -> dict[str, int]:
        """The fds whose loss would hurt the process or its client, by role: the pipes to the
        process (``in.w``, ``out.r``, ``err.r``), the client's FIFOs (``in.src``, ``in.keep``,
        ``out.dst``, ``out.rd``, …) and a pty master (``pty``). A successor shim adopts them."""
        fds = dict(self._held)
        if self._stdin_keeper is not None:
            fds["in.keep"] = self._stdin_keeper
        if self._stdin_w is not None:
            fds["in.w"] = self._stdin_w
        if self.console is not None and self.console.master is not None:
            fds["pty"] = self.console.master
        return fds

    def _copy_out(self, src: int, uri: str, stream: str) -> None:
        """Copy ``src`` to the client's ``uri`` until EOF; ``stream`` is ``out`` or ``err``.
        The destination is the one :meth:`_open_destination` opened (a file, a logger's pipe,
        or a FIFO an earlier shim opened), else a FIFO opened once the client reads it."""
        kind, path = _path_of(uri)
        dst = self._held.get(f"{stream}.dst")
        if dst is not None:
            # a logger's pipe is closed at the end of the copy: the logger then sees EOF
            self._output_tasks.append(asyncio.ensure_future(self._copy_to(src, dst, stream, kind == "binary")))
            return
        if kind != "path":  # never opened as a FIFO: a binary:// path is the logger itself
            log.warning("std%s %s: nothing to copy to", stream, uri)
            return

        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers.append(opened)

        async def copy() -> None:
            # our own reader keeps the FIFO alive if the client goes away: the process then
            # blocks on a full pipe instead of dying of EPIPE
            try:
                dst = await _open_fifo_writer(path)
            finally:
                if not opened.done():
                    opened.set_result(None)
            self._hold(f"{stream}.dst", dst)
            self._held[f"{stream}.rd"] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            await pump(src, dst)

        self._output_tasks.append(asyncio.ensure_future(copy()))

    async def _copy_to(self, src: int, dst: int, stream: str, closes: bool) -> None:
        await pump(src, dst)
        if closes and not self._closed and self._held.get(f"{stream}.dst") == dst:
            del self._held[f"{stream}.dst"]
            os.close(dst)
            self._changed()

    @classmethod
    def adopt(cls, stdio: Stdio, fds: dict[str, int], logger: Logger | None = None) -> ProcessIO:
        """The stdio of a running process whose shim died, from the fds the keeper kept
        (:meth:`kept` of the old shim's ProcessIO): copying resumes where it stopped."""
        io = cls(stdio, logger=logger)
        io._stdin_keeper = fds.pop("in.keep", None)
        io._stdin_w = fds.pop("in.w", None)
        master = fds.pop("pty", None)
        io._held.update(fds)
        for fd in [*fds.values(), *(f for f in (io._stdin_w, master) if f is not None)]:
            os.set_inheritable(fd, False)
        if master is not None:
            io.console = Console.adopt(master)
            if stdio.stdout:
                io._copy_out(master, stdio.stdout, "out")
            if "in.src" in fds:
                io._tasks.append(asyncio.ensure_future(pump(fds["in.src"], master)))
            return io
        if io._stdin_w is not None and "in.src" in fds:
            io._tasks.append(asyncio.ensure_future(io._copy_stdin(fds["in.src"], io._stdin_w)))
        for stream, uri in (("out", stdio.stdout), ("err", stdio.stderr)):
            if f"{stream}.r" in fds and uri:
                io._copy_out(fds[f"{stream}.r"], uri, stream)
        return io

    def _make_pipes(self, uid: int, gid: int) -> None:
        s = self.stdio
        for stream, uri in (("out", s.stdout), ("err", s.stderr)):
            if uri:
                self._open_destination(stream, uri)
        src = self._open_stdin()
        if src is not None:
            r, w = os.pipe2(os.O_CLOEXEC)
            self.runtime_fds[0] = r
            self._stdin_w = w
            _nonblock(w)
            self._tasks.append(asyncio.ensure_future(self._copy_stdin(src, w)))
        for i, stream, uri in ((1, "out", s.stdout), (2, "err", s.stderr)):
            if not uri:
                continue
            r, self.runtime_fds[i] = os.pipe2(os.O_CLOEXEC)
            self._hold(f"{stream}.r", r)
            _set_pipe_size(r)
            _nonblock(r)
            self._copy_out(r, uri, stream)
        if uid >= 0 or gid >= 0:
            for fd in self.runtime_fds:
                if fd is not None:
                    os.fchown(fd, uid, gid)

    async def _copy_stdin(self, src: int, w: int) -> None:
        try:
            await pump(src, w)
        finally:
            self._close_stdin_pipe()

    def _close_stdin_pipe(self) -> None:
        if self._stdin_w is not None:
            os.close(self._stdin_w)
            self._stdin_w = None
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None and not self._closed:
            self.on_change()

    def after_spawn(self) -> None:
        """The runtime has the process's ends now: close ours so EOF can happen."""
        for i, fd in enumerate(self.runtime_fds):
            if fd is not None:
                os.close(fd)
                self.runtime_fds[i] = None

    async def attach_console(self, timeout: float = 10.0) -> None:
        """Receive the pty master from runc and start copying (terminal processes)."""
        assert self.console is not None
        master = await self.console.receive(timeout)
        if self.stdio.stdout:
            self._copy_out(master, self.stdio.stdout, "out")
        src = self._held.get("in.src")
        if src is not None:
            self._tasks.append(asyncio.ensure_future(pump(src, master)))

    def resize(self, width: int, height: int) -> None:
        if self.console is None or self.console.master is None:
            raise errdefs.FailedPrecondition("process has no terminal to resize")
        fcntl.ioctl(self.console.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        """CloseIO: drop our writer on the stdin FIFO; EOF follows once the client's is gone."""
        if self._stdin_keeper is not None:
            os.close(self._stdin_keeper)
            self._stdin_keeper = None
            self._changed()
        elif self.console is None:
            self._close_stdin_pipe()

    async def drain(self, timeout: float = DRAIN_TIMEOUT, reader_timeout: float = READER_TIMEOUT) -> None:
        """Wait (bounded) for the output copies to reach EOF after the process exited (or for
        the logging binary to finish). A copy still waiting for its client to open the FIFO
        gets ``reader_timeout`` for that first: the output is in the pipe, and only a reader
        can take it (the EOF bound is for a daemonized child holding the pipe, not for this)."""
        pending = [f for f in self._readers if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=reader_timeout)
        waits: list[asyncio.Future[Any]] = list(self._output_tasks)
        if self.logger is not None:
            waits.append(self.logger.exited)
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    def close(self) -> None:
        """Stop every copy and close every fd we hold (readers of the FIFOs see EOF)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks + self._output_tasks:
            t.cancel()
        self.after_spawn()
        self._close_stdin_pipe()
        if self._stdin_keeper is not None:
            os.close(self._stdin_keeper)
            self._stdin_keeper = None
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
        if self.console is not None:
            self.console.close()
        if self.logger is not None:
            self.logger.stop()


class Logger:
    """A logging binary started for binary:// stdio (containerd's contract): argv from the
    URI's path and query, environment CONTAINER_ID and CONTAINER_NAMESPACE, the process's
    stdout and stderr as fds 3 and 4, and fd 5 to close (or write to) once it is ready."""

    def __init__(self, pid: int, ready_fd: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self._ready_fd = ready_fd
        self.exited = exited

    @staticmethod
    def argv(target: str) -> list[str]:
        from urllib.parse import parse_qsl, unquote, urlsplit

        parts = urlsplit("binary://" + target)
        argv = [unquote(parts.path)]
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            argv += [key, value] if value else [key]
        return argv

    async def ready(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        os.read(self._ready_fd, 1)
                        return  # a byte, or EOF: ready either way
                    except BlockingIOError:
                        await _wait_fd(self._ready_fd, False)
        except TimeoutError:
            self.stop()
            raise errdefs.DeadlineExceeded(f"logging binary (pid {self.pid}) not ready in {timeout:.0f}s") from None
        finally:
            self._close_ready()

    def _close_ready(self) -> None:
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1

    def stop(self) -> None:
        """Kill a logger that outlived its process's drain (it is reaped by the shim)."""
        self._close_ready()
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


#: spawn(target, stdout_r, stderr_r) → Logger; made by :func:`logger_spawner`
LoggerSpawn = Callable[[str, int, int], Logger]


def logger_spawner(reaper: ExitWatcher, namespace: str, container_id: str) -> LoggerSpawn:
    """Starts the logging binary of a binary:// stdio of ``container_id``; ``reaper`` (the
    shim's one reaper) collects its exit."""

    def spawn_logger(target: str, out_r: int, err_r: int) -> Logger:
        argv = Logger.argv(target)
        if not os.path.isabs(argv[0]):
            raise errdefs.InvalidArgument(f"binary:// logger {argv[0]!r} must be an absolute path")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            pid = spawn(argv, env={"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace},
                        fds={3: out_r, 4: err_r, 5: ready_w})
        except OSError as e:
            os.close(ready_r)
            raise errdefs.InvalidArgument(f"binary:// logger {argv[0]!r}: {e.strerror}") from None
        finally:
            os.close(ready_w)
        return Logger(pid, ready_r, reaper.watch(pid))

    return spawn_logger


class Console:
    """A console socket runc connects to, to hand over a new pty master."""

    def __init__(self, sock: socket.socket | None, directory: str) -> None:
        self._sock = sock
        self._dir = directory
        self.path = os.path.join(directory, "pty.sock")
        self.master: int | None = None

    @classmethod
    def adopt(cls, master: int) -> Console:
        """The console of a process whose pty master a previous shim received."""
        console = cls.__new__(cls)
        console._sock, console._dir, console.path, console.master = None, "", "", master
        _nonblock(master)
        return console

    @classmethod
    def listen(cls) -> Console:
        directory = tempfile.mkdtemp(prefix="ketch-pty")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(os.path.join(directory, "pty.sock"))
        sock.listen(1)
        sock.setblocking(False)
        return cls(sock, directory)

    async def receive(self, timeout: float) -> int:
        """The pty master runc sends over the socket (SCM_RIGHTS). Accept and receive never
        block the event loop: runc may connect and take its time to send."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        fds = array.array("i")
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                conn.setblocking(False)
                while True:
                    try:
                        # room for one fd: the kernel closes any more than that (MSG_CTRUNC)
                        _msg, ancdata, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
                        break
                    except (BlockingIOError, InterruptedError):
                        await _wait_fd(conn.fileno(), False)
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            raise errdefs.Internal("runtime sent no pty master on the console socket")
        self.master = fds[0]
        os.set_inheritable(self.master, False)
        _nonblock(self.master)
        self._cleanup_socket()
        return self.master

    def _cleanup_socket(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)
        self._sock = None

    def close(self) -> None:
        self._cleanup_socket()
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
