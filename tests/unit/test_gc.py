"""ketch.gc: marking from images, containers, leases and gc labels; sweeping rows, files,
ingests, expired leases and snapshots (through a fake snapshotter: the thing tested is the
marking, not a snapshotter)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ketch import errdefs, gc
from ketch.content import ContentStore, Info
from ketch.images import Descriptor, Image
from ketch.metadata import Container, LeaseResource, Runtime, Store, TypedValue

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- a fake snapshotter: just enough of SnapshotterLike ----------------------------------------


@dataclass(frozen=True)
class Ref:
    key: str
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    kind: str = "committed"


class FakeSnapshotter:
    def __init__(self, name: str = "overlayfs") -> None:
        self.name = name
        self.snaps: dict[str, dict[str, Ref]] = {}
        self.removed: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def add(self, ns: str, key: str, parent: str = "", **labels: str) -> None:
        self.snaps.setdefault(ns, {})[key] = Ref(key, parent, labels)

    def walk_refs(self, namespace: str) -> list[Ref]:
        return list(self.snaps.get(namespace, {}).values())

    def remove(self, namespace: str, key: str) -> None:
        snaps = self.snaps.get(namespace, {})
        if key not in snaps:
            raise errdefs.NotFound(f"snapshot {key}")
        if key in self.refuse or any(r.parent == key for r in snaps.values()):
            raise errdefs.FailedPrecondition(f"cannot remove snapshot {key} with children")
        del snaps[key]
        self.removed.append((namespace, key))

    def namespaces(self) -> list[str]:
        return sorted(ns for ns, snaps in self.snaps.items() if snaps)

    def cleanup(self) -> list[str]:
        return []

    def keys(self, ns: str = "default") -> set[str]:
        return set(self.snaps.get(ns, {}))


def _conforms(s: FakeSnapshotter) -> gc.SnapshotterLike:
    return s  # the static check that the fake implements the Protocol


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "meta.db") as s:
        yield s


@pytest.fixture
def cs(tmp_path: Path, store: Store) -> ContentStore:
    return ContentStore(tmp_path / "content", store)


@pytest.fixture
def snaps() -> FakeSnapshotter:
    return FakeSnapshotter()


def put(cs: ContentStore, data: bytes, ns: str = "default", lease: str | None = None, **labels: str) -> str:
    with cs.writer(ns, f"ref-{sha(data)}", lease=lease) as w:
        w.write(data)
        w.commit(len(data), sha(data), labels)
    return sha(data)


def on_disk(cs: ContentStore) -> set[str]:
    return {f"sha256:{n}" for n in os.listdir(os.path.join(cs.root, "blobs", "sha256"))}


def held(cs: ContentStore, ns: str = "default") -> set[str]:
    return {i.digest for i in cs.list(ns)}


def pull_image(cs: ContentStore, store: Store, ns: str = "default", name: str = "docker.io/library/app:1",
               tag: bytes = b"") -> dict[str, str]:
    """What a pull leaves: layers, a config, a manifest referring to both, an image record."""
    layers = [put(cs, b"layer-%d" % i + tag, ns) for i in range(2)]
    config = put(cs, b'{"rootfs":{}}' + tag, ns)
    manifest_bytes = json.dumps({"config": config, "layers": layers}).encode() + tag
    refs = {"containerd.io/gc.ref.content.config": config}
    refs.update({f"containerd.io/gc.ref.content.l.{i}": d for i, d in enumerate(layers)})
    manifest = put(cs, manifest_bytes, ns, **refs)
    store.images.create(ns, Image(name, target=Descriptor(MANIFEST, manifest, len(manifest_bytes))))
    return {"manifest": manifest, "config": config, "layer0": layers[0], "layer1": layers[1]}


# --- content -------------------------------------------------------------------------------------


def test_an_image_keeps_its_manifest_config_and_layers(cs: ContentStore, store: Store) -> None:
    blobs = pull_image(cs, store)
    stray = put(cs, b"nobody wants me")
    stats = gc.collect(store, cs, {})
    assert stats.content == (("default", stray),)
    assert stats.blobs == (stray,)
    assert held(cs) == set(blobs.values()) == on_disk(cs)
    assert stats.duration >= 0


def test_after_the_image_is_deleted_its_blobs_go(cs: ContentStore, store: Store) -> None:
    blobs = pull_image(cs, store)
    store.images.delete("default", "docker.io/library/app:1")
    stats = gc.collect(store, cs, {})
    assert {d for _, d in stats.content} == set(blobs.values())
    assert set(stats.blobs) == set(blobs.values())
    assert held(cs) == set() and on_disk(cs) == set()


def test_two_images_sharing_blobs(cs: ContentStore, store: Store) -> None:
    a = pull_image(cs, store, name="a:1")
    b = pull_image(cs, store, name="b:1", tag=b"-b")
    store.images.delete("default", "a:1")
    gc.collect(store, cs, {})
    assert held(cs) == set(b.values())
    assert not (set(a.values()) & on_disk(cs))


def test_a_blob_another_namespace_holds_keeps_its_file(cs: ContentStore, store: Store) -> None:
    d = put(cs, b"shared", "ns-a")
    with cs.writer("ns-b", "r", expected=d) as w:
        w.commit(0, d)
    store.images.create("ns-b", Image("keep", target=Descriptor(MANIFEST, d, 6)))
    stats = gc.collect(store, cs, {})
    assert stats.content == (("ns-a", d),)
    assert stats.blobs == ()
    assert held(cs, "ns-a") == set() and held(cs, "ns-b") == {d} and d in on_disk(cs)


def test_labels_reference_content_only_with_a_proper_separator(cs: ContentStore, store: Store) -> None:
    kept = [put(cs, b"k%d" % i) for i in range(3)]
    gone = put(cs, b"not referenced: bad label name")
    put(cs, b"root", **{"containerd.io/gc.root": "x",
                        "containerd.io/gc.ref.content": kept[0],
                        "containerd.io/gc.ref.content/slash": kept[1],
                        "containerd.io/gc.ref.content.dot": kept[2],
                        "containerd.io/gc.ref.contentX": gone})
    gc.collect(store, cs, {})
    assert held(cs) == {*kept, sha(b"root")}
    assert gone not in on_disk(cs)


def test_a_reference_cycle_does_not_keep_itself(cs: ContentStore, store: Store) -> None:
    a, b = sha(b"a"), sha(b"b")
    put(cs, b"a", **{"containerd.io/gc.ref.content.x": b})
    put(cs, b"b", **{"containerd.io/gc.ref.content.x": a})
    gc.collect(store, cs, {})
    assert held(cs) == set()
    put(cs, b"a", **{"containerd.io/gc.ref.content.x": b, "containerd.io/gc.root": "1"})
    put(cs, b"b", **{"containerd.io/gc.ref.content.x": a})
    gc.collect(store, cs, {})
    assert held(cs) == {a, b}


# --- leases --------------------------------------------------------------------------------------


def test_a_lease_keeps_a_blob_until_it_is_deleted(cs: ContentStore, store: Store) -> None:
    store.leases.create("default", "pull")
    d = put(cs, b"leased", lease="pull")
    gc.collect(store, cs, {})
    assert held(cs) == {d} and d in on_disk(cs)
    store.leases.delete("default", "pull")
    stats = gc.collect(store, cs, {})
    assert stats.content == (("default", d),) and stats.blobs == (d,)


def test_a_lease_keeps_what_its_blobs_refer_to_unless_flat(cs: ContentStore, store: Store) -> None:
    child = put(cs, b"child")
    store.leases.create("default", "deep")
    parent = put(cs, b"parent", lease="deep", **{"containerd.io/gc.ref.content.c": child})
    gc.collect(store, cs, {})
    assert held(cs) == {child, parent}
    store.leases.delete("default", "deep")
    store.leases.create("default", "flat", {"containerd.io/gc.flat": "1"})
    store.leases.add_resource("default", "flat", LeaseResource(parent, "content"))
    gc.collect(store, cs, {})
    assert held(cs) == {parent}


def test_an_expired_lease_is_removed_with_what_only_it_held(cs: ContentStore, store: Store) -> None:
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    store.leases.create("default", "old", {"containerd.io/gc.expire": past})
    store.leases.create("default", "young", {"containerd.io/gc.expire": future})
    store.leases.create("default", "odd", {"containerd.io/gc.expire": "next tuesday"})
    old, young = put(cs, b"old", lease="old"), put(cs, b"young", lease="young")
    stats = gc.collect(store, cs, {})
    assert stats.leases == (("default", "old"),)
    assert [lease.id for lease in store.leases.list("default")] == ["odd", "young"]
    assert held(cs) == {young} and old not in on_disk(cs)
    # time passes
    stats = gc.collect(store, cs, {}, now=time.time() + 7200)
    assert stats.leases == (("default", "young"),)
    assert held(cs) == set()


@pytest.mark.parametrize(("value", "expired"), [
    ("2015-12-05T00:00:00Z", True),
    ("2015-12-05T00:00:00.5+02:00", True),
    ("2999-01-01T00:00:00Z", False),
    ("2015-12-05", False),  # not RFC 3339: ignored, the lease lives
    ("2015-12-05T00:00:00", False),  # no zone: not RFC 3339
    ("garbage", False),
])
def test_lease_expiry_parsing(value: str, expired: bool) -> None:
    assert gc.lease_expired({"containerd.io/gc.expire": value}, time.time()) is expired


# --- ingests -------------------------------------------------------------------------------------


def test_ingests_live_until_they_expire_or_their_lease_goes(cs: ContentStore, store: Store) -> None:
    cs.writer("default", "unleased").close()
    store.leases.create("default", "l")
    cs.writer("default", "leased", lease="l").close()
    stats = gc.collect(store, cs, {})
    assert stats.ingests == ()
    assert len(os.listdir(os.path.join(cs.root, "ingest"))) == 2
    stats = gc.collect(store, cs, {}, now=time.time() + 25 * 3600)
    assert stats.ingests == (("default", "unleased"),)
    store.leases.delete("default", "l")
    stats = gc.collect(store, cs, {})
    assert stats.ingests == (("default", "leased"),)
    assert os.listdir(os.path.join(cs.root, "ingest")) == []


def test_a_shared_ingest_keeps_the_blob_it_expects(cs: ContentStore, store: Store) -> None:
    d = put(cs, b"expected elsewhere", "ns-a")
    w = cs.writer("ns-b", "r", expected=d)
    cs.delete("ns-a", d)
    gc.collect(store, cs, {})
    assert d in on_disk(cs), "ns-b's ingest still expects it"
    w.commit(0, d)
    assert held(cs, "ns-b") == {d}


def test_orphan_files_are_swept(cs: ContentStore, store: Store) -> None:
    """A blob renamed into place whose row never came (a crash), and a stray ingest dir."""
    orphan = sha(b"orphan")
    Path(cs.blob_path(orphan)).write_bytes(b"orphan")
    os.mkdir(os.path.join(cs.root, "ingest", "f" * 64))
    Path(cs.root, "blobs", "sha256", "not-a-digest.tmp").write_bytes(b"")
    stats = gc.collect(store, cs, {})
    assert stats.blobs == (orphan,)
    assert os.listdir(os.path.join(cs.root, "ingest")) == []
    assert os.listdir(os.path.join(cs.root, "blobs", "sha256")) == ["not-a-digest.tmp"]


# --- snapshots -----------------------------------------------------------------------------------


def test_a_container_keeps_its_snapshot_chain(store: Store, snaps: FakeSnapshotter) -> None:
    for key, parent in (("l1", ""), ("l2", "l1"), ("l3", "l2"), ("rw", "l3"), ("x1", ""), ("x2", "x1"),
                        ("x3", "x2"), ("y", "x1")):
        snaps.add("default", key, parent)
    store.containers.create("default", Container(
        "web", runtime=Runtime("io.containerd.runc.v2"), spec=SPEC, snapshotter="overlayfs", snapshot_key="rw"))
    stats = gc.collect(store, None, {"overlayfs": snaps})
    assert snaps.keys() == {"l1", "l2", "l3", "rw"}
    removed = [key for _, _, key in stats.snapshots]
    assert sorted(removed) == ["x1", "x2", "x3", "y"]
    assert removed.index("x3") < removed.index("x2") < removed.index("x1")
    assert removed.index("y") < removed.index("x1"), "leaves before parents"
    assert all(s == "overlayfs" and ns == "default" for s, ns, _ in stats.snapshots)

    store.containers.delete("default", "web")
    gc.collect(store, None, {"overlayfs": snaps})
    assert snaps.keys() == set()


def test_snapshot_roots_and_references(cs: ContentStore, store: Store, snaps: FakeSnapshotter) -> None:
    other = FakeSnapshotter("native")
    snaps.add("default", "pinned", **{"containerd.io/gc.root": "1"})
    snaps.add("default", "chain-1")
    snaps.add("default", "chain-2", "chain-1")
    other.add("default", "n1")
    layer = put(cs, b"layer")
    snaps.add("default", "unpacked", **{"containerd.io/gc.ref.content.l": layer})
    # an image's config keeps the unpacked chain in each snapshotter, as unpack labels it
    config = put(cs, b"config", **{"containerd.io/gc.ref.snapshot.overlayfs": "chain-2",
                                   "containerd.io/gc.ref.snapshot.native/x": "n1"})
    store.images.create("default", Image("img", target=Descriptor(MANIFEST, config, 6)))
    # a lease holding a snapshot
    store.leases.create("default", "unpack")
    store.leases.add_resource("default", "unpack", LeaseResource("unpacked", "snapshots/overlayfs"))
    snaps.add("default", "doomed")
    snaps.add("ns2", "other-ns")

    stats = gc.collect(store, cs, {"overlayfs": snaps, "native": other})
    assert snaps.keys() == {"pinned", "chain-1", "chain-2", "unpacked"}
    assert other.keys() == {"n1"}
    assert snaps.keys("ns2") == set()
    assert set(stats.snapshots) == {("overlayfs", "default", "doomed"), ("overlayfs", "ns2", "other-ns")}
    assert held(cs) == {layer, config}, "a snapshot's label keeps its layer blob"

    store.leases.delete("default", "unpack")
    store.images.delete("default", "img")
    gc.collect(store, cs, {"overlayfs": snaps, "native": other})
    assert snaps.keys() == {"pinned"} and other.keys() == set()
    assert held(cs) == set() and on_disk(cs) == set()


def test_a_flat_lease_keeps_snapshot_parents_but_not_label_refs(cs: ContentStore, store: Store,
                                                                snaps: FakeSnapshotter) -> None:
    blob = put(cs, b"blob")
    snaps.add("default", "base")
    snaps.add("default", "top", "base", **{"containerd.io/gc.ref.content": blob})
    store.leases.create("default", "flat", {"containerd.io/gc.flat": "yes"})
    store.leases.add_resource("default", "flat", LeaseResource("top", "snapshots/overlayfs"))
    gc.collect(store, cs, {"overlayfs": snaps})
    assert snaps.keys() == {"base", "top"}
    assert held(cs) == set()


def test_a_snapshot_that_cannot_be_removed_is_skipped(store: Store, snaps: FakeSnapshotter,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    snaps.add("default", "stuck")
    snaps.add("default", "free")
    snaps.refuse.add("stuck")
    stats = gc.collect(store, None, {"overlayfs": snaps})
    assert stats.snapshots == (("overlayfs", "default", "free"),)
    assert snaps.keys() == {"stuck"}
    assert "could not remove snapshot 'stuck'" in caplog.text


def test_unknown_snapshotters_and_dead_references_are_harmless(cs: ContentStore, store: Store) -> None:
    store.containers.create("default", Container(
        "c", runtime=Runtime("io.containerd.runc.v2"), spec=SPEC, snapshotter="zfs", snapshot_key="k",
        labels={"containerd.io/gc.ref.content.x": sha(b"never written")}))
    store.images.create("default", Image("dangling", target=Descriptor(MANIFEST, sha(b"gone"), 4)))
    stats = gc.collect(store, cs, {})
    assert stats == gc.Stats(duration=stats.duration)


def test_container_labels_keep_content(cs: ContentStore, store: Store) -> None:
    d = put(cs, b"checkpoint")
    store.containers.create("default", Container(
        "c", runtime=Runtime("io.containerd.runc.v2"), spec=SPEC,
        labels={"containerd.io/gc.ref.content.checkpoint": d}))
    gc.collect(store, cs, {})
    assert held(cs) == {d}
    cs.update("default", Info(d, labels={}))
    assert held(cs) == {d}


def test_collector_after_a_sync_delete_collects_before_answering(cs: ContentStore, store: Store) -> None:
    async def body() -> None:
        collector = gc.Collector(store, cs, {}, delay=0.01)
        kept, dropped = put(cs, b"kept", **{"containerd.io/gc.root": "1"}), put(cs, b"dropped")
        cs.delete("default", dropped)
        await collector.after_delete(sync=True)
        assert on_disk(cs) == {kept}
        # without sync the call answers at once and the collection follows shortly
        later = put(cs, b"later")
        cs.delete("default", later)
        await collector.after_delete(sync=False)
        assert later in on_disk(cs)
        async with asyncio.timeout(5):
            while later in on_disk(cs):
                await asyncio.sleep(0.01)
        await collector.close()
        # counted for ketchd's metrics: two collections, each removing a blob (the delete took its row)
        assert collector.runs == {"collect": 2} and collector.seconds["collect"] > 0
        assert collector.removed["blobs"] == 2 and collector.removed["content"] == 0

    asyncio.run(body())


def test_closing_the_collector_waits_for_a_collection_running_in_its_thread(cs: ContentStore,
                                                                             store: Store) -> None:
    """ketchd closes its stores right after: a collection whose caller was cancelled (a
    shutdown) must be over by then."""
    snaps = FakeSnapshotter()
    finished: list[bool] = []

    def slow_cleanup() -> list[str]:
        time.sleep(0.3)
        finished.append(True)
        return []

    snaps.cleanup = slow_cleanup  # type: ignore[method-assign]

    async def body() -> None:
        collector = gc.Collector(store, cs, {"overlayfs": snaps})
        caller = asyncio.ensure_future(collector.now())
        await asyncio.sleep(0.05)
        caller.cancel()
        await collector.close()
        assert finished == [True]

    asyncio.run(body())
