"""The metadata store: one SQLite file, opened once per process, shared by every noun.

``Store(path)`` opens (or creates) the file, switches it to WAL, turns on foreign keys and
runs the migrations in :mod:`ketch.metadata.schema`. The nouns hang off it::

    store = Store("/var/lib/ketch/meta.db")
    store.containers.create("default", Container(id="web", runtime=Runtime("io.containerd.runc.v2"), spec=...))
    with store.transaction():           # group changes across nouns
        ...

Calls are synchronous: each is one short transaction (well under a millisecond), cheap enough
to make from the event loop. A lock makes one ``Store`` safe to share between threads; several
``Store`` objects (or processes) on one file coordinate through SQLite's own locking, waiting
up to ``timeout`` seconds for a writer.

Durability: WAL with ``synchronous=NORMAL``: a committed change survives a crash of the
process; a power cut may lose the last transactions (and every running container with them).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator

from ketch.metadata import schema
from ketch.metadata._containers import Containers
from ketch.metadata._content import ContentRecords
from ketch.metadata._images import Images
from ketch.metadata._leases import Leases
from ketch.metadata._namespaces import Namespaces
from ketch.metadata.types import ContainerStore, ContentRecordStore, ImageStore, LeaseStore, NamespaceStore

__all__ = ["Store"]


class Store:
    """The metadata database; ``namespaces``, ``containers``, ``leases``, ``images`` and
    ``content`` (blob and ingest records; the bytes are :mod:`ketch.content`'s) are its nouns."""

    namespaces: NamespaceStore
    containers: ContainerStore
    leases: LeaseStore
    images: ImageStore
    content: ContentRecordStore

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        """Open or create the database at ``path`` and bring its schema up to date."""
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            schema.migrate(self._conn)
        except BaseException:
            self._conn.close()
            raise
        # Assigning to the Protocol-typed attributes is the static conformance check.
        self.namespaces = Namespaces(self)
        self.containers = Containers(self)
        self.leases = Leases(self)
        self.images = Images(self)
        self.content = ContentRecords(self)

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        with self._lock:
            return schema.version(self._conn)

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction around the block; commits on success, rolls back on any exception.

        A write transaction takes SQLite's write lock at once (``BEGIN IMMEDIATE``), so it
        never fails half-way on a lock upgrade. Nested use becomes a savepoint inside the
        outermost transaction: an exception undoes the inner block only, so every store
        method stays all-or-nothing inside a caller's transaction. Do not ``await`` inside the
        block: the loop's other coroutines would join the same transaction.
        """
        with self._lock:
            depth = self._depth
            if depth:
                savepoint = f"ketch_{depth}"
                self._conn.execute(f"SAVEPOINT {savepoint}")
            else:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            self._depth = depth + 1
            try:
                yield self._conn
            except BaseException:
                self._depth = depth
                if depth:
                    self._conn.execute(f"ROLLBACK TO {savepoint}")
                    self._conn.execute(f"RELEASE {savepoint}")
                elif self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth = depth
            self._conn.execute(f"RELEASE {savepoint}" if depth else "COMMIT")

    def close(self) -> None:
        """Close the file; the store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
