"""Files that matter are written atomically: a temporary file beside the target, fsync, rename.

A leaf module (os only): the shim's light start path uses it.
"""

from __future__ import annotations

import os


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.

    ``durable=False`` skips the fsync: right for runtime state (bundles, shim addresses),
    which a reboot discards anyway and which is written on every task's critical path."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
