"""Container records (containerd ``metadata/containers.go``, ``metadata/adaptors.go``)."""

from __future__ import annotations

import builtins
import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ketch import filters as _filters
from ketch import identifiers
from ketch.errdefs import AlreadyExists, InvalidArgument, NotFound
from ketch.identifiers import quote
from ketch.metadata import _namespaces
from ketch.metadata import labels as _labels
from ketch.metadata.types import Container, Runtime, TypedValue

if TYPE_CHECKING:
    from ketch.metadata.store import Store

#: what an update with no field paths replaces (containerd's list)
DEFAULT_FIELDPATHS = ("labels", "spec", "extensions", "image", "snapshotkey")

_COLUMNS = (
    "id, labels, image, runtime_name, runtime_options_type, runtime_options, spec_type, spec, "
    "snapshotter, snapshot_key, created_at, updated_at"
)


def adaptor(container: Container) -> _filters.Adaptor:
    """The filter fields of a container: ``id``, ``image``, ``runtime.name``, ``labels.<key>``,
    as containerd; plus ``snapshotter`` and ``snapshot_key`` (ketch's addition)."""
    return _filters.adaptor_for(
        {
            "id": container.id,
            "image": container.image,
            "runtime": {"name": container.runtime.name},
            "labels": container.labels,
            "snapshotter": container.snapshotter,
            "snapshot_key": container.snapshot_key,
        }
    )


def _validate(container: Container) -> None:
    """containerd's validateContainer, raising InvalidArgument with its words."""
    try:
        identifiers.validate(container.id)
    except InvalidArgument as exc:
        raise InvalidArgument(f"container.ID: {exc.message}") from None
    if any(k == "" for k in container.extensions):
        raise InvalidArgument("container.Extension keys must not be zero-length")
    for k, v in container.labels.items():
        try:
            _labels.validate(k, v)
        except InvalidArgument as exc:
            raise InvalidArgument(f"containers.Labels: {exc.message}") from None
    if not container.runtime.name:
        raise InvalidArgument("container.Runtime.Name must be set")
    if container.spec is None:
        raise InvalidArgument("container.Spec must be set")
    if container.snapshot_key and not container.snapshotter:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def _typed(type_url: str | None, value: bytes | None) -> TypedValue | None:
    if type_url is None:
        return None
    return TypedValue(type_url, bytes(value or b""))


def _from_row(row: Sequence[Any], extensions: dict[str, TypedValue]) -> Container:
    (id_, labels, image, rt_name, rt_type, rt_value, spec_type, spec, snapshotter, snapshot_key,
     created_at, updated_at) = row
    return Container(
        id=id_,
        labels=_labels.loads(labels),
        image=image,
        runtime=Runtime(rt_name, _typed(rt_type, rt_value)),
        spec=_typed(spec_type, spec),
        snapshotter=snapshotter,
        snapshot_key=snapshot_key,
        created_at=created_at,
        updated_at=updated_at,
        extensions=extensions,
    )


def _extensions(conn: sqlite3.Connection, namespace: str, id: str | None = None) -> dict[str, dict[str, TypedValue]]:
    sql = "SELECT container_id, name, type_url, value FROM container_extensions WHERE namespace = ?"
    args: tuple[str, ...] = (namespace,)
    if id is not None:
        sql += " AND container_id = ?"
        args += (id,)
    out: dict[str, dict[str, TypedValue]] = {}
    for cid, name, type_url, value in conn.execute(sql + " ORDER BY container_id, name", args):
        out.setdefault(cid, {})[name] = TypedValue(type_url, bytes(value))
    return out


def _write_extensions(conn: sqlite3.Connection, namespace: str, container: Container) -> None:
    conn.execute("DELETE FROM container_extensions WHERE namespace = ? AND container_id = ?", (namespace, container.id))
    conn.executemany(
        "INSERT INTO container_extensions (namespace, container_id, name, type_url, value) VALUES (?, ?, ?, ?, ?)",
        [(namespace, container.id, k, v.type_url, v.value) for k, v in sorted(container.extensions.items())],
    )


def _any_columns(value: TypedValue | None) -> tuple[str | None, bytes | None]:
    return (None, None) if value is None else (value.type_url, value.value)


def _copy(container: Container) -> Container:
    return dataclasses.replace(container, labels=dict(container.labels), extensions=dict(container.extensions))


class Containers:
    """The :class:`~ketch.metadata.types.ContainerStore` over SQLite."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def create(self, namespace: str, container: Container) -> Container:
        """Store a new container, creating the namespace on first use; returns it as stored."""
        _namespaces.require(namespace)
        try:
            _validate(container)
        except InvalidArgument as exc:
            raise InvalidArgument(f"create container failed validation: {exc.message}") from None
        now = time.time()
        created = dataclasses.replace(
            _copy(container), labels=_labels.clean(container.labels), created_at=now, updated_at=now
        )
        with self._store.transaction() as conn:
            _namespaces.ensure(conn, namespace)
            try:
                conn.execute(
                    f"INSERT INTO containers (namespace, {_COLUMNS}) VALUES (?{', ?' * 12})",
                    (namespace, created.id, _labels.dumps(created.labels), created.image, created.runtime.name,
                     *_any_columns(created.runtime.options), *_any_columns(created.spec),
                     created.snapshotter, created.snapshot_key, now, now),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"container {quote(created.id)}") from None
            _write_extensions(conn, namespace, created)
        return created

    def get(self, namespace: str, id: str) -> Container:
        """The container ``id``; NotFound ``container "id" in namespace "ns"`` if there is none."""
        _namespaces.require(namespace)
        with self._store.transaction(write=False) as conn:
            container = self._read(conn, namespace, id)
        if container is None:
            raise NotFound(f"container {quote(id)} in namespace {quote(namespace)}")
        return container

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Container]:
        """Containers matching any of ``filters`` (an empty list matches all), ordered by id."""
        _namespaces.require(namespace)
        match = _filters.parse(list(filters))
        with self._store.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? ORDER BY id", (namespace,)
            ).fetchall()
            extensions = _extensions(conn, namespace) if rows else {}
        found = (_from_row(row, extensions.get(row[0], {})) for row in rows)
        return [c for c in found if match.match(adaptor(c))]

    def update(self, namespace: str, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        """Apply the fields of ``container`` named by ``fieldpaths``, as containerd does.

        Paths: ``labels``, ``labels.<key>``, ``image``, ``spec``, ``snapshotkey``, ``extensions``,
        ``extensions.<key>`` (an absent key removes the label or extension); anything else is
        InvalidArgument. With no paths all of these are replaced, and ``runtime.name`` and
        ``snapshotter`` must equal the stored ones (they are immutable).
        """
        _namespaces.require(namespace)
        if not container.id:
            raise InvalidArgument("must specify a container id")
        with self._store.transaction() as conn:
            updated = self._read(conn, namespace, container.id)
            if updated is None:
                if not _namespaces.exists(conn, namespace):
                    raise NotFound(f"cannot update container {quote(container.id)} in namespace {quote(namespace)}")
                raise NotFound(f"container {quote(container.id)}")
            if not fieldpaths:
                fieldpaths = DEFAULT_FIELDPATHS
                if updated.snapshotter != container.snapshotter:
                    raise InvalidArgument("container.Snapshotter field is immutable")
                if updated.runtime.name != container.runtime.name:
                    raise InvalidArgument("container.Runtime.Name field is immutable")
            _apply(updated, container, fieldpaths)
            try:
                _validate(updated)
            except InvalidArgument as exc:
                raise InvalidArgument(f"update failed validation: {exc.message}") from None
            updated.labels = _labels.clean(updated.labels)
            updated.updated_at = time.time()
            conn.execute(
                "UPDATE containers SET labels = ?, image = ?, spec_type = ?, spec = ?, snapshot_key = ?, "
                "updated_at = ? WHERE namespace = ? AND id = ?",
                (_labels.dumps(updated.labels), updated.image, *_any_columns(updated.spec),
                 updated.snapshot_key, updated.updated_at, namespace, updated.id),
            )
            _write_extensions(conn, namespace, updated)
        return updated

    def delete(self, namespace: str, id: str) -> None:
        """Remove the record (its extensions go with it); NotFound if there is none."""
        _namespaces.require(namespace)
        with self._store.transaction() as conn:
            cur = conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, id))
            if cur.rowcount == 0:
                if not _namespaces.exists(conn, namespace):
                    raise NotFound(f"cannot delete container {quote(id)} in namespace {quote(namespace)}")
                raise NotFound(f"container {id}")

    def _read(self, conn: sqlite3.Connection, namespace: str, id: str) -> Container | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? AND id = ?", (namespace, id)
        ).fetchone()
        if row is None:
            return None
        return _from_row(row, _extensions(conn, namespace, id).get(id, {}))


def _apply(updated: Container, given: Container, fieldpaths: Sequence[str]) -> None:
    """The field mask, applied in place to ``updated`` (the stored record)."""
    for path in fieldpaths:
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            updated.labels[key] = given.labels.get(key, "")  # "" removes it when stored
        elif path.startswith("extensions."):
            key = path.removeprefix("extensions.")
            if key in given.extensions:
                updated.extensions[key] = given.extensions[key]
            else:
                updated.extensions.pop(key, None)
        elif path == "labels":
            updated.labels = dict(given.labels)
        elif path == "spec":
            updated.spec = given.spec
        elif path == "extensions":
            updated.extensions = dict(given.extensions)
        elif path == "image":
            updated.image = given.image
        elif path == "snapshotkey":
            updated.snapshot_key = given.snapshot_key
        else:
            raise InvalidArgument(f"cannot update {quote(path)} field on {quote(given.id)}")
