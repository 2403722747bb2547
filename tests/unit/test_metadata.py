"""ketch.metadata: the SQLite store of namespaces, containers and leases."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.metadata import (
    SCHEMA_VERSION,
    Container,
    ContainerStore,
    LeaseResource,
    LeaseStore,
    NamespaceStore,
    Runtime,
    Store,
    TypedValue,
)
from ketch.metadata import schema

SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.0.2"}')
RUNC = Runtime("io.containerd.runc.v2", TypedValue("containerd.runc.v1.Options", b"\x32\x04runc"))
DIGEST = "sha256:" + "ab" * 32


def container(id: str = "web", **kw: object) -> Container:
    fields: dict[str, object] = {"runtime": RUNC, "spec": SPEC}
    fields.update(kw)
    return Container(id, **fields)  # type: ignore[arg-type]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as s:
        yield s


# --- the file ------------------------------------------------------------------------------


def test_new_file_is_migrated_to_the_current_version(db_path: Path) -> None:
    with Store(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION == len(schema.MIGRATIONS)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"namespaces", "containers", "container_extensions", "leases", "lease_resources"} <= tables
    finally:
        conn.close()


def test_an_empty_file_is_migrated(db_path: Path) -> None:
    db_path.write_bytes(b"")
    with Store(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.namespaces.create("default")


def test_migrations_run_in_order_from_the_recorded_version(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(db_path) as s:
        s.namespaces.create("kept")
    ran: list[int] = []

    def v2(conn: sqlite3.Connection) -> None:
        ran.append(2)
        conn.execute("ALTER TABLE namespaces ADD COLUMN note TEXT NOT NULL DEFAULT ''")

    def v3(conn: sqlite3.Connection) -> None:
        ran.append(3)
        conn.execute("UPDATE namespaces SET note = 'migrated'")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, v2, v3))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    with Store(db_path) as s:
        assert ran == [2, 3]
        assert s.schema_version == SCHEMA_VERSION + 2
        with s.transaction(write=False) as conn:
            assert conn.execute("SELECT name, note FROM namespaces").fetchall() == [("kept", "migrated")]


def test_a_failing_migration_changes_nothing(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(db_path).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration failed")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError):
        Store(db_path)
    monkeypatch.undo()
    with Store(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION
        with s.transaction(write=False) as conn:
            assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half_done'").fetchone() is None


def test_metadata_imports_no_grpc() -> None:
    code = "import sys, ketch.metadata; print(any(m.split('.')[0] == 'grpc' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_reopening_runs_no_migration_again(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert schema.migrate(conn) == SCHEMA_VERSION
    finally:
        conn.close()


def test_a_newer_file_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(errdefs.FailedPrecondition, match="newer than this ketch supports"):
        Store(db_path)


def test_foreign_keys_are_on(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO leases (namespace, id, created_at) VALUES ('nowhere', 'l', 0)"
            )


def test_the_stores_conform_to_their_protocols(store: Store) -> None:
    ns: NamespaceStore = store.namespaces
    cs: ContainerStore = store.containers
    ls: LeaseStore = store.leases
    assert ns and cs and ls


def test_data_survives_reopening(db_path: Path) -> None:
    with Store(db_path) as s:
        s.namespaces.create("k8s.io", {"a": "b"})
        created = s.containers.create("k8s.io", container(labels={"x": "y"}, extensions={"e": TypedValue("t", b"v")}))
        s.leases.create("k8s.io", "pull-1", {"containerd.io/gc.expire": "2030-01-01T00:00:00Z"})
        s.leases.add_resource("k8s.io", "pull-1", LeaseResource(DIGEST, "content"))
    with Store(db_path) as s:
        assert s.namespaces.get("k8s.io").labels == {"a": "b"}
        assert s.containers.get("k8s.io", "web") == created
        assert [lease.id for lease in s.leases.list("k8s.io")] == ["pull-1"]
        assert s.leases.list_resources("k8s.io", "pull-1") == [LeaseResource(DIGEST, "content")]


def test_two_stores_on_one_file(db_path: Path) -> None:
    with Store(db_path) as a, Store(db_path) as b:
        a.containers.create("default", container("one"))
        assert [c.id for c in b.containers.list("default")] == ["one"]
        b.containers.create("default", container("two"))
        with pytest.raises(errdefs.AlreadyExists):
            a.containers.create("default", container("two"))
        with a.transaction(write=False):
            # a reader holds a snapshot; the other store can still write (WAL)
            b.containers.delete("default", "one")
        assert [c.id for c in a.containers.list("default")] == ["two"]


def test_threads_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                store.containers.create("default", container(f"c{n}-{i}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.containers.list("default")) == 80


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.containers.create("default", container("a"))
            store.leases.create("default", "l")
            raise RuntimeError("boom")
    assert store.containers.list("default") == []
    assert store.namespaces.list() == []


def test_a_failed_call_inside_a_transaction_undoes_only_itself(store: Store) -> None:
    with store.transaction():
        store.containers.create("default", container("a"))
        with pytest.raises(errdefs.AlreadyExists):
            # would create namespace "other" first, then fail on the container in "default"
            with store.transaction():
                store.namespaces.create("other")
                store.containers.create("default", container("a"))
        store.leases.create("default", "l")
    assert [c.id for c in store.containers.list("default")] == ["a"]
    assert [lease.id for lease in store.leases.list("default")] == ["l"]
    assert [n.name for n in store.namespaces.list()] == ["default"]


# --- namespaces ----------------------------------------------------------------------------


def test_namespace_crud(store: Store) -> None:
    created = store.namespaces.create("moby", {"owner": "docker", "empty": ""})
    assert created.labels == {"owner": "docker"}
    assert store.namespaces.get("moby").labels == {"owner": "docker"}
    store.namespaces.create("default")
    assert [n.name for n in store.namespaces.list()] == ["default", "moby"]
    store.namespaces.delete("moby")
    with pytest.raises(errdefs.NotFound) as info:
        store.namespaces.get("moby")
    assert str(info.value) == 'namespace "moby": not found'
    with pytest.raises(errdefs.NotFound):
        store.namespaces.delete("moby")


def test_namespace_create_errors(store: Store) -> None:
    store.namespaces.create("x")
    with pytest.raises(errdefs.AlreadyExists) as info:
        store.namespaces.create("x")
    assert str(info.value) == 'namespace "x": already exists'
    with pytest.raises(errdefs.InvalidArgument, match="must match"):
        store.namespaces.create("../x")
    with pytest.raises(errdefs.InvalidArgument) as invalid:
        store.namespaces.create("y", {"k": "v" * 4096})
    assert str(invalid.value) == (
        "namespace.Labels: label key and value greater than maximum size (4096 bytes), key: k: invalid argument"
    )


def test_namespace_update(store: Store) -> None:
    store.namespaces.create("ns", {"a": "1", "b": "2"})
    assert store.namespaces.update("ns", {"c": "3"}).labels == {"c": "3"}
    assert store.namespaces.update("ns", {"a": "9", "z": "ignored"}, ["labels.a"]).labels == {"a": "9", "c": "3"}
    assert store.namespaces.update("ns", {}, ["labels.c"]).labels == {"a": "9"}
    assert store.namespaces.update("ns", {"q": "r"}, ["labels"]).labels == {"q": "r"}
    assert store.namespaces.get("ns").labels == {"q": "r"}
    with pytest.raises(errdefs.InvalidArgument) as info:
        store.namespaces.update("ns", {}, ["name"])
    assert str(info.value) == 'cannot update "name" field: invalid argument'
    # as in containerd, labelling a namespace that does not exist creates it
    assert store.namespaces.update("fresh", {"k": "v"}).labels == {"k": "v"}
    assert store.namespaces.get("fresh").labels == {"k": "v"}


def test_namespace_ensure(store: Store) -> None:
    assert store.namespaces.ensure("default") is True
    assert store.namespaces.ensure("default") is False
    with pytest.raises(errdefs.InvalidArgument):
        store.namespaces.ensure("a/b")


def test_namespace_delete_refused_while_it_holds_containers(store: Store) -> None:
    store.containers.create("busy", container())
    with pytest.raises(errdefs.FailedPrecondition) as info:
        store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has containers: failed precondition'
    store.containers.delete("busy", "web")
    store.namespaces.delete("busy")


def test_namespace_delete_takes_its_leases(store: Store) -> None:
    store.leases.create("ns", "l1")
    store.leases.add_resource("ns", "l1", LeaseResource("ingest-ref", "ingests"))
    store.namespaces.delete("ns")
    assert store.leases.list("ns") == []
    with store.transaction(write=False) as conn:
        assert conn.execute("SELECT count(*) FROM lease_resources").fetchone()[0] == 0


# --- containers ----------------------------------------------------------------------------


def test_container_create_and_get(store: Store) -> None:
    given = container(
        labels={"app": "web", "drop": ""},
        image="docker.io/library/redis:7",
        snapshotter="overlayfs",
        snapshot_key="web-snap",
        extensions={"ext": TypedValue("ketch.test.Ext", b"\x01")},
    )
    created = store.containers.create("default", given)
    assert given.labels == {"app": "web", "drop": ""}, "the argument is not changed"
    assert created.labels == {"app": "web"}
    assert created.created_at == created.updated_at > 0
    got = store.containers.get("default", "web")
    assert got == created
    assert got.runtime == RUNC and got.spec == SPEC
    assert got.extensions == {"ext": TypedValue("ketch.test.Ext", b"\x01")}
    # the namespace appeared on first use
    assert [n.name for n in store.namespaces.list()] == ["default"]


def test_container_create_errors(store: Store) -> None:
    store.containers.create("default", container())
    with pytest.raises(errdefs.AlreadyExists) as info:
        store.containers.create("default", container())
    assert str(info.value) == 'container "web": already exists'
    # the same id in another namespace is another container
    store.containers.create("other", container())

    cases = {
        "../x": 'create container failed validation: container.ID: identifier "../x" must match '
        "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$",
        "": "create container failed validation: container.ID: identifier must not be empty",
    }
    for id, message in cases.items():
        with pytest.raises(errdefs.InvalidArgument) as invalid:
            store.containers.create("default", container(id))
        assert invalid.value.message == message
    bad = [
        (container("a", runtime=Runtime("")), "container.Runtime.Name must be set"),
        (container("a", spec=None), "container.Spec must be set"),
        (container("a", snapshot_key="k"), "container.Snapshotter must be set if container.SnapshotKey is set"),
        (container("a", extensions={"": SPEC}), "container.Extension keys must not be zero-length"),
        (
            container("a", labels={"averylongkey": "v" * 4090}),
            "containers.Labels: label key and value greater than maximum size (4096 bytes), key: averylongk",
        ),
    ]
    for c, message in bad:
        with pytest.raises(errdefs.InvalidArgument) as invalid:
            store.containers.create("default", c)
        assert invalid.value.message == "create container failed validation: " + message
    assert [c.id for c in store.containers.list("default")] == ["web"]


def test_namespace_is_required(store: Store) -> None:
    with pytest.raises(errdefs.FailedPrecondition) as info:
        store.containers.get("", "web")
    assert str(info.value) == "namespace is required: failed precondition"
    with pytest.raises(errdefs.InvalidArgument, match="^namespace validation: identifier"):
        store.containers.list("a/b")
    with pytest.raises(errdefs.InvalidArgument):
        store.leases.create("..", "l")


def test_container_get_and_delete_not_found(store: Store) -> None:
    with pytest.raises(errdefs.NotFound) as info:
        store.containers.get("default", "nope")
    assert str(info.value) == 'container "nope" in namespace "default": not found'
    with pytest.raises(errdefs.NotFound) as info:
        store.containers.delete("default", "nope")
    assert str(info.value) == 'cannot delete container "nope" in namespace "default": not found'
    store.containers.create("default", container())
    store.containers.delete("default", "web")
    with pytest.raises(errdefs.NotFound) as info:
        store.containers.delete("default", "web")
    assert str(info.value) == "container web: not found"


def test_container_delete_removes_extensions(store: Store) -> None:
    store.containers.create("default", container(extensions={"e": SPEC}))
    store.containers.delete("default", "web")
    with store.transaction(write=False) as conn:
        assert conn.execute("SELECT count(*) FROM container_extensions").fetchone()[0] == 0


def test_container_list_filters(store: Store) -> None:
    store.containers.create("default", container("b-web", labels={"app": "web", "com.example.tier": "front"}, image="nginx"))
    store.containers.create("default", container("a-db", labels={"app": "db"}, image="postgres"))
    store.containers.create(
        "default", container("c-job", runtime=Runtime("io.containerd.ketch.v2"), snapshotter="native", snapshot_key="k")
    )
    store.containers.create("elsewhere", container("z"))

    def ids(*filters: str) -> list[str]:
        return [c.id for c in store.containers.list("default", list(filters))]

    assert ids() == ["a-db", "b-web", "c-job"]
    assert ids("labels.app==web") == ["b-web"]
    assert ids('labels."app"==web') == ["b-web"]
    assert ids("labels.com.example.tier==front") == ["b-web"]
    assert ids("labels.app") == ["a-db", "b-web"]
    assert ids("image==nginx", "image==postgres") == ["a-db", "b-web"]
    assert ids("id~=^a") == ["a-db"]
    assert ids("runtime.name==io.containerd.ketch.v2") == ["c-job"]
    assert ids("runtime.name!=io.containerd.ketch.v2") == ["a-db", "b-web"]
    assert ids("snapshotter==native,snapshot_key==k") == ["c-job"]
    assert ids("labels.app==web,image==postgres") == []
    assert store.containers.list("empty-namespace") == []
    with pytest.raises(errdefs.InvalidArgument, match="^filters: parse error"):
        store.containers.list("default", ["labels.app=="])


def test_container_update_full_replace(store: Store) -> None:
    created = store.containers.create(
        "default",
        container(labels={"a": "1"}, image="old", snapshotter="overlayfs", snapshot_key="k1", extensions={"e": SPEC}),
    )
    new_spec = TypedValue(SPEC.type_url, b'{"ociVersion":"1.1.0"}')
    given = dataclasses.replace(
        created, labels={"b": "2"}, image="new", spec=new_spec, snapshot_key="k2", extensions={}
    )
    updated = store.containers.update("default", given)
    assert updated.labels == {"b": "2"}
    assert (updated.image, updated.spec, updated.snapshot_key, updated.extensions) == ("new", new_spec, "k2", {})
    assert updated.created_at == created.created_at
    assert updated.updated_at >= created.updated_at
    assert store.containers.get("default", "web") == updated

    with pytest.raises(errdefs.InvalidArgument) as info:
        store.containers.update("default", dataclasses.replace(updated, snapshotter="native"))
    assert info.value.message == "container.Snapshotter field is immutable"
    with pytest.raises(errdefs.InvalidArgument) as info:
        store.containers.update("default", dataclasses.replace(updated, runtime=Runtime("other")))
    assert info.value.message == "container.Runtime.Name field is immutable"


def test_container_update_with_field_paths(store: Store) -> None:
    store.containers.create(
        "default", container(labels={"a": "1", "b": "2"}, image="img", extensions={"x": SPEC, "y": SPEC})
    )
    ext = TypedValue("ketch.test.Ext", b"z")
    given = container(labels={"a": "9", "c": "3"}, image="ignored", runtime=Runtime("ignored"), extensions={"y": ext})
    updated = store.containers.update("default", given, ["labels.a", "labels.b", "extensions.y", "extensions.x"])
    assert updated.labels == {"a": "9"}  # b had no value in the request: removed
    assert updated.image == "img"
    assert updated.runtime == RUNC  # immutable fields are never taken from the request
    assert updated.extensions == {"y": ext}
    updated = store.containers.update("default", given, ["labels", "image"])
    assert (updated.labels, updated.image) == ({"a": "9", "c": "3"}, "ignored")
    assert store.containers.get("default", "web") == updated

    for path in ("runtime", "snapshotter", "id", "labels_typo"):
        with pytest.raises(errdefs.InvalidArgument) as info:
            store.containers.update("default", given, [path])
        assert info.value.message == f'cannot update "{path}" field on "web"'
    with pytest.raises(errdefs.InvalidArgument, match="update failed validation: container.Spec must be set"):
        store.containers.update("default", container(spec=None), ["spec"])
    with pytest.raises(errdefs.InvalidArgument, match="update failed validation: container.Snapshotter must be set"):
        store.containers.update("default", container(snapshot_key="k"), ["snapshotkey"])
    assert store.containers.get("default", "web") == updated, "failed updates change nothing"


def test_container_update_errors(store: Store) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        store.containers.update("default", container(""))
    assert info.value.message == "must specify a container id"
    with pytest.raises(errdefs.NotFound) as missing:
        store.containers.update("default", container("ghost"))
    assert missing.value.message == 'cannot update container "ghost" in namespace "default"'
    store.containers.create("default", container())
    with pytest.raises(errdefs.NotFound) as missing:
        store.containers.update("default", container("ghost"))
    assert missing.value.message == 'container "ghost"'


# --- leases --------------------------------------------------------------------------------


def test_lease_crud(store: Store) -> None:
    lease = store.leases.create("default", "l2", {"containerd.io/gc.expire": "2030-01-01T00:00:00Z", "e": ""})
    assert lease.labels == {"containerd.io/gc.expire": "2030-01-01T00:00:00Z"}
    assert lease.created_at > 0
    store.leases.create("default", "l1")
    assert [lease.id for lease in store.leases.list("default")] == ["l1", "l2"]
    with pytest.raises(errdefs.InvalidArgument, match="quoted literal not terminated"):
        store.leases.list("default", ["labels.containerd.io/gc.expire"])  # "/" opens a quote
    assert [lease.id for lease in store.leases.list("default", ['labels."containerd.io/gc.expire"'])] == ["l2"]
    assert [lease.id for lease in store.leases.list("default", ["id==l1"])] == ["l1"]
    with pytest.raises(errdefs.AlreadyExists) as info:
        store.leases.create("default", "l1")
    assert str(info.value) == 'lease "l1": already exists'
    with pytest.raises(errdefs.InvalidArgument):
        store.leases.create("default", "")
    store.leases.delete("default", "l1")
    with pytest.raises(errdefs.NotFound) as missing:
        store.leases.delete("default", "l1")
    assert str(missing.value) == 'lease "l1": not found'


def test_lease_resources(store: Store) -> None:
    store.leases.create("default", "l")
    resources = [
        LeaseResource("snap-b", "snapshots/overlayfs"),
        LeaseResource("ref-1", "ingests"),
        LeaseResource(DIGEST, "content"),
        LeaseResource("snap-a", "snapshots/native"),
    ]
    for r in resources:
        store.leases.add_resource("default", "l", r)
    store.leases.add_resource("default", "l", resources[0])  # twice is fine
    assert store.leases.list_resources("default", "l") == [
        LeaseResource(DIGEST, "content"),
        LeaseResource("ref-1", "ingests"),
        LeaseResource("snap-a", "snapshots/native"),
        LeaseResource("snap-b", "snapshots/overlayfs"),
    ]
    store.leases.delete_resource("default", "l", resources[1])
    store.leases.delete_resource("default", "l", resources[1])  # already gone: fine
    assert LeaseResource("ref-1", "ingests") not in store.leases.list_resources("default", "l")

    with pytest.raises(errdefs.NotFound):
        store.leases.add_resource("default", "nope", resources[0])
    with pytest.raises(errdefs.NotFound):
        store.leases.list_resources("default", "nope")
    with pytest.raises(errdefs.Unimplemented) as info:
        store.leases.add_resource("default", "l", LeaseResource("x", "images"))
    assert str(info.value) == "resource type images not supported yet: not implemented"
    with pytest.raises(errdefs.InvalidArgument, match="invalid snapshot resource type snapshots"):
        store.leases.add_resource("default", "l", LeaseResource("x", "snapshots"))
    with pytest.raises(errdefs.InvalidArgument, match="invalid resource type content/x"):
        store.leases.add_resource("default", "l", LeaseResource(DIGEST, "content/x"))
    for bad, why in [
        ("sha256:abc", "invalid checksum digest length"),
        ("abc", "invalid checksum digest format"),
        ("md5:" + "a" * 32, "unsupported digest algorithm"),
        ("sha256:" + "AB" * 32, "invalid checksum digest format"),
    ]:
        with pytest.raises(errdefs.InvalidArgument) as invalid:
            store.leases.add_resource("default", "l", LeaseResource(bad, "content"))
        assert invalid.value.message == f"invalid content resource id {bad}: {why}"

    store.leases.delete("default", "l")
    with store.transaction(write=False) as conn:
        assert conn.execute("SELECT count(*) FROM lease_resources").fetchone()[0] == 0
