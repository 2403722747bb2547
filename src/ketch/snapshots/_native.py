"""The native snapshotter (containerd ``snapshots/native``): every ACTIVE snapshot is a full
copy of its parent, so it works on any filesystem, at the cost of time and space.

On disk, under ``root``::

    metadata.db                 the snapshot table (see ketch.snapshots._metastore)
    snapshots/<id>/             the snapshot's whole tree

A VIEW of a parent gets no directory: it mounts the parent's tree read-only. Mounts are binds,
``(rbind, rw)`` for ACTIVE snapshots and ``(rbind, ro)`` for views, as containerd returns them.
"""

from __future__ import annotations

import os

from ketch.mount import Mount
from ketch.snapshots._base import SnapshotterBase
from ketch.snapshots._fsutil import copy_tree
from ketch.snapshots._metastore import Row
from ketch.snapshots._types import Kind

__all__ = ["NativeSnapshotter"]


class NativeSnapshotter(SnapshotterBase):
    """Snapshots as plain directory copies."""

    name = "native"

    def _usage_path(self, id: int) -> str:
        return self._dir(id)

    def _populate(self, tmp: str, kind: Kind, parent: Row | None) -> bool:
        if parent is None:
            os.chmod(tmp, 0o755)
            return True
        if kind is Kind.VIEW:
            return False
        copy_tree(self._dir(parent.id), tmp)
        return True

    def _mounts(self, row: Row) -> list[Mount]:
        if row.parent_ids and row.kind is not Kind.ACTIVE:
            source = self._dir(row.parent_ids[0])
        else:
            source = self._dir(row.id)
        return [Mount("bind", source, ("rbind", "ro" if row.kind is Kind.VIEW else "rw"))]
