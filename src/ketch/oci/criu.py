"""CRIU as runc uses it for checkpoint and restore: which binary, whether it works here, and
what it logged.

runc runs criu itself (``runc --criu PATH``, or ``criu`` on PATH); the shim checks it first
with ``criu check`` so that a missing or broken criu is a FailedPrecondition that says so,
rather than a runc failure deep in a dump. The check is run through the shim's reaper, as
every child is (:func:`ketch.oci.runc.run_command`).
"""

from __future__ import annotations

import os

from ketch import errdefs
from ketch.oci.runc import ExitWatcher, run_command

CHECK_TIMEOUT = 30.0
#: how much of a criu log an error quotes
TAIL_LINES = 15


def find(path: str) -> str:
    """The criu binary: ``path`` (a path, or a name looked up on PATH), default ``criu``;
    FailedPrecondition when there is none."""
    name = path or "criu"
    if "/" in name:
        if os.access(name, os.X_OK) and not os.path.isdir(name):
            return name
        raise errdefs.FailedPrecondition(f"checkpoint/restore needs criu: criu_path {name!r} is not an executable file")
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        candidate = os.path.join(d or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise errdefs.FailedPrecondition(
        f"checkpoint/restore needs criu: {name!r} not found in PATH ({os.environ.get('PATH', '')}); "
        "install criu or set the runc option criu_path")


async def require(monitor: ExitWatcher, path: str) -> str:
    """The criu binary runc will run (see :func:`find`), once ``criu check`` passed; otherwise
    FailedPrecondition naming it and quoting what ``criu check`` said."""
    binary = find(path)
    try:
        res = await run_command(monitor, [binary, "check"], timeout=CHECK_TIMEOUT)
    except TimeoutError:
        raise errdefs.FailedPrecondition(f"criu check ({binary}) did not finish within {CHECK_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise errdefs.FailedPrecondition(f"criu {binary} does not run: {e}") from None
    if res.status != 0:
        raise check_failed(binary, res.status, res.stderr + res.stdout)
    return binary


def check_failed(binary: str, status: int, output: bytes) -> errdefs.FailedPrecondition:
    """The error for a ``criu check`` that exited ``status``, quoting the end of its ``output``."""
    said = output.decode(errors="replace").strip()
    said = "\n".join(said.splitlines()[-TAIL_LINES:]) or f"exit status {status}"
    return errdefs.FailedPrecondition(f"criu check failed ({binary}): {said}")


def log_excerpt(path: str, lines: int = TAIL_LINES) -> str:
    """What a criu log says went wrong: its ``Error`` lines (criu's advice is among them, e.g.
    "Connected TCP socket, consider using --tcp-established option"), at most ``lines`` of
    them; without any, its last ``lines`` lines; "" when there is no log."""
    try:
        with open(path, "rb") as f:
            text = f.read(4 << 20).decode(errors="replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    errors = [line for line in all_lines if "Error (" in line]
    return "\n".join((errors or all_lines)[-lines:])
