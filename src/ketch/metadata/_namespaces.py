"""Namespaces (containerd ``metadata/namespaces.go`` and ``services/namespaces/local.go``)."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ketch import identifiers
from ketch.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ketch.identifiers import quote
from ketch.metadata import labels as _labels
from ketch.metadata.types import Namespace

if TYPE_CHECKING:
    from ketch.metadata.store import Store

# What keeps a namespace from being deleted: (table, the words containerd uses for it), in
# containerd's order. Snapshots live in the snapshotters' own files, not here.
_CONTENTS: tuple[tuple[str, str], ...] = (("images", "images"), ("content", "blobs"), ("containers", "containers"))


#: containerd's NamespaceRequired (the one check, shared with the content store and snapshotters)
require = identifiers.require_namespace


def ensure(conn: sqlite3.Connection, namespace: str) -> bool:
    """Create ``namespace`` (already validated) unless it exists; True when created."""
    cur = conn.execute("INSERT OR IGNORE INTO namespaces (name) VALUES (?)", (namespace,))
    return cur.rowcount > 0


def exists(conn: sqlite3.Connection, namespace: str) -> bool:
    """Whether ``namespace`` has a row."""
    return conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (namespace,)).fetchone() is not None


def _validate_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        try:
            _labels.validate(k, v)
        except InvalidArgument as exc:
            raise InvalidArgument(f"namespace.Labels: {exc.message}") from None


class Namespaces:
    """The :class:`~ketch.metadata.types.NamespaceStore` over SQLite."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def create(self, name: str, labels: Mapping[str, str] | None = None) -> Namespace:
        """Create ``name``; AlreadyExists if it exists, InvalidArgument if it is not an identifier."""
        identifiers.validate(name)
        stored = _labels.clean(labels)
        _validate_labels(labels or {})
        with self._store.transaction() as conn:
            try:
                conn.execute("INSERT INTO namespaces (name, labels) VALUES (?, ?)", (name, _labels.dumps(stored)))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"namespace {quote(name)}") from None
        return Namespace(name, stored)

    def ensure(self, name: str) -> bool:
        """Create ``name`` unless it exists (what a first namespaced call does); True if created."""
        identifiers.validate(name)
        with self._store.transaction() as conn:
            return ensure(conn, name)

    def get(self, name: str) -> Namespace:
        """The namespace ``name``; NotFound if there is none."""
        with self._store.transaction(write=False) as conn:
            row = conn.execute("SELECT labels FROM namespaces WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"namespace {quote(name)}")
        return Namespace(name, _labels.loads(row[0]))

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()) -> Namespace:
        """Set labels: with no field paths replace them all; ``labels`` does the same;
        ``labels.<key>`` sets one key from ``labels`` (absent or empty removes it).

        As in containerd, updating a namespace that does not exist creates it.
        """
        identifiers.validate(name)
        with self._store.transaction() as conn:
            ensure(conn, name)
            row = conn.execute("SELECT labels FROM namespaces WHERE name = ?", (name,)).fetchone()
            current = _labels.loads(row[0])
            if not fieldpaths:
                fieldpaths = ("labels",)
            for path in fieldpaths:
                if path == "labels":
                    _validate_labels(labels)
                    current = dict(labels)
                elif path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    value = labels.get(key, "")
                    _validate_labels({key: value})
                    current[key] = value
                else:
                    raise InvalidArgument(f"cannot update {quote(path)} field")
            current = _labels.clean(current)
            conn.execute("UPDATE namespaces SET labels = ? WHERE name = ?", (_labels.dumps(current), name))
        return Namespace(name, current)

    def delete(self, name: str) -> None:
        """Delete an empty namespace; its leases go with it. FailedPrecondition names what is left."""
        with self._store.transaction() as conn:
            left = [
                words
                for table, words in _CONTENTS
                if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()
            ]
            if left:
                raise FailedPrecondition(f"namespace {quote(name)} must be empty, but it still has {', '.join(left)}")
            cur = conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"namespace {quote(name)}")

    def list(self) -> builtins.list[Namespace]:
        """Every namespace, ordered by name."""
        with self._store.transaction(write=False) as conn:
            rows = conn.execute("SELECT name, labels FROM namespaces ORDER BY name").fetchall()
        return [Namespace(name, _labels.loads(text)) for name, text in rows]
