"""Pod network namespaces that outlive any process: ``/run/netns/cni-<uuid>``, made and
removed with iproute2 (``ip netns add|delete``), where containerd's CRI keeps its own
(``/var/run/netns/cni-<uuid>``). A pod's netns is bind-mounted there until the pod is removed,
so that its network survives the pause container and a ketchd restart."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import threading
import uuid

from ketch import errdefs

log = logging.getLogger("ketch.cri")

__all__ = ["NETNS_DIR", "connect", "create", "remove"]

NETNS_DIR = "/run/netns"


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("ip", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def create() -> str:
    """A new network namespace; its path."""
    name = f"cni-{uuid.uuid4()}"
    code, out = await _ip("netns", "add", name)
    if code != 0:
        raise errdefs.Unavailable(f"cannot create network namespace {name}: {out}")
    path = os.path.join(NETNS_DIR, name)
    log.info("network namespace %s created", path)
    return path


async def remove(path: str) -> None:
    """Remove the namespace at ``path``; nothing when it is gone already."""
    if not path:
        return
    if os.path.dirname(path) != NETNS_DIR or not os.path.basename(path).startswith("cni-"):
        raise errdefs.InvalidArgument(f"{path} is not a pod network namespace")
    if not os.path.exists(path):
        return
    code, out = await _ip("netns", "delete", os.path.basename(path))
    if code != 0 and os.path.exists(path):
        raise errdefs.Unavailable(f"cannot remove network namespace {path}: {out}")


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _connect_in(path: str, port: int, timeout: float) -> socket.socket:
    """In the calling thread (a thread of its own: it is left in ``path``'s namespace if going
    back fails), connect to 127.0.0.1:``port`` inside the network namespace at ``path``."""
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
    finally:
        os.close(target)
    # a socket belongs to the namespace it was made in, whichever the thread is in later
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


async def connect(path: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` in the network namespace at ``path`` (the
    host's when ``path`` is empty), made without nsenter: a short-lived thread enters the
    namespace, connects, and ends, so no thread of ketchd stays in the pod's namespace."""
    if not path:
        return await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), timeout)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def settle(sock: socket.socket | None, error: BaseException | None) -> None:
        if done.cancelled():
            if sock is not None:
                sock.close()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(sock)  # type: ignore[arg-type]

    def run() -> None:
        try:
            sock = _connect_in(path, port, timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, sock, None)

    threading.Thread(target=run, name=f"netns-connect-{port}", daemon=True).start()
    sock = await done
    sock.settimeout(None)
    sock.setblocking(False)
    return sock
