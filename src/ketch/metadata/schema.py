"""The SQLite schema of ``meta.db``, and the migrations that build it.

RULE: to change the schema, update this drawing **and** append a migration to
:data:`MIGRATIONS` (never edit one that has shipped). :data:`SCHEMA_VERSION` is the number of
migrations; a file records the version it has reached in ``PRAGMA user_version``.

Schema version 2 (version 1 is the same without ``content``, ``content_ingests`` and
``images``)::

    meta.db            PRAGMA journal_mode=WAL, foreign_keys=ON, user_version=SCHEMA_VERSION
    │
    ├── namespaces                          one row per namespace
    │     name          TEXT  PK            an identifier
    │     labels        TEXT  JSON object   {"key": "value"}; never an empty value
    │
    ├── containers                          PK (namespace, id)
    │   │ namespace     TEXT  → namespaces(name)  ON DELETE RESTRICT (delete refuses first)
    │   │ id            TEXT                an identifier
    │   │ labels        TEXT  JSON object
    │   │ image         TEXT                "" when unset
    │   │ runtime_name  TEXT  NOT NULL, non-empty
    │   │ runtime_options_type TEXT NULL ┐  an Any, or both NULL
    │   │ runtime_options      BLOB NULL ┘
    │   │ spec_type     TEXT  NULL       ┐  an Any (required by validation, NULL-able here)
    │   │ spec          BLOB  NULL       ┘
    │   │ snapshotter   TEXT                "" when unset
    │   │ snapshot_key  TEXT                "" when unset
    │   │ created_at    REAL                seconds since the epoch
    │   │ updated_at    REAL
    │   │
    │   └── container_extensions            PK (namespace, container_id, name)
    │         namespace, container_id  → containers(namespace, id)  ON DELETE CASCADE
    │         name          TEXT            non-empty
    │         type_url      TEXT
    │         value         BLOB
    │
    ├── leases                              PK (namespace, id)
    │   │ namespace     TEXT  → namespaces(name)  ON DELETE CASCADE (as in containerd, a
    │   │                                          namespace's leases go with it)
    │   │ id            TEXT
    │   │ labels        TEXT  JSON object
    │   │ created_at    REAL
    │   │
    │   └── lease_resources                 PK (namespace, lease_id, type, id)
    │         namespace, lease_id  → leases(namespace, id)  ON DELETE CASCADE
    │         type          TEXT            "content" | "ingests" | "snapshots/<snapshotter>"
    │         id            TEXT            digest | ingest ref | snapshot key
    │
    ├── content                             PK (namespace, digest)   [v2]
    │     namespace     TEXT  → namespaces(name)  ON DELETE RESTRICT ("blobs" keep it)
    │     digest        TEXT                "sha256:<64 hex>"; the file is
    │                                       <content root>/blobs/sha256/<hex>, shared by every
    │                                       namespace; a namespace sees a blob only by its row
    │     size          INTEGER             bytes, >= 0
    │     labels        TEXT  JSON object   containerd.io/gc.* references among them
    │     created_at    REAL
    │     updated_at    REAL
    │     INDEX content_by_digest (digest)  "does any namespace still hold this blob?"
    │
    ├── content_ingests                     one row per write in progress   [v2]
    │     seq           INTEGER PK AUTOINCREMENT   never reused, so a stale ingest directory
    │                                       can never be taken for a new write
    │     namespace     TEXT  → namespaces(name)  ON DELETE CASCADE (ingests hold no namespace)
    │     ref           TEXT                the client's ref, non-empty; UNIQUE (namespace, ref)
    │     bref          TEXT  UNIQUE        "<namespace>/<seq>/<ref>"; the ingest directory is
    │                                       <content root>/ingest/<sha256 hex of bref>/
    │     expected      TEXT                a blob already on disk (from another namespace)
    │                                       that this write may take without data; "" if none
    │     expires_at    REAL  NULL          set for an ingest no lease holds (24 h after it
    │                                       was opened); NULL when a lease holds it
    │
    └── images                              PK (namespace, name)   [v2]
          namespace     TEXT  → namespaces(name)  ON DELETE RESTRICT ("images" keep it)
          name          TEXT                a reference ("docker.io/library/busybox:latest"),
                                            non-empty; not an identifier
          labels        TEXT  JSON object
          target_media_type  TEXT           non-empty
          target_digest      TEXT           a digest (go-digest syntax)
          target_size        INTEGER        > 0
          target_annotations TEXT JSON object
          created_at    REAL
          updated_at    REAL

Text compares as bytes (SQLite's BINARY collation), so ``ORDER BY`` gives containerd's order
(bolt iterates keys bytewise).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from ketch.errdefs import FailedPrecondition

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "version"]

Migration = Callable[[sqlite3.Connection], None]


def _run(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first: run statement by statement.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v1_initial(conn: sqlite3.Connection) -> None:
    """Namespaces, containers (with extensions), leases (with resources)."""
    _run(
        conn,
        """
        CREATE TABLE namespaces (
            name    TEXT NOT NULL PRIMARY KEY,
            labels  TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE containers (
            namespace             TEXT NOT NULL REFERENCES namespaces(name) ON DELETE RESTRICT,
            id                    TEXT NOT NULL,
            labels                TEXT NOT NULL DEFAULT '{}',
            image                 TEXT NOT NULL DEFAULT '',
            runtime_name          TEXT NOT NULL CHECK (runtime_name <> ''),
            runtime_options_type  TEXT,
            runtime_options       BLOB,
            spec_type             TEXT,
            spec                  BLOB,
            snapshotter           TEXT NOT NULL DEFAULT '',
            snapshot_key          TEXT NOT NULL DEFAULT '',
            created_at            REAL NOT NULL,
            updated_at            REAL NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE container_extensions (
            namespace     TEXT NOT NULL,
            container_id  TEXT NOT NULL,
            name          TEXT NOT NULL CHECK (name <> ''),
            type_url      TEXT NOT NULL,
            value         BLOB NOT NULL,
            PRIMARY KEY (namespace, container_id, name),
            FOREIGN KEY (namespace, container_id)
                REFERENCES containers(namespace, id) ON DELETE CASCADE
        );
        CREATE TABLE leases (
            namespace   TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
            id          TEXT NOT NULL,
            labels      TEXT NOT NULL DEFAULT '{}',
            created_at  REAL NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE lease_resources (
            namespace  TEXT NOT NULL,
            lease_id   TEXT NOT NULL,
            type       TEXT NOT NULL,
            id         TEXT NOT NULL,
            PRIMARY KEY (namespace, lease_id, type, id),
            FOREIGN KEY (namespace, lease_id) REFERENCES leases(namespace, id) ON DELETE CASCADE
        );
        """
    )


def _v2_content_images(conn: sqlite3.Connection) -> None:
    """Content (per-namespace blob rows and ingests) and images."""
    _run(
        conn,
        """
        CREATE TABLE content (
            namespace   TEXT NOT NULL REFERENCES namespaces(name) ON DELETE RESTRICT,
            digest      TEXT NOT NULL,
            size        INTEGER NOT NULL CHECK (size >= 0),
            labels      TEXT NOT NULL DEFAULT '{}',
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            PRIMARY KEY (namespace, digest)
        );
        CREATE INDEX content_by_digest ON content (digest);
        CREATE TABLE content_ingests (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            namespace   TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
            ref         TEXT NOT NULL CHECK (ref <> ''),
            bref        TEXT NOT NULL UNIQUE,
            expected    TEXT NOT NULL DEFAULT '',
            expires_at  REAL,
            UNIQUE (namespace, ref)
        );
        CREATE TABLE images (
            namespace           TEXT NOT NULL REFERENCES namespaces(name) ON DELETE RESTRICT,
            name                TEXT NOT NULL CHECK (name <> ''),
            labels              TEXT NOT NULL DEFAULT '{}',
            target_media_type   TEXT NOT NULL,
            target_digest       TEXT NOT NULL,
            target_size         INTEGER NOT NULL,
            target_annotations  TEXT NOT NULL DEFAULT '{}',
            created_at          REAL NOT NULL,
            updated_at          REAL NOT NULL,
            PRIMARY KEY (namespace, name)
        );
        """
    )


#: every migration, in order; migration ``i`` takes a file from version ``i`` to ``i + 1``
MIGRATIONS: Sequence[Migration] = (_v1_initial, _v2_content_images)

#: the version this code reads and writes
SCHEMA_VERSION = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the open file (0 for a new file)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file up to :data:`SCHEMA_VERSION` in one transaction; return the old version.

    ``conn`` must be in autocommit mode (``isolation_level=None``) with no transaction open.
    A file written by a newer ketch is refused with FailedPrecondition rather than guessed at.
    """
    return apply_migrations(conn, MIGRATIONS[:SCHEMA_VERSION], "metadata")


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Callable[[sqlite3.Connection], None]],
                     what: str) -> int:
    """Run the ``migrations`` a file has not had yet, in one transaction, and record the new
    version in ``PRAGMA user_version``; the old version. Shared by every SQLite file ketch keeps."""
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = version(conn)
        if current > target:
            raise FailedPrecondition(f"{what} schema version {current} is newer than this ketch supports ({target})")
        for step in migrations[current:]:
            step(conn)
        if current != target:
            conn.execute(f"PRAGMA user_version = {target:d}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return current
