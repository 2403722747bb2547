"""Image records (ketch.metadata store.images), ImageService events, and the v2 schema."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ketch import errdefs, topics
from ketch.images import Descriptor, Image, ImageService
from ketch.metadata import SCHEMA_VERSION, ContentRecordStore, ImageStore, Store
from ketch.metadata import schema

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def image(name: str = "docker.io/library/busybox:latest", digest: str = D1, media_type: str = INDEX,
          size: int = 1234, **kw: Any) -> Image:
    annotations = kw.pop("annotations", {})
    return Image(name, target=Descriptor(media_type, digest, size, annotations), **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "meta.db") as s:
        yield s


# --- schema ---------------------------------------------------------------------------------


def test_schema_v2_adds_content_ingests_and_images(store: Store) -> None:
    assert store.schema_version == SCHEMA_VERSION == len(schema.MIGRATIONS) >= 2
    with store.transaction(write=False) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"content", "content_ingests", "images"} <= tables
    ims: ImageStore = store.images
    crs: ContentRecordStore = store.content
    assert ims and crs


def test_a_version_1_file_is_migrated_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO namespaces (name) VALUES ('old')")
    conn.execute("COMMIT")
    conn.close()
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        assert [n.name for n in s.namespaces.list()] == ["old"]
        s.images.create("old", image())
        assert s.images.get("old", image().name).target.digest == D1


# --- CRUD --------------------------------------------------------------------------------------


def test_create_get_delete(store: Store) -> None:
    created = store.images.create("default", image(labels={"a": "b", "empty": ""}, annotations={"x": "y"}))
    assert created.labels == {"a": "b"}
    assert created.created_at == created.updated_at > 0
    got = store.images.get("default", created.name)
    assert got == created
    assert got.target == Descriptor(INDEX, D1, 1234, {"x": "y"})
    with pytest.raises(errdefs.AlreadyExists) as info:
        store.images.create("default", image())
    assert str(info.value) == 'image "docker.io/library/busybox:latest": already exists'
    store.images.delete("default", created.name)
    with pytest.raises(errdefs.NotFound) as nf:
        store.images.get("default", created.name)
    assert str(nf.value) == 'image "docker.io/library/busybox:latest": not found'
    with pytest.raises(errdefs.NotFound, match='image "docker.io/library/busybox:latest"'):
        store.images.delete("default", created.name)


def test_images_are_per_namespace(store: Store) -> None:
    store.images.create("a", image())
    with pytest.raises(errdefs.NotFound):
        store.images.get("b", image().name)
    store.images.create("b", image(digest=D2))
    assert store.images.get("a", image().name).target.digest == D1


@pytest.mark.parametrize("name", [
    "docker.io/library/busybox:latest",
    "localhost:5000/a/b@sha256:" + "1" * 64,
    "not an identifier at all/..",
    "x" * 300,
])
def test_names_are_references_not_identifiers(store: Store, name: str) -> None:
    assert store.images.create("default", image(name)).name == name


@pytest.mark.parametrize(("bad", "message"), [
    (image(""), "image name must not be empty"),
    (image(digest="sha256:abc"), 'Target.Digest "sha256:abc" invalid: invalid checksum digest length'),
    (image(digest=""), 'Target.Digest "" invalid'),
    (image(size=0), "Target.Size must be greater than zero"),
    (image(media_type=""), "Target.MediaType must be set"),
    (image(labels={"k": "v" * 5000}), "image.Labels: label key and value greater than maximum size"),
])
def test_create_validation(store: Store, bad: Image, message: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        store.images.create("default", bad)
    assert message in str(info.value)


def test_namespace_with_images_cannot_be_deleted(store: Store) -> None:
    store.images.create("busy", image())
    with pytest.raises(errdefs.FailedPrecondition, match="still has images"):
        store.namespaces.delete("busy")
    store.images.delete("busy", image().name)
    store.namespaces.delete("busy")


# --- list and filters --------------------------------------------------------------------------


def test_list_filters(store: Store) -> None:
    store.images.create("default", image("b.io/x:1", D1, INDEX, labels={"env": "prod"}))
    store.images.create("default", image("a.io/y:2", D2, MANIFEST, annotations={"org.opencontainers.x": "1"}))
    store.images.create("default", image("c.io/z:3", D2, INDEX, labels={"env": "dev"}))

    def names(*filters: str) -> list[str]:
        return [i.name for i in store.images.list("default", filters)]

    assert names() == ["a.io/y:2", "b.io/x:1", "c.io/z:3"]
    assert names("name==b.io/x:1") == ["b.io/x:1"]
    assert names("name~=^[ab]") == ["a.io/y:2", "b.io/x:1"]
    assert names(f"target.digest=={D2}") == ["a.io/y:2", "c.io/z:3"]
    assert names(f"target.mediatype=={MANIFEST}") == ["a.io/y:2"]
    assert names("labels.env==prod", "labels.env==dev") == ["b.io/x:1", "c.io/z:3"]
    assert names("labels.env") == ["b.io/x:1", "c.io/z:3"]
    assert names("labels.env!=prod") == ["a.io/y:2", "c.io/z:3"]
    assert names('annotations."org.opencontainers.x"==1') == ["a.io/y:2"]
    assert names(f"target.digest=={D2},labels.env==dev") == ["c.io/z:3"]
    with pytest.raises(errdefs.InvalidArgument):
        names("name==")


# --- update ------------------------------------------------------------------------------------


def test_update_field_paths(store: Store) -> None:
    created = store.images.create(
        "default", image(labels={"a": "1", "b": "2"}, annotations={"x": "1", "y": "2"}))
    name = created.name

    upd = store.images.update("default", image(labels={"a": "10", "c": "3"}), ["labels.a", "labels.c"])
    assert upd.labels == {"a": "10", "b": "2", "c": "3"}
    assert upd.target.annotations == {"x": "1", "y": "2"}, "untouched"
    assert upd.created_at == created.created_at and upd.updated_at >= created.updated_at

    upd = store.images.update("default", image(labels={}), ["labels.b"])
    assert upd.labels == {"a": "10", "c": "3"}, "an absent key removes the label"

    upd = store.images.update("default", image(labels={"only": "this"}), ["labels"])
    assert upd.labels == {"only": "this"}

    upd = store.images.update("default", image(annotations={"x": "9"}), ["annotations.x", "annotations.y"])
    assert upd.target.annotations == {"x": "9"}
    assert upd.target.digest == D1, "annotation paths leave the rest of the target alone"

    upd = store.images.update("default", image(annotations={"z": "1"}), ["annotations"])
    assert upd.target.annotations == {"z": "1"}

    upd = store.images.update("default", image(digest=D2, media_type=MANIFEST, size=99), ["target"])
    assert upd.target == Descriptor(MANIFEST, D2, 99, {}), "the target is replaced as a unit"
    assert upd.labels == {"only": "this"}
    assert store.images.get("default", name) == upd

    with pytest.raises(errdefs.InvalidArgument, match='cannot update "name" field on image'):
        store.images.update("default", image(), ["name"])
    with pytest.raises(errdefs.InvalidArgument, match="Target.Size must be greater than zero"):
        store.images.update("default", image(size=0), ["target"])
    assert store.images.get("default", name) == upd, "a failed update changes nothing"


def test_update_without_paths_replaces_all_but_name_and_creation(store: Store) -> None:
    created = store.images.create("default", image(labels={"a": "1"}, annotations={"x": "1"}))
    upd = store.images.update("default", image(digest=D2, labels={"b": "2"}))
    assert (upd.labels, upd.target) == ({"b": "2"}, Descriptor(INDEX, D2, 1234, {}))
    assert upd.created_at == created.created_at
    assert store.images.get("default", created.name) == upd


def test_update_of_a_missing_image_is_not_found_then_create(store: Store) -> None:
    """``ctr images import``: Images/Update → NotFound → Images/Create."""
    with pytest.raises(errdefs.NotFound, match='image "docker.io/library/busybox:latest": not found'):
        store.images.update("default", image())
    store.images.create("default", image())
    with pytest.raises(errdefs.InvalidArgument, match="image name is required for update"):
        store.images.update("default", image(""))


# --- the service: events -------------------------------------------------------------------------


def test_service_publishes_image_events(store: Store) -> None:
    seen: list[tuple[str, str, Any]] = []
    svc = ImageService(store, publish=lambda ns, msg: seen.append((ns, topics.of(msg), msg)))
    svc.create("k8s.io", image(labels={"a": "b"}))
    svc.update("k8s.io", image(labels={"a": "c"}), ["labels"])
    assert [i.name for i in svc.list("k8s.io")] == [image().name]
    assert svc.get("k8s.io", image().name).labels == {"a": "c"}
    svc.delete("k8s.io", image().name)
    svc.create("k8s.io", image())
    svc.delete("k8s.io", image().name)

    published = [(ns, topic, type(msg).DESCRIPTOR.full_name) for ns, topic, msg in seen]
    assert published[:3] == [
        ("k8s.io", "/images/create", "containerd.services.images.v1.ImageCreate"),
        ("k8s.io", "/images/update", "containerd.services.images.v1.ImageUpdate"),
        ("k8s.io", "/images/delete", "containerd.services.images.v1.ImageDelete"),
    ]
    assert (seen[0][2].name, dict(seen[0][2].labels)) == (image().name, {"a": "b"})
    assert dict(seen[1][2].labels) == {"a": "c"}
    assert seen[2][2].name == image().name
    # a failed call publishes nothing
    with pytest.raises(errdefs.NotFound):
        svc.delete("k8s.io", "missing")
    assert len(seen) == 5
