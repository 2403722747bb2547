"""The code passes ruff's checks for real mistakes and mypy's strict type checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]


def test_ruff() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed in this environment")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "src", "tests", "bench"], cwd=TOP,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed in this environment")
    r = subprocess.run([mypy], cwd=TOP, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
