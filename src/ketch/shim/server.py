"""The long-lived shim server: a subreaper serving containerd.task.v2.Task on fd 3.

``start`` (main.py) binds the socket and hands it over as fd 3. The process then splits into
the group's keeper and the serving shim (``keeper.py``); the serving shim logs to the bundle's
``log`` FIFO (which the daemon reads) and exits once Shutdown finds no task left, and the keeper
with it. When the serving shim dies instead, the keeper starts another that takes over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable

from ketch import logfields, ttrpc
from ketch.shim.common import LISTEN_FD, runc_root
from ketch.shim.core import Core
from ketch.shim.keeper import Takeover
from ketch.shim.keeperlink import KeeperLink
from ketch.shim.lifetime import Lifetime
from ketch.shim.publisher import Publisher
from ketch.shim.reaper import Monitor
from ketch.shim.service import TaskService

log = logging.getLogger("ketch.shim")

#: how this process began, when not by exec: set by a shim template that forked it (template.py)
ORIGIN = ""


class _FifoHandler(logging.Handler):
    """Writes log lines to a bundle's ``log`` FIFO without ever blocking the shim: a full FIFO
    (nobody reading, e.g. while the daemon restarts) drops the line. A shared shim outlives the
    bundle it started in: when that FIFO loses its reader for good (EPIPE), the handler moves
    to the ``log`` of another bundle the shim still serves (``bundles()``)."""

    def __init__(self, bundle: str, bundles: Callable[[], list[str]]) -> None:
        super().__init__()
        self.fd = -1
        self.bundle = ""
        self._bundles = bundles
        self._open(bundle)

    def _open(self, bundle: str) -> bool:
        try:
            fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        if self.fd > 2:
            os.close(self.fd)
        self.fd, self.bundle = fd, bundle
        return True

    def emit(self, record: logging.LogRecord) -> None:
        line = (self.format(record) + "\n").encode(errors="replace")
        for _ in range(2):
            try:
                os.write(self.fd, line)
                return
            except BrokenPipeError:
                if not any(self._open(b) for b in self._bundles() if b != self.bundle):
                    return
            except OSError:
                return


def _setup_logging(bundle: str, debug: bool, flags: dict[str, str], bundles: Callable[[], list[str]]) -> None:
    handler = _FifoHandler(bundle, bundles)
    if handler.fd < 0:
        handler.fd = 2
    handler.setFormatter(logfields.TextFormatter(static={"namespace": flags.get("namespace", "")}))
    handler.addFilter(logfields.FieldsFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


async def _serve(flags: dict[str, str], keeper_sock: socket.socket, takeover: Takeover | None) -> None:
    loop = asyncio.get_running_loop()
    monitor = Monitor()
    monitor.install(loop)
    namespace = flags["namespace"]
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), namespace)
    done = loop.create_future()

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    linger = float(os.environ.get("KETCH_SHIM_LINGER", "0") or 0)
    core = Core(namespace=namespace, monitor=monitor, publisher=publisher,
                runc_root=runc_root(flags.get("address", ""), namespace), lifetime=Lifetime(linger, on_exit))
    _setup_logging(os.getcwd(), flags.get("debug") == "true", flags,
                   lambda: [c.bundle for c in core.containers.values()])
    link = KeeperLink(keeper_sock, core.keeper_exit)
    link.start(loop)
    core.keeper = link
    if takeover is not None:
        log.info("taking over the group (shim %d of this group)", takeover.generation + 1)
        core.restore({k: (r.data, r.fds) for k, r in takeover.records.items()}, takeover.exits)
        if core.lifetime is not None and not core.containers:
            core.lifetime.idle()
    server = ttrpc.Server()
    TaskService(core).register(server)
    sock = socket.socket(fileno=LISTEN_FD)
    path = sock.getsockname()
    # remember which file is ours: a successor shim of the same group may bind the same path
    inode = os.stat(path).st_ino if isinstance(path, str) and path else None
    serving = asyncio.ensure_future(server.serve(sock))
    log.info("shim serving on %s%s", path, f" ({ORIGIN})" if ORIGIN else "")
    try:
        await asyncio.wait([serving, done], return_when=asyncio.FIRST_COMPLETED)
        if done.done() and not core.containers:
            link.bye()  # over on purpose: the keeper goes too
    finally:
        _unlink_if_ours(path, inode)  # first, so that no new client finds a dying shim
        await publisher.flush()
        await server.shutdown(grace=0.5)  # lets the Shutdown call's answer go out
        serving.cancel()
        await publisher.close()
    log.info("shim exiting")


def _unlink_if_ours(path: object, inode: int | None) -> None:
    if not isinstance(path, str) or not path or inode is None:
        return
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("removing %s: %s", path, e)


def run(flags: dict[str, str], keeper_sock: socket.socket, takeover: Takeover | None) -> int:
    """Serve, as the serving half of a split (``main.serve`` split the process first)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    asyncio.run(_serve(flags, keeper_sock, takeover))
    return 0
