"""The shim's reaper and exit ordering, with real child processes (no root needed)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from ketch.oci.runc import spawn
from ketch.shim.process import Process, State
from ketch.shim.reaper import Monitor, exit_status
from ketch.shim.service import Container, TaskService
from ketch.shim.stdio import Stdio


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


class _RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[object] = []

    def publish(self, event: object) -> None:
        self.events.append(event)


class _NoRunc:
    """The container runtime is not what this test is about: init's exit asks runc to kill
    what is left, and the shim kills its execs itself."""

    async def kill(self, id: str, sig: int, *, all: bool = False) -> None:
        return None


def test_exec_exits_are_published_before_the_init_exit(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> list[tuple[str, str, int]]:
        pub = _RecordingPublisher()
        svc = TaskService(namespace="t", monitor=monitor, publisher=pub, runc_root=str(tmp_path))  # type: ignore[arg-type]
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=child("raise SystemExit(0)"))
        execs = [Process("c1", f"e{i}", Stdio(), state=State.RUNNING,
                         pid=child("import time; time.sleep(60)")) for i in range(3)]
        container = Container("c1", str(tmp_path), _NoRunc(), init)  # type: ignore[arg-type]
        container.execs = {p.exec_id: p for p in execs}
        for p in [init, *execs]:
            svc._spawn(svc._on_exit(container, p, monitor.watch(p.pid)))
        await asyncio.wait_for(init.exited.wait(), 20)
        return [(type(e).__name__, e.id, e.exit_status) for e in pub.events]  # type: ignore[attr-defined]

    published = run(scenario)
    assert [name for name, _, _ in published] == ["TaskExit"] * 4
    assert [id for _, id, _ in published][-1] == "c1"
    assert sorted(id for _, id, _ in published[:3]) == ["e0", "e1", "e2"]
    assert all(status == 128 + signal.SIGKILL for _, id, status in published if id != "c1")
