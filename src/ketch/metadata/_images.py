"""Image records (containerd ``metadata/images.go``, ``metadata/adaptors.go`` adaptImage)."""

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
from ketch.metadata.types import Descriptor, Image

if TYPE_CHECKING:
    from ketch.metadata.store import Store

__all__ = ["Images", "adaptor", "validate"]

_COLUMNS = (
    "name, labels, target_media_type, target_digest, target_size, target_annotations, created_at, updated_at"
)


def adaptor(image: Image) -> _filters.Adaptor:
    """Filter fields, as containerd: ``name``, ``target.digest``, ``target.mediatype``,
    ``labels.<key>``, ``annotations.<key>`` (the target's annotations)."""
    return _filters.adaptor_for(
        {
            "name": image.name,
            "target": {"digest": image.target.digest, "mediatype": image.target.media_type},
            "labels": image.labels,
            "annotations": image.target.annotations,
        }
    )


def validate(image: Image) -> None:
    """containerd's validateImage, with its words. The name is a reference, not an
    identifier: any non-empty string is accepted, as containerd does."""
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    for k, v in image.labels.items():
        try:
            _labels.validate(k, v)
        except InvalidArgument as exc:
            raise InvalidArgument(f"image.Labels: {exc.message}") from None
    target = image.target
    try:
        digests.parse(target.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"Target.Digest {quote(target.digest)} invalid: {exc.message}") from None
    if target.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not target.media_type:
        raise InvalidArgument("Target.MediaType must be set")


def _from_row(row: Sequence[Any]) -> Image:
    name, labels, media_type, digest, size, annotations, created_at, updated_at = row
    return Image(
        name=name,
        labels=_labels.loads(labels),
        target=Descriptor(media_type, digest, size, _labels.loads(annotations)),
        created_at=created_at,
        updated_at=updated_at,
    )


def _copy(image: Image) -> Image:
    target = dataclasses.replace(image.target, annotations=_labels.clean(image.target.annotations))
    return dataclasses.replace(image, labels=_labels.clean(image.labels), target=target)


class Images:
    """The :class:`~ketch.metadata.types.ImageStore` over SQLite."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def create(self, namespace: str, image: Image) -> Image:
        """Store a new image, creating the namespace on first use; AlreadyExists ``image "x"``."""
        _namespaces.require(namespace)
        validate(image)
        now = time.time()
        created = dataclasses.replace(_copy(image), created_at=now, updated_at=now)
        with self._store.transaction() as conn:
            _namespaces.ensure(conn, namespace)
            try:
                self._write(conn, namespace, created, insert=True)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"image {quote(image.name)}") from None
        return created

    def get(self, namespace: str, name: str) -> Image:
        """The image ``name``; NotFound ``image "name"``."""
        _namespaces.require(namespace)
        with self._store.transaction(write=False) as conn:
            image = self._read(conn, namespace, name)
        if image is None:
            raise NotFound(f"image {quote(name)}")
        return image

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        """Images matching any of ``filters``, ordered by name."""
        _namespaces.require(namespace)
        match = _filters.parse(list(filters))
        with self._store.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM images WHERE namespace = ? ORDER BY name", (namespace,)
            ).fetchall()
        found = (_from_row(row) for row in rows)
        return [image for image in found if match.match(adaptor(image))]

    def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Apply the fields of ``image`` named by ``fieldpaths``, as containerd does.

        Paths: ``labels``, ``labels.<key>``, ``annotations``, ``annotations.<key>`` (the
        target's), ``target`` (replaced as a unit); an absent key removes the label or
        annotation; anything else is InvalidArgument. With no paths everything but the name
        and the creation time is replaced. NotFound ``image "x"`` when there is no such image
        (the ``ctr images import`` flow tries Update, then Create).
        """
        _namespaces.require(namespace)
        if not image.name:
            raise InvalidArgument("image name is required for update")
        with self._store.transaction() as conn:
            stored = self._read(conn, namespace, image.name)
            if stored is None:
                raise NotFound(f"image {quote(image.name)}")
            if not fieldpaths:
                updated = dataclasses.replace(
                    image, labels=dict(image.labels),
                    target=dataclasses.replace(image.target, annotations=dict(image.target.annotations)),
                )
            else:
                updated = stored
                _apply(updated, image, fieldpaths)
            validate(updated)
            updated = dataclasses.replace(_copy(updated), created_at=stored.created_at, updated_at=time.time())
            self._write(conn, namespace, updated, insert=False)
        return updated

    def delete(self, namespace: str, name: str) -> None:
        """Remove the record; NotFound ``image "name"``. What it kept goes at the next GC."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            cur = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
            if cur.rowcount == 0:
                raise NotFound(f"image {quote(name)}")

    @staticmethod
    def _read(conn: sqlite3.Connection, namespace: str, name: str) -> Image | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM images WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        return None if row is None else _from_row(row)

    @staticmethod
    def _write(conn: sqlite3.Connection, namespace: str, image: Image, *, insert: bool) -> None:
        t = image.target
        values = (_labels.dumps(image.labels), t.media_type, t.digest, t.size, _labels.dumps(t.annotations),
                  image.created_at, image.updated_at)
        if insert:
            conn.execute(
                f"INSERT INTO images (namespace, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, image.name, *values),
            )
        else:
            conn.execute(
                "UPDATE images SET labels = ?, target_media_type = ?, target_digest = ?, target_size = ?, "
                "target_annotations = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND name = ?",
                (*values, namespace, image.name),
            )


def _apply(updated: Image, given: Image, fieldpaths: Sequence[str]) -> None:
    """The field mask, applied in place to ``updated`` (the stored record)."""
    for path in fieldpaths:
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            updated.labels[key] = given.labels.get(key, "")  # "" removes it when stored
        elif path.startswith("annotations."):
            key = path.removeprefix("annotations.")
            updated.target.annotations[key] = given.target.annotations.get(key, "")
        elif path == "labels":
            updated.labels = dict(given.labels)
        elif path == "target":
            # replaced as a unit, annotations included (containerd: digest, size and media
            # type rarely make sense apart)
            updated.target = dataclasses.replace(given.target, annotations=dict(given.target.annotations))
        elif path == "annotations":
            updated.target.annotations = dict(given.target.annotations)
        else:
            raise InvalidArgument(f"cannot update {quote(path)} field on image {quote(given.name)}")
