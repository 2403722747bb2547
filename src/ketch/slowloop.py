"""Finding what holds ketchd's event loop: asyncio's debug mode, with better reports.

In debug mode asyncio logs every callback that runs longer than the loop's
``slow_callback_duration`` ("Executing <Task ...> took 0.150 seconds"). :func:`install` adds
two facts to each report:

- **where** the slow task now waits, down its whole chain of awaits: asyncio names only the
  outermost coroutine, which for a gRPC call is grpc's own, not the servicer that blocked;
- **who** held the loop, from the loop thread's scheduler statistics
  (``/proc/thread-self/schedstat``): the time it ran on a CPU and the time it was blocked
  (a sleep, a disk wait, a lock) are the program's doing; the time it waited for a CPU is the
  machine's (a loaded host). The report says ``held the loop N.NNNs`` for the first two.

Both rely on CPython details (the loop's ``_current_handle`` while it reports; a coroutine
awaited through a C-level ``__await__`` wrapper being its referent; ``Handle._run``): where one
is missing, the report stays as asyncio wrote it. Debugging only: it costs a few
microseconds per callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import threading
from collections.abc import Callable

__all__ = ["HELD", "install"]

#: how a report says how long the program itself held the loop
HELD = re.compile(r"held the loop (\d+\.\d+)s")


class _SchedStat:
    """The loop thread's time on a CPU and waiting for one (ns), and what the last callback
    spent of each."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        self.last: tuple[int, int] | None = None

    def close(self) -> None:
        os.close(self._fd)

    def read(self) -> tuple[int, int]:
        on_cpu, waiting = os.pread(self._fd, 128, 0).split()[:2]
        return int(on_cpu), int(waiting)


def install(loop: asyncio.AbstractEventLoop, threshold: float) -> Callable[[], None]:
    """Debug mode on ``loop`` (the running one), reporting callbacks longer than ``threshold``
    seconds with where they wait and who held the loop; returns what undoes it."""
    loop.set_debug(True)
    loop.slow_callback_duration = threshold
    stat: _SchedStat | None = None
    with contextlib.suppress(OSError, ValueError):
        stat = _SchedStat()
        stat.read()
    run = asyncio.Handle._run
    if stat is not None:
        _measure_callbacks(stat, run)
    asyncio_log = logging.getLogger("asyncio")
    report = _Report(loop, stat)
    asyncio_log.addFilter(report)
    level = asyncio_log.level
    asyncio_log.setLevel(max(asyncio_log.getEffectiveLevel(), logging.INFO))  # not every pipe it opens

    def undo() -> None:
        loop.set_debug(False)
        setattr(asyncio.Handle, "_run", run)  # noqa: B010
        asyncio_log.removeFilter(report)
        asyncio_log.setLevel(level)
        if stat is not None:
            stat.close()

    return undo


def _measure_callbacks(stat: _SchedStat, run: Callable[[asyncio.Handle], None]) -> None:
    """Wrap every callback of this thread's loop in two reads of its scheduler statistics."""
    loop_thread = threading.get_ident()  # loops of other threads run as before

    def measured(handle: asyncio.Handle) -> None:
        if threading.get_ident() != loop_thread:
            run(handle)
            return
        before = stat.read()
        try:
            run(handle)
        finally:
            with contextlib.suppress(OSError):  # closed by the callback (undo)
                after = stat.read()
                stat.last = (after[0] - before[0], after[1] - before[1])

    setattr(asyncio.Handle, "_run", measured)  # noqa: B010  (a private method: no static check)


class _Report(logging.Filter):
    def __init__(self, loop: asyncio.AbstractEventLoop, stat: _SchedStat | None) -> None:
        super().__init__()
        self._loop = loop
        self._stat = stat

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("Executing ")):
            return True
        with contextlib.suppress(Exception):
            args = tuple(record.args) if isinstance(record.args, tuple) else ()
            extra = []
            if self._stat is not None and self._stat.last is not None and len(args) == 2:
                on_cpu, waiting = (ns / 1e9 for ns in self._stat.last)
                wall = args[1] if isinstance(args[1], float) else 0.0
                blocked = max(0.0, wall - on_cpu - waiting)
                extra.append(f"held the loop {on_cpu + blocked:.3f}s: {on_cpu:.3f}s on a CPU, {blocked:.3f}s "
                             f"blocked; {waiting:.3f}s waiting for a CPU")
            handle = getattr(self._loop, "_current_handle", None)
            task = getattr(getattr(handle, "_callback", None), "__self__", None)
            if isinstance(task, asyncio.Task):
                where = " <- ".join(_await_chain(task.get_coro()))
                if where:
                    extra.append(f"now awaiting at {where}")
            if extra:
                record.msg += " (%s)"
                record.args = (*args, "; ".join(extra))
        return True


def _await_chain(coro: object) -> list[str]:
    """file:line (function) of every Python coroutine in ``coro``'s chain of awaits."""
    sites = []
    for _ in range(64):
        if coro is None:
            break
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and frame.f_lineno is not None:
            sites.append(f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is None and type(coro).__name__ == "coroutine_wrapper":
            nxt = next((r for r in gc.get_referents(coro) if hasattr(r, "cr_frame")), None)
        coro = nxt
    return sites
