"""The serving shim's end of its keeper's socket (see ``keeper.py``): tell the keeper what to
hold for a successor; hear the exits it reaps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ketch.shim import keeper

log = logging.getLogger(__name__)


class KeeperLink:
    """The serving shim's end: tell the keeper what to hold; hear the exits it reaped."""

    def __init__(self, sock: socket.socket, on_exit: Callable[[int, int, float], None]) -> None:
        self._sock = sock
        self._on_exit = on_exit
        self.alive = True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hear the keeper on ``loop``. The socket stays blocking, for sends (small, rare, and
        the keeper always reads); reads never wait (MSG_DONTWAIT)."""
        loop.add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                message, fds = keeper.receive(self._sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                self._lost()
                return
            if message.get("op") == "exit":
                self._on_exit(int(message["pid"]), int(message["status"]), float(message["at"]))

    def _lost(self) -> None:
        if self.alive:
            self.alive = False
            log.warning("the group's keeper is gone: its containers stay this shim's children, "
                        "but they will not outlive this shim")
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        if not self.alive:
            return
        try:
            keeper.send(self._sock, message, fds)
        except OSError as e:
            log.warning("telling the keeper %s: %s", message.get("op"), e)
            self._lost()

    def put(self, key: str, data: dict[str, Any], fds: dict[str, int] | None = None) -> None:
        names = list(fds or {})
        self._send({"op": "put", "key": key, "data": data, "fds": names}, [fds[n] for n in names] if fds else None)

    def drop(self, key: str) -> None:
        self._send({"op": "drop", "key": key})

    def ack(self, pid: int) -> None:
        self._send({"op": "ack", "pid": pid})

    def bye(self) -> None:
        self._send({"op": "bye"})
