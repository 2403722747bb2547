"""When the shim process goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ketch import errdefs


class Lifetime:
    """When a shim with no task left goes away. A shim serving one task exits as soon as
    Shutdown finds it empty; a shared (grouped) shim lingers a while for the group's next task,
    which then needs no new process. Once it decides to go it refuses new tasks
    (Unavailable), so the caller starts a fresh shim."""

    def __init__(self, linger: float, on_exit: Callable[[], None]) -> None:
        self.linger = linger
        self.closing = False
        self._on_exit = on_exit
        self._timer: asyncio.TimerHandle | None = None

    def busy(self) -> None:
        if self.closing:
            raise errdefs.Unavailable("the shim is shutting down; start another")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def idle(self, now: bool = False) -> None:
        if now or self.linger <= 0:
            self._exit()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._exit)

    def _exit(self) -> None:
        self.closing = True
        self._on_exit()
