"""CRIU for checkpoint/restore tests: the kit ``../shared/criu`` beside the repository installs
criu 4.1 privately (Debian 12's 3.17 fails ``criu check`` on recent kernels) and prints the path
of a ``criu`` wrapper to hand to runc (``runc --criu``, the runc option ``criu_path``) or to put
first on PATH.

``python -m ketch.testing.criu`` sets it up (``scripts/setup`` runs it) and prints the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: the criu kit, beside the repository (override: KETCH_CRIU_KIT)
KIT = Path(os.environ.get("KETCH_CRIU_KIT") or Path(__file__).resolve().parents[3] / ".." / "shared" / "criu")


def setup() -> str:
    """Install criu (idempotent: a few seconds once done) and return the wrapper's path. A
    failure raises RuntimeError with the kit's words: tests that need criu fail, never skip."""
    script = KIT / "setup.sh"
    if not script.is_file():
        raise RuntimeError(f"criu kit not found: {script} is missing (set KETCH_CRIU_KIT to the kit's directory)")
    r = subprocess.run([str(script)], capture_output=True, text=True)
    lines = r.stdout.split()
    if r.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise RuntimeError(f"criu setup ({script}) failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return lines[-1]


if __name__ == "__main__":
    try:
        print(setup())
    except RuntimeError as e:
        sys.exit(str(e))
