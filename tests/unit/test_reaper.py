"""The shim's reaper, with real child processes (no root needed)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from ketch.oci.runc import spawn
from ketch.shim.reaper import Monitor, exit_status


def child(code: str) -> int:
    return spawn([sys.executable, "-c", code])


def run(coro_fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        monitor = Monitor()
        monitor.install(asyncio.get_running_loop())
        try:
            return await coro_fn(monitor)
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)

    return asyncio.run(main())


def test_exit_status_is_shell_style() -> None:
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 128 + signal.SIGKILL


def test_watched_child_exit_is_routed() -> None:
    async def scenario(monitor: Monitor) -> tuple[int, int]:
        a = monitor.watch(child("raise SystemExit(3)"))
        pid = child("import time; time.sleep(30)")
        b = monitor.watch(pid)
        os.kill(pid, signal.SIGKILL)
        return await asyncio.wait_for(a, 10), await asyncio.wait_for(b, 10)

    assert run(scenario) == (3, 128 + signal.SIGKILL)


def test_exit_before_watch_is_kept_while_held() -> None:
    """A process that exits before its pid is known (runc still writing the pid file)."""

    async def scenario(monitor: Monitor) -> int:
        with monitor.hold():
            pid = child("raise SystemExit(5)")
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # it has exited, not yet reaped
            monitor.reap()  # the SIGCHLD handler ran before anyone watched the pid
            return await asyncio.wait_for(monitor.watch(pid), 10)

    assert run(scenario) == 5


def test_orphan_exits_are_reaped_and_not_kept() -> None:
    async def scenario(monitor: Monitor) -> tuple[list[tuple[int, int]], bool]:
        orphans: list[tuple[int, int]] = []
        monitor.on_orphan = lambda pid, status: orphans.append((pid, status))
        pid = child("raise SystemExit(9)")
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        monitor.reap()
        late = monitor.watch(pid)
        await asyncio.sleep(0.05)
        done = late.done()
        monitor.forget(pid)
        return orphans, done

    orphans, done = run(scenario)
    assert orphans and orphans[0][1] == 9
    assert not done


def test_kept_exits_are_dropped_when_the_last_hold_ends() -> None:
    async def scenario(monitor: Monitor) -> bool:
        with monitor.hold():
            with monitor.hold():
                pid = child("pass")
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                monitor.reap()
            # still held by the outer hold: kept
            assert pid in monitor._kept
        return pid in monitor._kept

    assert run(scenario) is False
