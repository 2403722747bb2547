"""ketch as a user installs it: a wheel built from a clean checkout, installed with pip into a
fresh virtualenv, gives the three commands and runs the demo (ketchd, the ketch shim and the
CLI from that venv alone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def _checkout(dest: Path) -> Path:
    """The files a clean checkout of this tree has: what git tracks, and what it would (no
    .venv, no build output, nothing ignored)."""
    files = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = TOP / name
        if src.is_file() or src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


def test_a_wheel_from_a_clean_checkout_installs_and_runs_the_demo(tmp_path: Path) -> None:
    src = _checkout(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("ketch-*.whl")

    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    for command in ("ketchd", "ketch", "containerd-shim-ketch-v2"):
        assert (venv / "bin" / command).is_file(), command
    # the installed package, not this checkout: nothing of src/ on its path
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ketch; print(ketch.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(venv)), where

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    demo = subprocess.run([str(src / "scripts" / "demo")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(env, KETCH_BIN=str(venv / "bin")))
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "hello from a busybox container run by ketchd and containerd-shim-ketch-v2" in demo.stdout, demo.stdout
