"""The shim's one reaper: every child's exit status goes through here, exactly once.

The shim is a child subreaper, so it collects three kinds of exits: the runc commands it runs,
the container processes that runc leaves behind (reparented to us when runc exits), and any
orphan a container process double-forked away. One SIGCHLD handler loops ``waitpid(-1)`` and
routes each status; nothing else in the shim may wait for a child (no asyncio child watcher,
no Popen.wait), or statuses are stolen.

Routing rules:

* ``watch(pid)`` registers interest in a pid whose number we already know (a runc we just
  spawned: spawning and registering happen in one synchronous step, so the handler cannot run
  in between) and returns a future for its exit status.
* A container process's pid is only known after runc wrote its pid file, and it may already
  have exited by then. So callers open a ``hold()`` *before* running runc: while any hold is
  open, exits of unregistered pids are kept, and ``watch`` of such a pid answers at once.
  When the last hold closes, the kept exits are dropped — they belonged to orphans.
* Exits of pids nobody watches and no hold covers are orphans: reaped and logged.

Statuses are shell-style: the exit code, or 128 + the signal number for a death by signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


def exit_status(wait_status: int) -> int:
    """Shell-style status from a raw waitpid status: code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Monitor:
    """Routes child exits to the futures registered for them (one instance per shim)."""

    def __init__(self, waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid) -> None:
        self._waitpid = waitpid
        self._watchers: dict[int, asyncio.Future[int]] = {}
        self._holds = 0
        self._kept: dict[int, int] = {}
        #: when an exit was reaped, for exits reported from elsewhere (the keeper)
        self._times: dict[int, float] = {}
        #: called with (pid, status) for each orphan's exit (logging, tests)
        self.on_orphan: Callable[[int, int], None] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle SIGCHLD on ``loop`` and collect anything that exited before."""
        import signal

        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def reap(self) -> None:
        """Collect every exited child now; safe to call at any time."""
        exits: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = self._waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            exits.append((pid, exit_status(status)))
        for pid, status in exits:
            self.notify(pid, status)

    def notify(self, pid: int, status: int, at: float | None = None) -> None:
        """Route one exit (the reaper calls this; the keeper's reports too, with the time the
        keeper reaped it, ``at``; tests may)."""
        if at is not None:
            self._times[pid] = at
        fut = self._watchers.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(status)
            return
        if self._holds:
            self._kept[pid] = status
            return
        log.debug("reaped orphan pid=%d status=%d", pid, status)
        if self.on_orphan is not None:
            self.on_orphan(pid, status)

    def exit_time(self, pid: int) -> float | None:
        """When ``pid`` was reaped, if it was reaped elsewhere (else None: just now)."""
        return self._times.pop(pid, None)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s exit status; resolved at once if it was kept by a hold."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if pid in self._kept:
            fut.set_result(self._kept.pop(pid))
        else:
            self._watchers[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop routing ``pid`` (its future is cancelled)."""
        fut = self._watchers.pop(pid, None)
        if fut is not None:
            fut.cancel()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep exits of not-yet-known pids while the body runs (see the module doc)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._kept:
                log.debug("dropping %d kept exits of orphans", len(self._kept))
                self._kept.clear()
