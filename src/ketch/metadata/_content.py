"""Content records: which namespace holds which blob, and the ingests in progress
(containerd ``metadata/content.go``, the bolt buckets ``v1/<ns>/content/blob`` and
``v1/<ns>/content/ingests``).

Only rows live here; the bytes are :mod:`ketch.content`'s. A blob file on disk is shared by
every namespace, and a namespace sees it only through its own row, so deleting a row is cheap
and the file goes when garbage collection finds no row (and no ingest) that wants it.
"""

from __future__ import annotations

import builtins
import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ketch import digests
from ketch import filters as _filters
from ketch.errdefs import AlreadyExists, InvalidArgument, NotFound
from ketch.identifiers import quote
from ketch.metadata import _namespaces
from ketch.metadata import labels as _labels
from ketch.metadata.types import ContentInfo, Ingest

if TYPE_CHECKING:
    from ketch.metadata.store import Store

__all__ = ["ContentRecords", "adaptor", "validate_labels"]


def validate_labels(labels: dict[str, str]) -> None:
    """containerd's validateInfo (sizes), plus one check of ketch's own: the value of a
    ``containerd.io/gc.ref.content*`` label must be a digest, since garbage collection
    follows it (containerd accepts anything and silently follows nothing)."""
    for k, v in labels.items():
        try:
            _labels.validate(k, v)
        except InvalidArgument as exc:
            raise InvalidArgument(f"info.Labels: {exc.message}") from None
        if v and _is_content_ref(k):
            try:
                digests.parse(v)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"info.Labels: label {quote(k)} must hold a digest, not {quote(v)}: {exc.message}"
                ) from None


def _is_content_ref(key: str) -> bool:
    prefix = _labels.GC_REF_CONTENT
    return key == prefix or (key.startswith(prefix) and key[len(prefix)] in "./")


def adaptor(info: ContentInfo) -> _filters.Adaptor:
    """Filter fields: ``digest`` and ``labels.<key>`` as containerd; ``size`` (decimal) is
    ketch's addition (containerd reserves the field but never matches it)."""
    return _filters.adaptor_for({"digest": info.digest, "size": str(info.size), "labels": info.labels})


_INFO_COLUMNS = "digest, size, labels, created_at, updated_at"
_INGEST_COLUMNS = "ref, bref, expected, expires_at"


def _info(row: Sequence[Any]) -> ContentInfo:
    digest, size, labels, created_at, updated_at = row
    return ContentInfo(digest, size, _labels.loads(labels), created_at, updated_at)


def _ingest(row: Sequence[Any]) -> Ingest:
    ref, bref, expected, expires_at = row
    return Ingest(ref, bref, expected, expires_at)


class ContentRecords:
    """The :class:`~ketch.metadata.types.ContentRecordStore` over SQLite."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- blobs ------------------------------------------------------------------------------

    def get(self, namespace: str, digest: str) -> ContentInfo:
        """The namespace's record of ``digest``; NotFound ``content digest <d>``."""
        _namespaces.require(namespace)
        digests.check_digest(digest)
        with self._store.transaction(write=False) as conn:
            info = self._read(conn, namespace, digest)
        if info is None:
            raise NotFound(f"content digest {digest}")
        return info

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[ContentInfo]:
        """Records matching any of ``filters``, ordered by digest (containerd's order)."""
        _namespaces.require(namespace)
        match = _filters.parse(list(filters))
        with self._store.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_INFO_COLUMNS} FROM content WHERE namespace = ? ORDER BY digest", (namespace,)
            ).fetchall()
        found = (_info(row) for row in rows)
        return [info for info in found if match.match(adaptor(info))]

    def add(self, namespace: str, info: ContentInfo) -> ContentInfo:
        """Record a committed blob in the namespace, creating the namespace on first use."""
        _namespaces.require(namespace)
        digests.check_digest(info.digest)
        if info.size < 0:
            raise InvalidArgument(f"content {info.digest}: size {info.size} is negative")
        validate_labels(info.labels)
        now = time.time()
        added = ContentInfo(info.digest, info.size, _labels.clean(info.labels), now, now)
        with self._store.transaction() as conn:
            _namespaces.ensure(conn, namespace)
            try:
                conn.execute(
                    f"INSERT INTO content (namespace, {_INFO_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (namespace, added.digest, added.size, _labels.dumps(added.labels), now, now),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"content {info.digest}") from None
        return added

    def update(self, namespace: str, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        """Set labels as containerd does: no paths or ``labels`` replace them all,
        ``labels.<key>`` sets one from ``info.labels`` (absent or empty removes it); any
        other path is InvalidArgument. Size and times are not the caller's to set."""
        _namespaces.require(namespace)
        digests.check_digest(info.digest)
        with self._store.transaction() as conn:
            updated = self._read(conn, namespace, info.digest)
            if updated is None:
                raise NotFound(f"content digest {info.digest}")
            labels = dict(updated.labels)
            for path in fieldpaths or ("labels",):
                if path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    labels[key] = info.labels.get(key, "")
                elif path == "labels":
                    labels = dict(info.labels)
                else:
                    raise InvalidArgument(f"cannot update {quote(path)} field on content info {quote(info.digest)}")
            validate_labels(labels)
            updated = dataclasses.replace(updated, labels=_labels.clean(labels), updated_at=time.time())
            conn.execute(
                "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                (_labels.dumps(updated.labels), updated.updated_at, namespace, updated.digest),
            )
        return updated

    def delete(self, namespace: str, digest: str) -> None:
        """Drop the namespace's record; NotFound ``content digest <d>`` if it had none."""
        _namespaces.require(namespace)
        digests.check_digest(digest)
        with self._store.transaction() as conn:
            cur = conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (namespace, digest))
            if cur.rowcount == 0:
                raise NotFound(f"content digest {digest}")

    def referenced(self) -> set[str]:
        """Digests held by some namespace or expected by some ingest (what keeps a file)."""
        with self._store.transaction(write=False) as conn:
            held = {row[0] for row in conn.execute("SELECT DISTINCT digest FROM content")}
            held.update(row[0] for row in conn.execute(
                "SELECT DISTINCT expected FROM content_ingests WHERE expected <> ''"))
        return held

    def usage(self) -> dict[str, tuple[int, int]]:
        """Namespace → (blobs, bytes) of the content rows it has."""
        with self._store.transaction(write=False) as conn:
            rows = conn.execute("SELECT namespace, count(*), coalesce(sum(size), 0) FROM content GROUP BY namespace")
            return {ns: (count, size) for ns, count, size in rows}

    # -- ingests ----------------------------------------------------------------------------

    def open_ingest(self, namespace: str, ref: str, expected: str = "",
                    expires_at: float | None = None) -> Ingest:
        """Create the record of ``ref`` (bref ``<ns>/<seq>/<ref>``) or take the existing one,
        and set ``expected`` and ``expires_at`` on it."""
        _namespaces.require(namespace)
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected:
            digests.check_digest(expected)
        with self._store.transaction() as conn:
            _namespaces.ensure(conn, namespace)
            row = conn.execute(
                "SELECT seq FROM content_ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
            ).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO content_ingests (namespace, ref, bref, expected, expires_at) VALUES (?, ?, '', ?, ?)",
                    (namespace, ref, expected, expires_at),
                )
                seq = cur.lastrowid
                conn.execute("UPDATE content_ingests SET bref = ? WHERE seq = ?", (f"{namespace}/{seq}/{ref}", seq))
            else:
                conn.execute(
                    "UPDATE content_ingests SET expected = ?, expires_at = ? WHERE seq = ?",
                    (expected, expires_at, row[0]),
                )
            ingest = self._read_ingest(conn, namespace, ref)
        assert ingest is not None
        return ingest

    def get_ingest(self, namespace: str, ref: str) -> Ingest:
        """The record of ``ref``; NotFound ``reference <ref>`` (containerd's words)."""
        _namespaces.require(namespace)
        with self._store.transaction(write=False) as conn:
            ingest = self._read_ingest(conn, namespace, ref)
        if ingest is None:
            raise NotFound(f"reference {ref}")
        return ingest

    def delete_ingest(self, namespace: str, ref: str) -> Ingest:
        """Drop the record of ``ref`` and return it; NotFound ``reference <ref>``."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            ingest = self._read_ingest(conn, namespace, ref)
            if ingest is None:
                raise NotFound(f"reference {ref}")
            conn.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
        return ingest

    def list_ingests(self, namespace: str) -> builtins.list[Ingest]:
        """The namespace's ingest records, ordered by ref."""
        _namespaces.require(namespace)
        with self._store.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_INGEST_COLUMNS} FROM content_ingests WHERE namespace = ? ORDER BY ref", (namespace,)
            ).fetchall()
        return [_ingest(row) for row in rows]

    def ingest_brefs(self) -> set[str]:
        """The brefs of every ingest record in every namespace."""
        with self._store.transaction(write=False) as conn:
            return {row[0] for row in conn.execute("SELECT bref FROM content_ingests")}

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _read(conn: sqlite3.Connection, namespace: str, digest: str) -> ContentInfo | None:
        row = conn.execute(
            f"SELECT {_INFO_COLUMNS} FROM content WHERE namespace = ? AND digest = ?", (namespace, digest)
        ).fetchone()
        return None if row is None else _info(row)

    @staticmethod
    def _read_ingest(conn: sqlite3.Connection, namespace: str, ref: str) -> Ingest | None:
        row = conn.execute(
            f"SELECT {_INGEST_COLUMNS} FROM content_ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
        ).fetchone()
        return None if row is None else _ingest(row)
