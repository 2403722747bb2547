"""Mounting snapshots for the diff service: in a temporary directory, always unmounted.

:func:`apply_to_mounts` and :func:`compare_mounts` are what containerd's ``diff/apply``
(``apply_linux.go``) and ``diff/walking`` do with a snapshot's mounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence

from ketch.diff._apply import apply_layer
from ketch.diff._create import create_layer
from ketch.diff._streams import Readable, Writable
from ketch.mount import Mount, mount_all, unmount_all

__all__ = ["apply_to_mounts", "compare_mounts", "mounted", "readonly_mounts"]

log = logging.getLogger("ketch.diff")


def readonly_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """The same mounts, read-only: ``ro`` instead of ``rw``; an overlay loses its work dir and
    its upper dir becomes the topmost lower dir (containerd ``mount.readonlyMounts``)."""
    out = []
    for m in mounts:
        if m.type == "overlay":
            upper = ""
            options: list[str] = []
            for o in m.options:
                if o.startswith("upperdir="):
                    upper = o[len("upperdir="):]
                elif not o.startswith("workdir="):
                    options.append(o)
            if upper:
                options = [f"lowerdir={upper}:{o[len('lowerdir='):]}" if o.startswith("lowerdir=") else o
                           for o in options]
            out.append(Mount(m.type, m.source, tuple(options)))
        else:
            out.append(Mount(m.type, m.source, tuple(o for o in m.options if o not in ("rw", "ro")) + ("ro",)))
    return out


@contextlib.contextmanager
def mounted(mounts: Sequence[Mount], readonly: bool = False, *, parent: str | None = None) -> Iterator[str]:
    """Mount ``mounts`` on a new temporary directory (under ``parent``, default the system's
    temp dir) and yield its path; on the way out, however it is left (an error, a
    cancellation), unmount everything and remove the directory.

    The directory is removed with ``rmdir``, never recursively: if an unmount failed, the
    directory stays (and is logged) rather than deleting the mounted files.
    """
    if readonly:
        mounts = readonly_mounts(mounts)
    target = tempfile.mkdtemp(prefix="ketch-mount-", dir=parent)
    try:
        mount_all(mounts, target)
        try:
            yield target
        finally:
            unmount_all(target)
    finally:
        try:
            os.rmdir(target)
        except OSError as exc:
            log.error("temporary mount point %s not removed: %s", target, exc)


def _overlay_dirs(m: Mount) -> tuple[str, list[str], bool]:
    upper, lowers = "", []
    for o in m.options:
        if o.startswith("upperdir="):
            upper = o[len("upperdir="):]
        elif o.startswith("lowerdir="):
            lowers = o[len("lowerdir="):].split(":")
    return upper, lowers, "userxattr" in m.options


def apply_to_mounts(fileobj: Readable, mounts: Sequence[Mount], media_type: str) -> tuple[str, int]:
    """Apply a layer onto a snapshot given by its mounts; ``(diff_id, size)`` as
    :func:`~ketch.diff.apply_layer`.

    A single overlay mount with an upper dir is not mounted at all: the layer goes straight
    into the upper dir with overlay whiteouts (containerd does the same). Anything else is
    mounted on a temporary directory and the layer applied plainly.
    """
    if len(mounts) == 1 and mounts[0].type == "overlay":
        upper, lowers, userxattr = _overlay_dirs(mounts[0])
        if upper:
            return apply_layer(fileobj, upper, media_type, overlay_whiteouts=True, parents=lowers,
                               userxattr=userxattr)
    with mounted(mounts) as root:
        return apply_layer(fileobj, root, media_type)


def compare_mounts(lower: Sequence[Mount], upper: Sequence[Mount], out: Writable,
                   compress: bool = True) -> tuple[str, int]:
    """Write the layer from ``lower`` to ``upper`` (both mounted read-only for the walk);
    ``(diff_id, size)`` as :func:`~ketch.diff.create_layer`. Empty ``lower``: all is new."""
    with mounted(lower, readonly=True) as lower_dir, mounted(upper, readonly=True) as upper_dir:
        return create_layer(lower_dir, upper_dir, out, compress)
