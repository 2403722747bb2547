"""ketch.slowloop: asyncio's slow-callback reports say where the slow task waits and how long
the program itself held the loop (on a CPU, or blocked), apart from waiting for a CPU."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from ketch import slowloop


async def inner() -> None:
    time.sleep(0.3)  # blocks the loop, as a synchronous fsync or lock wait would
    await asyncio.sleep(0.01)


async def servicer() -> None:
    await inner()


def test_a_blocking_callback_is_reported_with_where_it_waits_and_how_long_it_held_the_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        undo = slowloop.install(asyncio.get_running_loop(), 0.1)
        try:
            await asyncio.ensure_future(servicer())
            await asyncio.sleep(0.01)  # a quick callback is not reported
        finally:
            undo()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        asyncio.run(main())
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing ")]
    assert len(reports) == 1, reports
    (report,) = reports
    assert "test_slowloop.py" in report and "(servicer) <- " in report and "(inner)" in report
    held = slowloop.HELD.search(report)
    assert held is not None and float(held.group(1)) >= 0.25, report
    assert asyncio.Handle._run.__name__ == "_run"  # undone


def test_the_interop_fixture_counts_what_ketchd_held_not_what_the_machine_did(tmp_path: Path) -> None:
    from ketch.testing.daemons import Ketchd

    daemon = Ketchd(tmp_path)
    prefix = "time=2026-01-01T00:00:00.000Z level=warning logger=asyncio msg=\"Executing <Task pending coro=<serve() running at"
    lines = {
        "held": f"{prefix} /x/src/ketch/daemon.py:1> took 0.300 seconds (held the loop 0.290s: 0.000s on a CPU, "
                "0.290s blocked; 0.010s waiting for a CPU; now awaiting at /x/src/ketch/daemon.py:1 (serve))\"",
        "machine": f"{prefix} /x/src/ketch/daemon.py:1> took 0.300 seconds (held the loop 0.010s: 0.010s on a CPU, "
                   "0.000s blocked; 0.290s waiting for a CPU)\"",
        "unmeasured": f"{prefix} /x/src/ketch/daemon.py:1> took 0.300 seconds\"",
        "not ketch": f"{prefix} grpc/_server.pyx:1> took 0.300 seconds (held the loop 0.290s: 0.290s on a CPU, "
                     "0.000s blocked; 0.000s waiting for a CPU)\"",
    }
    daemon.log.write_text("\n".join(["time=... level=INFO logger=ketchd msg=serving", *lines.values()]) + "\n")
    assert daemon.slow_callbacks() == [lines["held"], lines["unmeasured"]]
