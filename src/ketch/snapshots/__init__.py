"""Snapshotters: layered filesystems with containerd's semantics, namespaced.

A snapshot is ACTIVE (writable, from ``prepare``), a VIEW (read-only, from ``view``) or
COMMITTED (immutable, from ``commit`` of an ACTIVE one); only COMMITTED snapshots may be
parents. ``prepare`` and ``view`` return the mounts (:class:`ketch.mount.Mount`) that show the
snapshot; the caller mounts them where it wants::

    sn = OverlaySnapshotter("/var/lib/ketch/snapshots/overlayfs")
    mounts = sn.prepare("default", "layer-1-extract")
    ...                                   # mount, unpack a layer, unmount
    sn.commit("default", "sha256:<chain id>", "layer-1-extract")
    mounts = sn.prepare("default", "web", parent="sha256:<chain id>")

Each snapshotter keeps its metadata in ``<root>/metadata.db`` (schema in
:mod:`ketch.snapshots._metastore`) and its files in ``<root>/snapshots/<id>/``. Keys are any
strings, unique per namespace; only the numeric ids appear in paths. Errors are containerd's:
NotFound ``snapshot X does not exist``, AlreadyExists ``snapshot "X": already exists``,
FailedPrecondition ``cannot remove snapshot with child``, InvalidArgument for a parent that is
not committed.

Every call is synchronous and may be slow (a native ``prepare`` copies a tree): run it in a
thread from an event loop. Garbage collection uses ``name``, ``namespaces()``,
``walk_refs(namespace)`` and ``remove(namespace, key)``.
"""

from __future__ import annotations

from ketch.snapshots._base import TARGET_LABEL, SnapshotterBase
from ketch.snapshots._native import NativeSnapshotter
from ketch.snapshots._overlay import OverlaySnapshotter, supported
from ketch.snapshots._types import Info, Kind, SnapshotRef, Snapshotter, Usage

__all__ = [
    "TARGET_LABEL",
    "Info",
    "Kind",
    "NativeSnapshotter",
    "OverlaySnapshotter",
    "SnapshotRef",
    "Snapshotter",
    "SnapshotterBase",
    "Usage",
    "supported",
]

# static conformance: both implementations are Snapshotters
_overlay: type[Snapshotter] = OverlaySnapshotter
_native: type[Snapshotter] = NativeSnapshotter
