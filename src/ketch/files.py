"""Files that matter are written atomically: a temporary file beside the target, fsync, rename,
then fsync of the directory, without which the rename itself may not survive a power cut.

:func:`rename_durable` is the one durable rename (a verified blob moved into place, a
snapshot's directory); :func:`write_atomic` writes a file through it.

A leaf module (os only): the shim's light start path uses it.
"""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush the directory ``path`` itself (its entries: what was created, renamed, removed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durable(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` (replacing it) and fsync the directory of ``dst``, so that the
    new name is on disk when this returns (and the old one gone, when both share a directory).
    What ``src`` holds must already be on disk: fsync it first."""
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half;
    once this returns the new file survives a crash of the machine.

    ``durable=False`` skips the fsyncs (of the file and of the directory): right for runtime
    state (bundles, shim addresses), which a reboot discards anyway and which is written on
    every task's critical path, and for what can be rebuilt."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        rename_durable(tmp, path)
    else:
        os.replace(tmp, path)
