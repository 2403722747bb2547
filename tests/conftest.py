"""Suite-wide: as root (CI's case: Debian 12, everything installed by scripts/setup) a skipped
test is a failure — a skip there hides a test that never ran. ``KETCH_ALLOW_SKIPS=1`` lets a
developer's machine that lacks something (docker.io, the registry...) skip as root anyway."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

ALLOW_SKIPS = "KETCH_ALLOW_SKIPS"


def _skips_fail() -> bool:
    return os.geteuid() == 0 and os.environ.get(ALLOW_SKIPS, "") not in ("1", "true", "yes")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and _skips_fail():
        report.outcome = "failed"
        report.longrepr = (f"skipped as root ({_reason(report)}): as root every test must run; install what it "
                           f"needs (scripts/setup), or set {ALLOW_SKIPS}=1 on a machine that is not CI")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    _fail_skip(outcome.get_result())
