"""ketchd under systemd, without libsystemd: the notify protocol (sd_notify(3): datagrams of
``KEY=value`` lines to ``$NOTIFY_SOCKET``) and socket activation (sd_listen_fds(3): listening
sockets inherited from fd 3 on, for the process ``$LISTEN_PID`` names).

:func:`take` reads what systemd handed this process and removes it from the environment, so
that nothing ketchd starts (shims, runc, CNI plugins) believes it was handed the same.

Serving an inherited socket: see :class:`Adoption`. The inherited socket is never unlinked,
rebound or shut down, so clients that connect while ketchd restarts wait in its backlog and are
served by the next ketchd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ketchd.systemd")

#: the first fd of the sockets systemd passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: what this module takes from the environment (and removes)
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(value: str | None) -> str | bytes | None:
    """Where ``NOTIFY_SOCKET`` says to send: a path, or an abstract socket's name (``@name``,
    sent as NUL + name). None when unset, empty, or a form ketchd does not speak (``vsock:``)."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(usec: str | None, for_pid: str | None, pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, when it is set (a
    positive integer) and ``WATCHDOG_PID`` names this process or is unset."""
    try:
        timeout = int(usec or "")
    except ValueError:
        return None
    if timeout <= 0:
        return None
    if for_pid:
        try:
            if int(for_pid) != pid:
                return None
        except ValueError:
            return None
    return timeout / 2 / 1_000_000


def listen_fds(listen_pid: str | None, count: str | None, names: str | None, pid: int) -> list[tuple[int, str]]:
    """The sockets systemd passed to this process, as (fd, name): ``LISTEN_FDS`` of them from fd
    3 on, when ``LISTEN_PID`` is this process. Names come from ``LISTEN_FDNAMES`` (colon-separated);
    "unknown" for each when it is unset or does not count as many."""
    try:
        if int(listen_pid or "") != pid:
            return []
        n = int(count or "")
    except ValueError:
        return []
    if n < 1:
        return []
    labels = names.split(":") if names else []
    if len(labels) != n:
        labels = ["unknown"] * n
    return [(LISTEN_FDS_START + i, labels[i]) for i in range(n)]


@dataclass
class Systemd:
    """What systemd handed ketchd: where to notify, how often to ping the watchdog, and the
    inherited sockets. Every method is a no-op when systemd handed nothing."""

    address: str | bytes | None = None
    watchdog: float | None = None
    sockets: list[tuple[int, str]] = field(default_factory=list)
    _sock: socket.socket | None = None

    def notify(self, *fields: str) -> None:
        """Send ``KEY=value`` fields (``READY=1``, ``STATUS=...``) in one datagram. A failure is
        logged, never raised: ketchd serves whether or not its manager listens."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warning("cannot notify systemd (%s): %s", fields[0] if fields else "", e)

    async def ping_watchdog(self) -> None:
        """``WATCHDOG=1`` every interval, from the event loop: a loop that stops turning stops
        the pings, and systemd restarts ketchd (containers keep running)."""
        if self.watchdog is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)

    def grpc_listener(self) -> socket.socket | None:
        """The inherited socket to serve gRPC on: the first listening unix stream socket (its
        name is not consulted: ketchd is handed one). Others are logged and left alone."""
        chosen: socket.socket | None = None
        for fd, name in self.sockets:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                log.warning("inherited fd %d (%s) is not a socket: %s", fd, name, e)
                continue
            usable = (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                      and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            if chosen is None and usable:
                sock.set_inheritable(False)
                chosen = sock
            else:
                log.warning("ignoring inherited fd %d (%s): %s", fd, name,
                            "a second socket" if usable else "not a listening unix stream socket")
                sock.detach()
        return chosen

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def take(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> Systemd:
    """What systemd handed this process, read from ``environ`` (the process's environment),
    which loses those variables."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    given: Mapping[str, str] = {k: env.pop(k) for k in ENVIRONMENT if k in env}
    return Systemd(address=notify_address(given.get("NOTIFY_SOCKET")),
                   watchdog=watchdog_interval(given.get("WATCHDOG_USEC"), given.get("WATCHDOG_PID"), pid),
                   sockets=listen_fds(given.get("LISTEN_PID"), given.get("LISTEN_FDS"), given.get("LISTEN_FDNAMES"),
                                      pid))


def socket_path(sock: socket.socket) -> str:
    """The path an inherited unix socket is bound to ("" for an abstract or unnamed one)."""
    name = sock.getsockname()
    return name if isinstance(name, str) and name.startswith("/") else ""


class _Pointer:
    """A pointer-valued channel argument: grpcio passes ``int(obj)`` to the core as the address."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        return self.address


#: the C++ types grpc's core hands back for an external listener: its dynamic type and the base
#: whose virtual ``Handle(int listener_fd, int fd, grpc_byte_buffer* pending)`` is called
_HANDLER_TYPE = b"ExternalConnectionHandlerE"
_HANDLER_BASE = b"N9grpc_core18TcpServerFdHandlerE"


class Adoption:
    """Has a grpc server serve the connections of an inherited listening socket.

    grpcio's Python API binds only addresses it makes (``unix:PATH`` is unlinked and bound
    afresh) and cannot take a listening fd. Its core can take *accepted* connections: a server
    port ``external:NAME`` with a pointer channel argument of the same name makes the core
    store there a ``grpc_core::TcpServerFdHandler*`` (what C++'s ExternalConnectionAcceptor
    uses), whose ``Handle(listener_fd, fd, nullptr)`` serves ``fd`` as if the server had
    accepted it. ketchd accepts on the inherited socket and hands each connection over: gRPC
    then runs on the client's own connection, in grpc's threads, with nothing between.

    The handler is a C++ object reached through ctypes; before its first call, its run-time
    type (the C++ ABI's type_info, which the vtable points to) must be grpc's
    ExternalConnectionHandler derived from TcpServerFdHandler, or ketchd refuses to start rather
    than call into something else (see :meth:`start`). ``Handle`` is that base's first virtual
    method after the two destructor entries.
    """

    NAME = "external:ketchd-inherited"

    def __init__(self, listener: socket.socket) -> None:
        import ctypes

        self.listener = listener
        self._slot = ctypes.c_void_p(0)  # where the core stores the handler
        self._handle: Any = None
        self._accepting: asyncio.Task[None] | None = None

    def channel_option(self) -> tuple[str, Any]:
        """For ``grpc.aio.server(options=...)``."""
        import ctypes

        return (self.NAME, _Pointer(ctypes.addressof(self._slot)))

    #: for ``server.add_insecure_port`` (it answers -1: no port)
    address = NAME

    def start(self) -> None:
        """Once the server has started: check the handler and accept on the inherited socket."""
        import ctypes

        word = ctypes.sizeof(ctypes.c_void_p)

        def at(address: int) -> int:
            """The (non-null) pointer stored at ``address``."""
            value = ctypes.c_void_p.from_address(address).value if address > 0 else None
            if not value:
                raise OSError("grpcio made no handler for external connections: it cannot serve an inherited socket")
            return value

        handler = at(ctypes.addressof(self._slot))
        vtable = at(handler)
        type_info = at(vtable - word)
        name = ctypes.string_at(at(type_info + word))
        base = b""
        if name.endswith(_HANDLER_TYPE):  # a single-inheritance type_info: name, then its base's
            base = ctypes.string_at(at(at(type_info + 2 * word) + word))
        if base != _HANDLER_BASE:
            raise OSError(f"grpcio's external connection handler is a {name!r} (base {base!r}), not the "
                          f"{_HANDLER_TYPE!r} of {_HANDLER_BASE!r} ketchd knows how to call")
        function = at(vtable + 2 * word)
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
        self._handle = (prototype(function), handler)
        self.listener.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        call, handler = self._handle
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as e:  # a client that gave up before we accepted; out of fds
                log.warning("accept on the inherited socket: %s", e)
                await asyncio.sleep(0.1)
                continue
            call(handler, self.listener.fileno(), conn.detach(), None)  # grpc owns the fd now

    async def stop(self) -> None:
        """Accept no more (before the server stops: the handler goes with it). The inherited
        socket stays bound and listening: whoever connects now waits for the next ketchd."""
        if self._accepting is not None:
            self._accepting.cancel()
            try:
                await self._accepting
            except asyncio.CancelledError:
                pass
            self._accepting = None
        self.listener.close()


#: where ``ketchd install-units`` writes by default
UNIT_DIR = "/etc/systemd/system"
UNITS = ("ketchd.service", "ketchd.socket")


def ketchd_binary() -> str:
    """The absolute path of the ketchd being run: the command itself when it is one, else the
    ``ketchd`` beside this Python (a virtualenv's ``bin``)."""
    import sys

    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "ketchd" and os.access(argv0, os.X_OK):
        return os.path.abspath(argv0)
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "ketchd")


def _exec_quote(path: str) -> str:
    if not any(c.isspace() or c in "\"'\\;$%" for c in path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'


def install_units(directory: str = UNIT_DIR, ketchd: str = "") -> list[str]:
    """Write ketchd.service (ExecStart: ``ketchd``, by default :func:`ketchd_binary`) and
    ketchd.socket into ``directory``; the paths written."""
    from importlib import resources

    ketchd = ketchd or ketchd_binary()
    os.makedirs(directory, exist_ok=True)
    written = []
    for unit in UNITS:
        text = (resources.files("ketch") / "data" / "systemd" / unit).read_text()
        path = os.path.join(directory, unit)
        with open(path, "w") as f:
            f.write(text.replace("@KETCHD@", _exec_quote(ketchd)))
        written.append(path)
    return written
