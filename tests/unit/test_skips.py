"""tests/conftest.py: as root a skipped test fails, unless KETCH_ALLOW_SKIPS=1 (developer machines)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]

TESTS = """
import pytest

def test_skips_itself():
    pytest.skip("needs a thing")

@pytest.mark.skipif(True, reason="needs another thing")
def test_skipped_by_a_marker():
    pass

@pytest.mark.xfail(reason="known")
def test_an_expected_failure():
    assert False

def test_runs():
    pass
"""


def _pytest(tmp_path: Path, tests: str = TESTS, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_some.py").write_text(tests)
    environ = {k: v for k, v in os.environ.items() if k != "KETCH_ALLOW_SKIPS"} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rfEs", "-p",
                           "no:cacheprovider", str(tmp_path)], cwd=TOP, env=environ, capture_output=True, text=True)


def test_as_root_a_skip_fails_and_says_why(tmp_path: Path) -> None:
    r = _pytest(tmp_path)
    if os.geteuid() != 0:  # elsewhere skips stay skips
        assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout
        return
    assert r.returncode == 1, r.stdout
    # a skip in the test fails it; a skip marker fails its setup (an error)
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in r.stdout, r.stdout
    assert "skipped as root (Skipped: needs a thing)" in r.stdout, r.stdout
    assert "skipped as root (Skipped: needs another thing)" in r.stdout, r.stdout


def test_as_root_a_module_that_skips_itself_is_an_error(tmp_path: Path) -> None:
    r = _pytest(tmp_path, 'import pytest\npytest.skip("no module", allow_module_level=True)\n')
    if os.geteuid() != 0:
        assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout
        return
    assert r.returncode == 2 and "skipped as root (Skipped: no module)" in r.stdout, r.stdout


def test_allowed_skips_stay_skips(tmp_path: Path) -> None:
    r = _pytest(tmp_path, KETCH_ALLOW_SKIPS="1")
    assert r.returncode == 0, r.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in r.stdout, r.stdout
