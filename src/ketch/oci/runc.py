"""The runc command line, driven from asyncio without a second reaper.

Every command is started with ``posix_spawn`` and waited for through the shim's
:class:`~ketch.shim.reaper.Monitor` (anything else that waits for children would race the
shim's SIGCHLD reaper). Every call is bounded by a timeout; a command that overruns or whose
caller is cancelled is killed and awaited before the error propagates, so no runc is ever
orphaned. A failure carries runc's own words, taken from its JSON log, and is classified
once, by :func:`classify`, into the errdefs class those words mean; callers catch the class
(``except errdefs.NotFound``), never match the text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ketch import errdefs

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
#: create and exec wait for the container to be set up, which can take long on a busy host
SETUP_TIMEOUT = 120.0


class ExitWatcher(Protocol):
    def watch(self, pid: int) -> asyncio.Future[int]: ...


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
    fds: Mapping[int, int] | None = None,
) -> int:
    """Start ``argv`` with the given fds as its stdio (None: /dev/null) and ``fds`` (child fd →
    our fd) besides; returns the pid."""
    actions: list[tuple[int, ...]] = []
    null = None
    try:
        for target, fd in ((0, stdin), (1, stdout), (2, stderr), *sorted((fds or {}).items())):
            if fd is None:
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fd = null
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        return os.posix_spawn(
            argv[0], list(argv), os.environ if env is None else env, file_actions=actions,
            setsigdef=(signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT),
        )
    finally:
        if null is not None:
            os.close(null)


async def _read_all(fd: int) -> bytes:
    """Everything from a non-blocking pipe until EOF."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def wait_or_kill(pid: int, exited: asyncio.Future[int], timeout: float) -> int:
    """Wait for ``pid`` up to ``timeout``; on timeout or cancellation kill it and await its
    exit before raising, so the child is never left behind."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(exited)
    except BaseException:
        for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            done, _ = await asyncio.wait([exited], timeout=grace)
            if done:
                break
            log.warning("pid %d ignored %s", pid, sig.name)
        raise


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: bytes


async def run_command(
    monitor: ExitWatcher,
    argv: Sequence[str],
    *,
    stdio: tuple[int | None, ...] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """Run ``argv`` to its end (killed after ``timeout``: TimeoutError); its status, and its
    stdout and stderr unless ``stdio`` gives it fds of its own."""
    out_r = err_r = None
    try:
        if stdio is None:
            out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                pid = spawn(argv, stdout=out_w, stderr=err_w)
            finally:
                os.close(out_w)
                os.close(err_w)
        else:
            pid = spawn(argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        exited = monitor.watch(pid)
        readers = [asyncio.ensure_future(_read_all(fd)) for fd in (out_r, err_r) if fd is not None]
        try:
            status = await wait_or_kill(pid, exited, timeout)
        except BaseException:
            for r in readers:
                r.cancel()
            raise
        out, err = (await asyncio.gather(*readers)) if readers else (b"", b"")
    finally:
        for fd in (out_r, err_r):
            if fd is not None:
                os.close(fd)
    return Result(status, out, err)


class RuncError(errdefs.KetchError):
    """runc exited non-zero; the message is runc's own error text. Raised as one of the
    subclasses below, which :func:`classify` picks: each is also the errdefs class it means."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RuncNotFound(RuncError, errdefs.NotFound):
    """The container or the process is gone: it does not exist, or it is no longer running."""


class RuncFailedPrecondition(RuncError, errdefs.FailedPrecondition):
    """The container is in a state that does not allow the command (paused, stopped...)."""


class RuncUnknown(RuncError, errdefs.Unknown):
    """Any other failure."""


#: (words in runc's message, the class they mean), first match wins; runc's messages as of
#: 1.0–1.1 (libcontainer's ErrNotExist/ErrNotRunning/ErrPaused/..., the kill(2) errors)
_CLASSES: tuple[tuple[str, type[RuncError]], ...] = (
    ("does not exist", RuncNotFound),  # container "x" does not exist
    ("not running", RuncNotFound),  # container not running
    ("process already finished", RuncNotFound),  # os: process already finished
    ("no such process", RuncNotFound),  # ESRCH from kill(2)
    ("not paused", RuncFailedPrecondition),  # resume of a container that is not paused
    ("container paused", RuncFailedPrecondition),  # ErrPaused
    ("still running", RuncFailedPrecondition),  # ErrRunning
    ("not stopped", RuncFailedPrecondition),  # cannot delete container that is not stopped
    ("cannot start", RuncFailedPrecondition),  # cannot start an already running/stopped container
    ("stopped container", RuncFailedPrecondition),  # cannot exec in a stopped container
)


def classify(message: str, status: int) -> RuncError:
    """The error for a runc command that failed with ``message`` and exit ``status``: the one
    place where runc's words are read."""
    lowered = message.lower()
    for words, cls in _CLASSES:
        if words in lowered:
            return cls(message, status)
    return RuncUnknown(message, status)


class Runc:
    """One OCI runtime binary with its global flags (root, log, cgroup driver)."""

    def __init__(
        self,
        monitor: ExitWatcher,
        *,
        binary: str = "runc",
        root: str,
        log_path: str | None = None,
        systemd_cgroup: bool = False,
        criu: str = "",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.monitor = monitor
        #: runc --criu: the criu binary checkpoint and restore run ("": runc's default)
        self.criu = criu
        self.binary = binary
        self.root = root
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup
        self.timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        binary = self.binary
        if "/" not in binary:
            binary = _which(binary)
        argv = [binary, "--root", self.root]
        if self.log_path:
            argv += ["--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if self.criu:
            argv += ["--criu", self.criu]
        argv.extend(args)
        return argv

    async def run(
        self,
        *args: str,
        stdio: tuple[int | None, ...] | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run one runc command; raise a :class:`RuncError` (see :func:`classify`) with
        runc's words when it fails.

        With ``stdio`` the command gets those fds (create/exec pass them on to the container);
        otherwise its stdout and stderr are captured.
        """
        log_offset = _size(self.log_path)
        try:
            res = await run_command(self.monitor, self._argv(*args), stdio=stdio, timeout=timeout or self.timeout)
        except TimeoutError:
            raise errdefs.DeadlineExceeded(
                f"runc {args[0]} did not finish within {timeout or self.timeout:.0f}s"
            ) from None
        if res.status != 0:
            message = _last_error(self.log_path, log_offset) or res.stderr.decode(errors="replace").strip()
            message = message or f"exit status {res.status}"
            prefix = f"runc {args[0]} failed"
            raise classify(message if message.startswith(prefix) else f"{prefix}: {message}", res.status)
        return res

    # -- the commands the shim uses -------------------------------------------------------

    async def create(
        self,
        id: str,
        bundle: str,
        *,
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        stdio: tuple[int | None, ...] = (None, None, None),
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self.run(*args, id, stdio=stdio, timeout=SETUP_TIMEOUT)

    async def start(self, id: str) -> None:
        await self.run("start", id)

    async def checkpoint(self, id: str, args: Sequence[str]) -> None:
        """runc checkpoint with ``args`` (see shim.options.CheckpointOptions.runc_args)."""
        await self.run("checkpoint", *args, id, timeout=SETUP_TIMEOUT)

    async def restore(
        self,
        id: str,
        bundle: str,
        *,
        image: str,
        work: str,
        parent: str = "",
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        stdio: tuple[int | None, ...] = (None, None, None),
    ) -> None:
        """runc restore of the container ``id`` from the criu image in ``image``, detached, as
        containerd's runc shim runs it: the restored init is reparented to the caller (a
        subreaper), and its stdio are ``stdio`` (runc maps the checkpointed pipes onto them)."""
        args = ["restore", "--image-path", image, "--work-path", work]
        if parent:
            args += ["--parent-path", parent]
        args += ["--detach", "--pid-file", pid_file, "--no-subreaper"]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        await self.run(*args, "--bundle", bundle, id, stdio=stdio, timeout=SETUP_TIMEOUT)

    async def exec(
        self,
        id: str,
        process_file: str,
        *,
        pid_file: str,
        console_socket: str | None = None,
        stdio: tuple[int | None, ...] = (None, None, None),
    ) -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio, timeout=SETUP_TIMEOUT)

    async def kill(self, id: str, sig: int, *, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(sig)]
        await self.run(*args)

    async def pause(self, id: str) -> None:
        await self.run("pause", id)

    async def resume(self, id: str) -> None:
        await self.run("resume", id)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self.run("delete", *(["--force"] if force else []), id)

    async def ps(self, id: str) -> list[int]:
        res = await self.run("ps", "--format", "json", id)
        return [int(p) for p in json.loads(res.stdout or b"[]") or []]

    async def state(self, id: str) -> dict[str, object]:
        res = await self.run("state", id)
        state: dict[str, object] = json.loads(res.stdout)
        return state

    async def update(self, id: str, resources_file: str) -> None:
        await self.run("update", "--resources", resources_file, id)


def _which(name: str) -> str:
    for d in os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise errdefs.NotFound(f"runtime binary {name!r} not found in PATH")


def _size(path: str | None) -> int:
    if not path:
        return 0
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _last_error(path: str | None, offset: int) -> str:
    """The error-level messages runc logged after ``offset``, joined."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except OSError:
        return ""
    messages = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            messages.append(str(entry.get("msg", "")).strip())
    return "; ".join(m for m in messages if m)
