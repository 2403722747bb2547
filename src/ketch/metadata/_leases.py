"""Leases and their resource references (containerd ``metadata/leases.go``).

Only the records: garbage collection, which honours them, comes later.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ketch import digests
from ketch import filters as _filters
from ketch.errdefs import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from ketch.identifiers import quote
from ketch.metadata import _namespaces
from ketch.metadata import labels as _labels
from ketch.metadata.types import Lease, LeaseResource

if TYPE_CHECKING:
    from ketch.metadata.store import Store

def _check_resource(resource: LeaseResource) -> LeaseResource:
    """containerd's parseLeaseResource: the types it knows, and a valid digest for content."""
    keys = resource.type.split("/")
    if keys[0] in ("content", "ingests"):
        if len(keys) != 1:
            raise InvalidArgument(f"invalid resource type {resource.type}")
        if keys[0] == "content":
            try:
                digests.parse(resource.id)
            except InvalidArgument as exc:
                raise InvalidArgument(f"invalid content resource id {resource.id}: {exc.message}") from None
    elif keys[0] == "snapshots":
        if len(keys) != 2:
            raise InvalidArgument(f"invalid snapshot resource type {resource.type}")
    else:
        raise Unimplemented(f"resource type {resource.type} not supported yet")
    return resource


def adaptor(lease: Lease) -> _filters.Adaptor:
    """The filter fields of a lease: ``id`` and ``labels.<key>``."""
    return _filters.adaptor_for({"id": lease.id, "labels": lease.labels})


class Leases:
    """The :class:`~ketch.metadata.types.LeaseStore` over SQLite."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def create(self, namespace: str, id: str, labels: Mapping[str, str] | None = None) -> Lease:
        """Create a lease, creating the namespace on first use; AlreadyExists if ``id`` is taken."""
        _namespaces.require(namespace)
        if not id:
            raise InvalidArgument("lease id must be provided")
        lease = Lease(id, _labels.clean(labels), time.time())
        with self._store.transaction() as conn:
            _namespaces.ensure(conn, namespace)
            try:
                conn.execute(
                    "INSERT INTO leases (namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
                    (namespace, id, _labels.dumps(lease.labels), lease.created_at),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"lease {quote(id)}") from None
        return lease

    def delete(self, namespace: str, id: str) -> None:
        """Delete a lease and its references; NotFound if there is none."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            cur = conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, id))
            if cur.rowcount == 0:
                raise NotFound(f"lease {quote(id)}")

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Lease]:
        """Leases matching any of ``filters``, ordered by id."""
        _namespaces.require(namespace)
        match = _filters.parse(list(filters))
        with self._store.transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT id, labels, created_at FROM leases WHERE namespace = ? ORDER BY id", (namespace,)
            ).fetchall()
        found = (Lease(id, _labels.loads(text), created_at) for id, text, created_at in rows)
        return [lease for lease in found if match.match(adaptor(lease))]

    def add_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Reference ``resource`` from the lease; adding it twice is not an error."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            self._require(conn, namespace, lease_id)
            _check_resource(resource)
            conn.execute(
                "INSERT OR IGNORE INTO lease_resources (namespace, lease_id, type, id) VALUES (?, ?, ?, ?)",
                (namespace, lease_id, resource.type, resource.id),
            )

    def delete_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Drop the reference; no error when the lease did not hold it."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            self._require(conn, namespace, lease_id)
            _check_resource(resource)
            conn.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease_id = ? AND type = ? AND id = ?",
                (namespace, lease_id, resource.type, resource.id),
            )

    def list_resources(self, namespace: str, lease_id: str) -> builtins.list[LeaseResource]:
        """The lease's resources: content, then ingests, then snapshots by snapshotter and key."""
        _namespaces.require(namespace)
        with self._store.transaction(write=False) as conn:
            self._require(conn, namespace, lease_id)
            rows = conn.execute(
                "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease_id = ? "
                "ORDER BY CASE WHEN type = 'content' THEN 0 WHEN type = 'ingests' THEN 1 ELSE 2 END, type, id",
                (namespace, lease_id),
            ).fetchall()
        return [LeaseResource(id, type) for type, id in rows]

    @staticmethod
    def _require(conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
        row = conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone()
        if row is None:
            raise NotFound(f"lease {quote(lease_id)}")
