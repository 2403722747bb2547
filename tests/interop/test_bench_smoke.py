"""bench.run in --quick mode: every workload measured for every setup, nothing left behind.

A smoke test only: benchmarks are not tests, so no number is judged beyond being positive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import SETUP_NAMES, WORKLOADS

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_reports_every_workload(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--quick", "--results", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner cleans up on SIGTERM
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"bench --quick did not finish in 300 s: {err[-3000:]}")
    assert proc.returncode == 0, err[-5000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert doc["mode"] == "quick" and doc["left_behind"] == [] and doc["failure"] == ""
    assert set(doc["workloads"]) == {w.key for w in WORKLOADS}
    for w in WORKLOADS:
        setups = doc["workloads"][w.key]["setups"]
        assert set(setups) == set(SETUP_NAMES)
        for name in SETUP_NAMES:
            entry = setups[name]
            if w.only and name not in w.only:
                assert entry["n"] == 0 and entry["errors"], (w.key, name, entry)  # says why
                continue
            assert entry["n"] >= 1 and entry["samples"], (w.key, name, entry)
            assert all(v > 0 for v in entry["samples"]), (w.key, name, entry)
            assert entry["median"] > 0 and entry["p95"] > 0, (w.key, name, entry)
            assert w.only or entry["ratio"] > 0, (w.key, name, entry)
            assert w.label in out
