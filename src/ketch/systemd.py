"""ketchd under systemd, without libsystemd: the notify protocol (sd_notify(3): datagrams of
``KEY=value`` lines to ``$NOTIFY_SOCKET``) and socket activation (sd_listen_fds(3): listening
sockets inherited from fd 3 on, for the process ``$LISTEN_PID`` names).

:func:`take` reads what systemd handed this process and removes it from the environment, so
that nothing ketchd starts (shims, runc, CNI plugins) believes it was handed the same.

Serving an inherited socket: grpcio binds only the addresses it is given (``unix:PATH`` is
unlinked and bound afresh), and its Python API cannot adopt a listening fd nor an accepted
connection (its core can, when built with libsystemd or through C++-only APIs; the wheel is
neither). So ketchd's gRPC server listens on a private socket in a 0700 directory and a
:class:`Relay` accepts on the inherited socket and splices each connection to it, byte for byte,
in the kernel (splice(2) through a pipe), in threads of its own: the event loop does no work per
byte, and the inherited socket is never unlinked, rebound or shut down, so clients that connect
while ketchd restarts wait in its backlog and are served by the next ketchd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

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


class Relay:
    """Serves ``listener`` (an inherited listening socket) by connecting each client it accepts
    to ``upstream`` (the gRPC server's private socket) and splicing bytes both ways. A thread
    accepts; two threads per connection splice. When either direction ends, the connection
    ends both ways (gRPC's HTTP/2 does not half-close)."""

    CHUNK = 1 << 16

    def __init__(self, listener: socket.socket, upstream: str) -> None:
        self.listener = listener
        self.upstream = upstream
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="ketchd-relay", daemon=True)

    def start(self) -> None:
        self.listener.setblocking(False)  # poll says readable; another accepter may be faster
        self._thread.start()

    def stop_accepting(self) -> None:
        """Accept no more: the inherited socket stays bound and listening, and its backlog keeps
        whoever connects now for the next ketchd."""
        with self._lock:
            self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        """Stop accepting and end every relayed connection (the gRPC server has stopped: they
        are ending anyway)."""
        self.stop_accepting()
        with self._lock:
            live = list(self._live)
        for sock in live:
            _shutdown(sock)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.listener.close()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                log.warning("relay: accept on the inherited socket failed: %s", e)
                continue
            client.setblocking(True)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                server.connect(self.upstream)
            except OSError as e:
                log.warning("relay: cannot reach the gRPC server at %s: %s", self.upstream, e)
                client.close()
                server.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._live.update((client, server))
            done = threading.Event()
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, done), name="ketchd-relay-conn",
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            while True:
                n = os.splice(src.fileno(), w, self.CHUNK)
                if n == 0:
                    break
                while n > 0:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass  # the peer went away, or close() ended the connection
        finally:
            os.close(r)
            os.close(w)
            _shutdown(src)
            _shutdown(dst)
            with self._lock:  # the last direction out closes
                last = done.is_set()
                done.set()
                if last:
                    self._live.difference_update((src, dst))
            if last:
                src.close()
                dst.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
