"""The metadata of one snapshotter: a SQLite file beside its snapshots (``<root>/metadata.db``).

Each snapshotter keeps its own file, as containerd's do (``snapshots/storage``); unlike
containerd's, ours is namespaced itself, so no second layer maps keys. A snapshot's files live
in a directory named after its numeric ``id``, never after its key: keys are arbitrary strings.

RULE: to change the schema, update this drawing **and** append a migration to
:data:`MIGRATIONS` (never edit one that has shipped). :data:`SCHEMA_VERSION` is the number of
migrations; the file records the version it has reached in ``PRAGMA user_version``.

Schema version 1::

    metadata.db        PRAGMA journal_mode=WAL, foreign_keys=ON, user_version=SCHEMA_VERSION
    │
    └── snapshots                           one row per snapshot; UNIQUE (namespace, key)
          id          INTEGER PK AUTOINCREMENT  names the directory snapshots/<id>; never reused
          namespace   TEXT                  an identifier
          key         TEXT                  the key (ACTIVE, VIEW) or the committed name
          kind        INTEGER               1 VIEW, 2 ACTIVE, 3 COMMITTED (snapshots.Kind)
          parent_id   INTEGER NULL  → snapshots(id) ON DELETE RESTRICT
          │                                 a COMMITTED snapshot of the same namespace
          labels      TEXT  JSON object     {"key": "value"}; never an empty value
          created_at  REAL                  seconds since the epoch
          updated_at  REAL
          size        INTEGER               usage of a COMMITTED snapshot, measured at commit;
          inodes      INTEGER               0 for the others (measured on demand)
        INDEX snapshots_parent (parent_id)  "has children?" and the parent chain

Commit updates the row in place (key := name, kind := COMMITTED, new labels and times), so
the id, the directory and the children's ``parent_id`` stay as they are. Text compares as
bytes, so ``ORDER BY key`` is containerd's order (bolt iterates keys bytewise).
"""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ketch.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ketch.identifiers import quote
from ketch.metadata import labels as _labels
from ketch.metadata.schema import apply_migrations
from ketch.snapshots._types import Info, Kind, Usage

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "MetaStore", "Row"]

Migration = Callable[[sqlite3.Connection], None]


def _v1_initial(conn: sqlite3.Connection) -> None:
    """The snapshots table."""
    conn.execute(
        """
        CREATE TABLE snapshots (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace   TEXT NOT NULL,
            key         TEXT NOT NULL,
            kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
            parent_id   INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
            labels      TEXT NOT NULL DEFAULT '{}',
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            size        INTEGER NOT NULL DEFAULT 0,
            inodes      INTEGER NOT NULL DEFAULT 0,
            UNIQUE (namespace, key)
        )
        """
    )
    conn.execute("CREATE INDEX snapshots_parent ON snapshots(parent_id)")


#: every migration, in order; migration ``i`` takes a file from version ``i`` to ``i + 1``
MIGRATIONS: Sequence[Migration] = (_v1_initial,)

#: the version this code reads and writes
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Row:
    """One snapshot as stored, with what the snapshotter needs beyond :class:`Info`."""

    id: int
    namespace: str
    key: str
    kind: Kind
    parent: str
    parent_ids: tuple[int, ...]
    """The committed ancestors, nearest first (the overlay ``lowerdir`` order)."""
    labels: dict[str, str]
    created_at: float
    updated_at: float
    usage: Usage

    def info(self) -> Info:
        return Info(kind=self.kind, name=self.key, parent=self.parent, labels=dict(self.labels),
                    created_at=self.created_at, updated_at=self.updated_at)


_SELECT = """
    SELECT s.id, s.namespace, s.key, s.kind, s.parent_id, COALESCE(p.key, ''), s.labels,
           s.created_at, s.updated_at, s.size, s.inodes
    FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


def not_found(key: str) -> NotFound:
    return NotFound(f"snapshot {key} does not exist")


def validate_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """containerd's validateSnapshot: each label within limits; empty values dropped."""
    cleaned = _labels.clean(labels)
    for k, v in cleaned.items():
        try:
            _labels.validate(k, v)
        except InvalidArgument as exc:
            raise InvalidArgument(f"info.Labels: {exc.message}") from None
    return cleaned


class MetaStore:
    """The snapshot table of one snapshotter. Each method is one short transaction."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _migrate(self) -> None:
        apply_migrations(self._conn, MIGRATIONS, f"snapshot metadata {self.path}")

    @property
    def schema_version(self) -> int:
        with self.lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; commits when the block succeeds, rolls back on any exception.

        Holds the store's lock throughout: a caller may do short filesystem work (a rename)
        inside, so that it happens exactly when the row changes.
        """
        with self.lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self._conn.close()

    # -- reads ----------------------------------------------------------------------------

    def _chain(self, conn: sqlite3.Connection, parent_id: int | None) -> tuple[int, ...]:
        if parent_id is None:
            return ()
        rows = conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
                UNION ALL
                SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
            )
            SELECT id FROM chain ORDER BY depth
            """,
            (parent_id,),
        ).fetchall()
        return tuple(int(r[0]) for r in rows)

    def _row(self, conn: sqlite3.Connection, r: Sequence[Any], chain: bool = True) -> Row:
        id_, ns, key, kind, parent_id, parent, labels, created, updated, size, inodes = r
        assert isinstance(id_, int) and isinstance(labels, str)
        return Row(
            id=id_, namespace=str(ns), key=str(key), kind=Kind(kind), parent=str(parent),
            parent_ids=self._chain(conn, parent_id if isinstance(parent_id, int) else None) if chain else (),
            labels=_labels.loads(labels), created_at=float(created),
            updated_at=float(updated), usage=Usage(int(size), int(inodes)),
        )

    def find(self, conn: sqlite3.Connection, namespace: str, key: str) -> Row | None:
        r = conn.execute(_SELECT + " WHERE s.namespace = ? AND s.key = ?", (namespace, key)).fetchone()
        return None if r is None else self._row(conn, r)

    def get(self, namespace: str, key: str) -> Row:
        """The snapshot ``key``; NotFound when there is none."""
        with self.transaction(write=False) as conn:
            row = self.find(conn, namespace, key)
        if row is None:
            raise not_found(key)
        return row

    def list(self, namespace: str) -> builtins.list[Row]:
        """Every snapshot of ``namespace``, by key (without parent chains)."""
        with self.transaction(write=False) as conn:
            rows = conn.execute(_SELECT + " WHERE s.namespace = ? ORDER BY s.key", (namespace,)).fetchall()
            return [self._row(conn, r, chain=False) for r in rows]

    def namespaces(self) -> builtins.list[str]:
        with self.transaction(write=False) as conn:
            return [str(r[0]) for r in conn.execute("SELECT DISTINCT namespace FROM snapshots ORDER BY namespace")]

    def ids(self) -> set[int]:
        with self.transaction(write=False) as conn:
            return {int(r[0]) for r in conn.execute("SELECT id FROM snapshots")}

    # -- writes (the caller holds a write transaction) --------------------------------------

    def resolve_parent(self, conn: sqlite3.Connection, namespace: str, parent: str) -> Row | None:
        """The committed parent named ``parent`` ("" → None), with containerd's errors."""
        if not parent:
            return None
        prow = self.find(conn, namespace, parent)
        if prow is None:
            raise NotFound(f"parent snapshot {parent} does not exist")
        if prow.kind is not Kind.COMMITTED:
            raise InvalidArgument(f"parent {quote(parent)} is not committed snapshot")
        return prow

    def insert(self, conn: sqlite3.Connection, namespace: str, key: str, kind: Kind, parent: str,
               labels: dict[str, str]) -> Row:
        """Add an ACTIVE or VIEW snapshot; AlreadyExists / NotFound / InvalidArgument."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind.name} invalid; only snapshots of type Active or View can be created"
            )
        if self.find(conn, namespace, key) is not None:
            raise AlreadyExists(f"snapshot {quote(key)}")
        prow = self.resolve_parent(conn, namespace, parent)
        now = time.time()
        cur = conn.execute(
            "INSERT INTO snapshots (namespace, key, kind, parent_id, labels, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, int(kind), prow.id if prow else None, _labels.dumps(labels), now, now),
        )
        row = self.find(conn, namespace, key)
        assert row is not None and row.id == cur.lastrowid
        return row

    def commit(self, conn: sqlite3.Connection, namespace: str, name: str, key: str,
               labels: dict[str, str], usage: Usage, expect_id: int | None = None) -> Row:
        """Turn the ACTIVE ``key`` into the COMMITTED ``name`` (same id); containerd's errors."""
        if self.find(conn, namespace, name) is not None:
            raise AlreadyExists(f"snapshot {quote(name)}")
        row = self.find(conn, namespace, key)
        if row is None or (expect_id is not None and row.id != expect_id):
            raise not_found(key)
        if row.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"failed to commit snapshot: snapshot {quote(key)} is not active")
        now = time.time()
        conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_at = ?, updated_at = ?, "
            "size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), _labels.dumps(labels), now, now, usage.size, usage.inodes, row.id),
        )
        committed = self.find(conn, namespace, name)
        assert committed is not None
        return committed

    def delete(self, conn: sqlite3.Connection, namespace: str, key: str) -> Row:
        """Delete a snapshot without children; NotFound / FailedPrecondition."""
        row = self.find(conn, namespace, key)
        if row is None:
            raise not_found(key)
        if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row.id,)).fetchone():
            raise FailedPrecondition("cannot remove snapshot with child")
        conn.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        return row

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str]) -> Row:
        """Set labels from ``info`` (all, or those the field paths name); the stored row."""
        if not info.name:
            raise InvalidArgument("snapshot name must not be empty")
        with self.transaction() as conn:
            row = self.find(conn, namespace, info.name)
            if row is None:
                raise not_found(info.name)
            labels = dict(row.labels)
            if fieldpaths:
                for path in fieldpaths:
                    if path.startswith("labels."):
                        k = path[len("labels."):]
                        labels[k] = info.labels.get(k, "")
                    elif path == "labels":
                        labels = dict(info.labels)
                    else:
                        raise InvalidArgument(f"cannot update {quote(path)} field on snapshot {quote(info.name)}")
            else:
                labels = dict(info.labels)
            labels = validate_labels(labels)
            conn.execute("UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
                         (_labels.dumps(labels), time.time(), row.id))
            updated = self.find(conn, namespace, info.name)
        assert updated is not None
        return updated
