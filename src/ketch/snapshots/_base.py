"""What every snapshotter does the same way: metadata, errors, directories, cleanup.

A subclass says how a new snapshot's directory is filled (:meth:`_populate`), which mounts
show it (:meth:`_mounts`), which directory holds its own changes (:meth:`_usage_path`) and
what to tidy after a commit (:meth:`_committed`).

The order of work keeps the disk and the metadata in step:

- create: check the names (read), fill a temporary ``snapshots/new-*`` directory without any
  lock held (the native copy may take long), then in one write transaction insert the row and
  rename the directory to ``snapshots/<id>``. Any failure removes the directory.
- commit: measure the changes, then update the row in one transaction (same id, same dir).
- remove: delete the row in one transaction, then remove the directory; if that fails (or
  something is still mounted inside it) the directory is left for :meth:`cleanup`.
"""

from __future__ import annotations

import builtins
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Mapping, Sequence

from ketch import filters as _filters
from ketch import identifiers
from ketch.files import rename_durable
from ketch.errdefs import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument
from ketch.identifiers import quote
from ketch.mount import Mount
from ketch.mount import remove_tree
from ketch.snapshots._fsutil import disk_usage
from ketch.snapshots._metastore import MetaStore, Row, not_found, validate_labels
from ketch.snapshots._types import Info, Kind, SnapshotRef, Usage

__all__ = ["SnapshotterBase", "TARGET_LABEL"]

log = logging.getLogger("ketch.snapshots")

#: a label asking that the snapshot be created only if this committed name does not exist yet
#: (containerd's unpacker sets it to the chain id; AlreadyExists then means "already unpacked")
TARGET_LABEL = "containerd.io/snapshot.ref"


check_namespace = identifiers.require_namespace


def _adaptor(info: Info) -> _filters.Adaptor:
    """containerd's snapshot adaptor: ``name``, ``parent`` and ``kind`` are always present."""

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        field = fieldpath[0]
        if field == "name":
            return info.name, True
        if field == "parent":
            return info.parent, True
        if field == "kind":
            return (info.kind.label, True) if info.kind is not Kind.UNKNOWN else ("", False)
        if field == "labels":
            return _filters.lookup_map(fieldpath[1:], info.labels)
        return "", False

    return adapt


class SnapshotterBase:
    """The shared body of :class:`OverlaySnapshotter` and :class:`NativeSnapshotter`."""

    #: the snapshotter's name in containerd's API
    name: str = ""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, 0o700, exist_ok=True)
        self._snapshots = os.path.join(self.root, "snapshots")
        os.makedirs(self._snapshots, 0o700, exist_ok=True)
        self._ms = MetaStore(os.path.join(self.root, "metadata.db"))
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()

    # -- hooks ------------------------------------------------------------------------------

    def _populate(self, tmp: str, kind: Kind, parent: Row | None) -> bool:
        """Fill the new snapshot's directory ``tmp``; False when the snapshot needs none."""
        raise NotImplementedError

    def _mounts(self, row: Row) -> list[Mount]:
        raise NotImplementedError

    def _usage_path(self, id: int) -> str:
        """The directory holding the snapshot's own changes."""
        raise NotImplementedError

    def _committed(self, id: int) -> None:
        """Tidy up after ``id`` was committed (the row already says COMMITTED)."""

    # -- paths ------------------------------------------------------------------------------

    def _dir(self, id: int) -> str:
        return os.path.join(self._snapshots, str(id))

    def _new_tmp(self) -> str:
        with self._inflight_lock:
            tmp = tempfile.mkdtemp(prefix="new-", dir=self._snapshots)
            self._inflight.add(os.path.basename(tmp))
        return tmp

    def _done_tmp(self, tmp: str) -> None:
        with self._inflight_lock:
            self._inflight.discard(os.path.basename(tmp))

    # -- the API ----------------------------------------------------------------------------

    def prepare(self, namespace: str, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the ACTIVE snapshot ``key`` on the committed ``parent`` ("" for none).

        AlreadyExists when ``key`` (or the name in the ``containerd.io/snapshot.ref`` label)
        exists; NotFound when ``parent`` does not; InvalidArgument when it is not committed.
        """
        return self._create(namespace, key, parent, labels, Kind.ACTIVE)

    def view(self, namespace: str, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the read-only VIEW ``key`` of the committed ``parent``; errors as prepare."""
        return self._create(namespace, key, parent, labels, Kind.VIEW)

    def _create(self, namespace: str, key: str, parent: str, labels: Mapping[str, str] | None,
                kind: Kind) -> list[Mount]:
        check_namespace(namespace)
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        cleaned = validate_labels(labels)
        target = cleaned.get(TARGET_LABEL, "")
        ms = self._ms

        def check(conn: sqlite3.Connection) -> Row | None:
            if target and ms.find(conn, namespace, target) is not None:
                raise AlreadyExists(f"target snapshot {quote(target)}")
            if ms.find(conn, namespace, key) is not None:
                raise AlreadyExists(f"snapshot {quote(key)}")
            return ms.resolve_parent(conn, namespace, parent)

        with ms.transaction(write=False) as conn:
            prow = check(conn)

        tmp: str | None = self._new_tmp()
        placed: str | None = None
        try:
            assert tmp is not None
            if not self._populate(tmp, kind, prow):
                remove_tree(tmp)
                self._done_tmp(tmp)
                tmp = None
            with ms.transaction() as conn:
                now_parent = check(conn)
                if (now_parent.id if now_parent else None) != (prow.id if prow else None):
                    raise Aborted(f"parent snapshot {parent} changed while {key} was prepared")
                row = ms.insert(conn, namespace, key, kind, parent, cleaned)
                if tmp is not None:
                    placed = self._dir(row.id)
                    rename_durable(tmp, placed)  # the directory before the row naming it
                    self._done_tmp(tmp)
                    tmp = None
        except BaseException:
            for path in (tmp, placed):
                if path is not None:
                    try:
                        remove_tree(path)
                    except OSError as exc:
                        log.warning("failed to remove %s after a failed create: %s", path, exc)
            if tmp is not None:
                self._done_tmp(tmp)
            raise
        log.debug("snapshot created snapshotter=%s namespace=%s key=%r id=%d kind=%s",
                  self.name, namespace, key, row.id, kind.label)
        return self._mounts(row)

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        """The mounts of the ACTIVE or VIEW snapshot ``key``; FailedPrecondition if COMMITTED."""
        check_namespace(namespace)
        row = self._ms.get(namespace, key)
        if row.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"failed to get active mount: requested snapshot {key} not active or view")
        return self._mounts(row)

    def commit(self, namespace: str, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Commit the ACTIVE ``key`` as ``name`` with ``labels`` (the key's labels are not kept).

        AlreadyExists when ``name`` exists; NotFound when ``key`` does not; FailedPrecondition
        when ``key`` is not ACTIVE. The usage of the layer is measured and stored.
        """
        check_namespace(namespace)
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        cleaned = validate_labels(labels)
        ms = self._ms
        with ms.transaction(write=False) as conn:
            if ms.find(conn, namespace, name) is not None:
                raise AlreadyExists(f"snapshot {quote(name)}")
            row = ms.find(conn, namespace, key)
            if row is None:
                raise not_found(key)
            if row.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"failed to commit snapshot: snapshot {quote(key)} is not active")
        usage = disk_usage(self._usage_path(row.id))
        with ms.transaction() as conn:
            ms.commit(conn, namespace, name, key, cleaned, usage, expect_id=row.id)
        log.debug("snapshot committed snapshotter=%s namespace=%s key=%r name=%r id=%d",
                  self.name, namespace, key, name, row.id)
        self._committed(row.id)

    def remove(self, namespace: str, key: str) -> None:
        """Remove ``key`` and its files; NotFound, or FailedPrecondition when it has children."""
        check_namespace(namespace)
        with self._ms.transaction() as conn:
            row = self._ms.delete(conn, namespace, key)
        path = self._dir(row.id)
        try:
            remove_tree(path)
        except OSError as exc:
            log.warning("snapshot %r removed but not its directory %s: %s", key, path, exc)
        log.debug("snapshot removed snapshotter=%s namespace=%s key=%r id=%d", self.name, namespace, key, row.id)

    def stat(self, namespace: str, key: str) -> Info:
        """The metadata of ``key``; NotFound when there is none."""
        check_namespace(namespace)
        return self._ms.get(namespace, key).info()

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Replace the labels of ``info.name`` (no field paths, or ``labels``), or the single
        labels ``labels.<key>`` named; an empty value removes a label. Other paths are
        InvalidArgument, as in containerd: only labels are mutable."""
        check_namespace(namespace)
        return self._ms.update(namespace, info, fieldpaths).info()

    def walk(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Info]:
        """Snapshots of ``namespace`` matching any of ``filters``, by name."""
        check_namespace(namespace)
        flt = _filters.parse(list(filters))
        infos = [row.info() for row in self._ms.list(namespace)]
        return [i for i in infos if flt.match(_adaptor(i))]

    def usage(self, namespace: str, key: str) -> Usage:
        """Disk used by the layer of ``key``: measured now when ACTIVE, stored at commit else."""
        check_namespace(namespace)
        row = self._ms.get(namespace, key)
        if row.kind is Kind.ACTIVE:
            return disk_usage(self._usage_path(row.id))
        return row.usage

    def namespaces(self) -> builtins.list[str]:
        """Namespaces holding at least one snapshot."""
        return self._ms.namespaces()

    def walk_refs(self, namespace: str) -> builtins.list[SnapshotRef]:
        """Every snapshot of ``namespace``: key, parent, labels and kind, by key."""
        check_namespace(namespace)
        return [SnapshotRef(key=r.key, parent=r.parent, labels=r.labels, kind=r.kind)
                for r in self._ms.list(namespace)]

    def cleanup(self) -> builtins.list[str]:
        """Remove every directory under ``snapshots/`` that no snapshot owns (left over by a
        crash or a failed removal); snapshots being created right now are spared."""
        with self._ms.lock, self._inflight_lock:
            ids = {str(i) for i in self._ms.ids()}
            inflight = set(self._inflight)
            names = os.listdir(self._snapshots)
        removed = []
        for name in sorted(names):
            if name in ids or name in inflight:
                continue
            path = os.path.join(self._snapshots, name)
            try:
                if remove_tree(path):
                    removed.append(path)
            except OSError as exc:
                log.warning("cleanup of %s failed: %s", path, exc)
        return removed

    def close(self) -> None:
        """Close the metadata file; the snapshotter cannot be used afterwards."""
        self._ms.close()

    def __enter__(self) -> SnapshotterBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

