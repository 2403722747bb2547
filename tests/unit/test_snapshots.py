"""Snapshotters: containerd's semantics on both the overlayfs and the native snapshotter.

Tests that mount (or chown, or mknod) need root and skip without it. Every mount made here is
undone in a ``finally``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.mount import Mount, mount_all, unmount_all
from ketch.snapshots import (
    Info,
    Kind,
    NativeSnapshotter,
    OverlaySnapshotter,
    SnapshotRef,
    SnapshotterBase,
    Usage,
    supported,
)
from ketch.mount import mounts_under
from ketch.snapshots._metastore import SCHEMA_VERSION

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mount, chown, mknod)")
NS = "default"


@pytest.fixture(params=["overlayfs", "native"])
def sn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotterBase]:
    cls = OverlaySnapshotter if request.param == "overlayfs" else NativeSnapshotter
    s = cls(tmp_path / "root")
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def mounted_at(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount_all(mounts, str(target))
        yield target
    finally:
        unmount_all(str(target))
        assert not mounts_under(str(target))


# -- the lifecycle, through real mounts ------------------------------------------------------


@needs_root
def test_lifecycle_through_real_mounts(sn: SnapshotterBase, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    base = sn.prepare(NS, "base-extract")
    with mounted_at(base, mnt):
        (mnt / "etc").mkdir()
        (mnt / "etc" / "hostname").write_text("base\n")
        (mnt / "gone").write_text("deleted by the child\n")
    sn.commit(NS, "base", "base-extract", labels={"layer": "0"})
    assert sn.stat(NS, "base").kind is Kind.COMMITTED
    with pytest.raises(errdefs.NotFound, match="snapshot base-extract does not exist: not found"):
        sn.stat(NS, "base-extract")

    child = sn.prepare(NS, "child", parent="base")
    with mounted_at(child, mnt):
        assert (mnt / "etc" / "hostname").read_text() == "base\n"
        (mnt / "gone").unlink()
        (mnt / "etc" / "added").write_text("child\n")
    sn.commit(NS, "child-c", "child")

    view = sn.view(NS, "look", parent="child-c")
    with mounted_at(view, mnt):
        assert (mnt / "etc" / "hostname").read_text() == "base\n"
        assert (mnt / "etc" / "added").read_text() == "child\n"
        assert not (mnt / "gone").exists()
        with pytest.raises(OSError) as err:
            (mnt / "etc" / "new").write_text("no")
        assert err.value.errno == errno.EROFS

    # a view of a single parent shows that parent, read-only
    view1 = sn.view(NS, "look-base", parent="base")
    with mounted_at(view1, mnt):
        assert (mnt / "gone").exists()
        with pytest.raises(OSError) as err:
            (mnt / "x").write_text("no")
        assert err.value.errno == errno.EROFS

    with pytest.raises(errdefs.FailedPrecondition, match="cannot remove snapshot with child"):
        sn.remove(NS, "base")
    with pytest.raises(errdefs.FailedPrecondition, match="cannot remove snapshot with child"):
        sn.remove(NS, "child-c")
    for key in ("look", "look-base", "child-c", "base"):
        sn.remove(NS, key)
    assert sn.walk(NS) == []
    assert os.listdir(os.path.join(sn.root, "snapshots")) == []


@needs_root
def test_active_without_parent_is_writable_and_view_without_parent_is_not(sn: SnapshotterBase, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted_at(sn.prepare(NS, "rw"), mnt):
        (mnt / "f").write_text("ok")
    with mounted_at(sn.view(NS, "ro"), mnt):
        with pytest.raises(OSError) as err:
            (mnt / "f").write_text("no")
        assert err.value.errno == errno.EROFS


# -- mounts as containerd returns them -------------------------------------------------------


def test_overlay_mounts_have_containerd_shape(tmp_path: Path) -> None:
    with OverlaySnapshotter(tmp_path) as sn:
        (m,) = sn.prepare(NS, "a")
        assert m == Mount("bind", f"{tmp_path}/snapshots/1/fs", ("rw", "rbind"))
        sn.commit(NS, "A", "a")
        sn.prepare(NS, "b", "A")
        sn.commit(NS, "B", "b")
        (m,) = sn.prepare(NS, "c", "B")
        index = ("index=off",) if os.path.exists("/sys/module/overlay/parameters/index") else ()
        assert m.type == "overlay" and m.source == "overlay"
        assert m.options == index + (
            f"workdir={tmp_path}/snapshots/3/work",
            f"upperdir={tmp_path}/snapshots/3/fs",
            f"lowerdir={tmp_path}/snapshots/2/fs:{tmp_path}/snapshots/1/fs",
        )
        assert sn.mounts(NS, "c") == [m]
        (v,) = sn.view(NS, "v1", "A")
        assert v == Mount("bind", f"{tmp_path}/snapshots/1/fs", ("ro", "rbind"))
        (v,) = sn.view(NS, "v2", "B")
        assert v.options == index + (f"lowerdir={tmp_path}/snapshots/2/fs:{tmp_path}/snapshots/1/fs",)
        (v,) = sn.view(NS, "v0")
        assert v == Mount("bind", f"{tmp_path}/snapshots/6/fs", ("ro", "rbind"))


def test_overlay_commit_keeps_fs_and_removes_work(tmp_path: Path) -> None:
    with OverlaySnapshotter(tmp_path) as sn:
        sn.prepare(NS, "a")
        assert os.path.isdir(tmp_path / "snapshots/1/work")
        sn.commit(NS, "A", "a")
        assert os.path.isdir(tmp_path / "snapshots/1/fs")
        assert not os.path.exists(tmp_path / "snapshots/1/work")
        sn.view(NS, "v", "A")
        assert not os.path.exists(tmp_path / "snapshots/2/work")


def test_native_mounts_have_containerd_shape(tmp_path: Path) -> None:
    with NativeSnapshotter(tmp_path) as sn:
        assert sn.prepare(NS, "a") == [Mount("bind", f"{tmp_path}/snapshots/1", ("rbind", "rw"))]
        sn.commit(NS, "A", "a")
        assert sn.prepare(NS, "b", "A") == [Mount("bind", f"{tmp_path}/snapshots/2", ("rbind", "rw"))]
        # a view of a parent gets no directory of its own: it shows the parent
        assert sn.view(NS, "v", "A") == [Mount("bind", f"{tmp_path}/snapshots/1", ("rbind", "ro"))]
        assert not os.path.exists(tmp_path / "snapshots/3")
        assert sn.view(NS, "v0") == [Mount("bind", f"{tmp_path}/snapshots/4", ("rbind", "ro"))]
        sn.remove(NS, "v")


@needs_root
def test_overlay_supported_mounts_and_cleans_up(tmp_path: Path) -> None:
    assert supported(tmp_path) is True
    assert os.listdir(tmp_path) == []
    assert not mounts_under(str(tmp_path))


def test_overlay_child_upper_takes_parent_owner(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("needs root (chown)")
    with OverlaySnapshotter(tmp_path) as sn:
        sn.prepare(NS, "a")
        os.chown(tmp_path / "snapshots/1/fs", 1234, 5678)
        sn.commit(NS, "A", "a")
        sn.prepare(NS, "b", "A")
        st = os.stat(tmp_path / "snapshots/2/fs")
        assert (st.st_uid, st.st_gid) == (1234, 5678)


# -- the native copy -------------------------------------------------------------------------


@needs_root
def test_native_prepare_copies_everything(tmp_path: Path) -> None:
    with NativeSnapshotter(tmp_path / "root") as sn:
        (m,) = sn.prepare(NS, "a")
        src = Path(m.source)
        (src / "dir").mkdir(mode=0o750)
        os.chown(src / "dir", 10, 20)
        (src / "dir" / "file").write_text("data")
        os.chmod(src / "dir" / "file", 0o4755)
        os.setxattr(src / "dir" / "file", "user.note", b"kept")
        os.link(src / "dir" / "file", src / "hard")
        (src / "sym").symlink_to("dir/file")
        os.lchown(src / "sym", 7, 8)
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mkfifo(src / "fifo", 0o640)
        os.utime(src / "dir" / "file", ns=(1_000_000_123, 2_000_000_456))
        os.utime(src / "dir", ns=(3_000_000_000, 4_000_000_789))
        sn.commit(NS, "A", "a")

        (m2,) = sn.prepare(NS, "b", "A")
        dst = Path(m2.source)
        d = os.lstat(dst / "dir")
        assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (0o750, 10, 20, 4_000_000_789)
        f = os.lstat(dst / "dir" / "file")
        assert stat.S_IMODE(f.st_mode) == 0o4755 and f.st_mtime_ns == 2_000_000_456
        assert (dst / "dir" / "file").read_text() == "data"
        assert os.getxattr(dst / "dir" / "file", "user.note") == b"kept"
        assert os.lstat(dst / "hard").st_ino == f.st_ino and f.st_nlink == 2
        assert f.st_ino != os.lstat(src / "dir" / "file").st_ino
        assert os.readlink(dst / "sym") == "dir/file"
        assert (os.lstat(dst / "sym").st_uid, os.lstat(dst / "sym").st_gid) == (7, 8)
        n = os.lstat(dst / "null")
        assert stat.S_ISCHR(n.st_mode) and n.st_rdev == os.makedev(1, 3)
        assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
        # the copy is independent of the parent
        (dst / "dir" / "file").write_text("changed")
        assert (src / "dir" / "file").read_text() == "data"


# -- errors, as containerd words them --------------------------------------------------------


def test_errors(sn: SnapshotterBase) -> None:
    sn.prepare(NS, "a")
    with pytest.raises(errdefs.AlreadyExists, match='snapshot "a": already exists'):
        sn.prepare(NS, "a")
    with pytest.raises(errdefs.AlreadyExists):
        sn.view(NS, "a")
    with pytest.raises(errdefs.NotFound, match="parent snapshot nope does not exist"):
        sn.prepare(NS, "b", parent="nope")
    with pytest.raises(errdefs.InvalidArgument, match='parent "a" is not committed snapshot'):
        sn.prepare(NS, "b", parent="a")
    with pytest.raises(errdefs.NotFound, match="snapshot nope does not exist: not found"):
        sn.commit(NS, "N", "nope")
    with pytest.raises(errdefs.NotFound, match="snapshot nope does not exist"):
        sn.stat(NS, "nope")
    with pytest.raises(errdefs.NotFound):
        sn.mounts(NS, "nope")
    with pytest.raises(errdefs.NotFound):
        sn.usage(NS, "nope")
    with pytest.raises(errdefs.NotFound, match="snapshot nope does not exist"):
        sn.remove(NS, "nope")
    sn.commit(NS, "A", "a")
    sn.prepare(NS, "a2")
    with pytest.raises(errdefs.AlreadyExists, match='snapshot "A": already exists'):
        sn.commit(NS, "A", "a2")
    sn.view(NS, "v", "A")
    with pytest.raises(errdefs.FailedPrecondition, match='snapshot "v" is not active'):
        sn.commit(NS, "V", "v")
    with pytest.raises(errdefs.FailedPrecondition, match='snapshot "A" is not active'):
        sn.commit(NS, "AA", "A")
    with pytest.raises(errdefs.FailedPrecondition, match="requested snapshot A not active or view"):
        sn.mounts(NS, "A")
    # nothing half-made was left behind
    assert sorted(i.name for i in sn.walk(NS)) == ["A", "a2", "v"]
    assert sn.cleanup() == []


def test_namespaces_are_separate_and_validated(sn: SnapshotterBase) -> None:
    sn.prepare("one", "k")
    sn.commit("one", "K", "k")
    with pytest.raises(errdefs.NotFound):
        sn.stat("two", "K")
    with pytest.raises(errdefs.NotFound, match="parent snapshot K does not exist"):
        sn.prepare("two", "k", parent="K")
    sn.prepare("two", "k")
    assert sn.namespaces() == ["one", "two"]
    assert [i.name for i in sn.walk("one")] == ["K"]
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        sn.prepare("", "x")
    with pytest.raises(errdefs.InvalidArgument, match="namespace validation"):
        sn.stat("../evil", "x")


def test_keys_are_any_strings_and_never_paths(sn: SnapshotterBase) -> None:
    keys = ["../../etc", "/abs", "with space/and slash", "sha256:" + "a" * 64, "ünïcode"]
    for key in keys:
        sn.prepare(NS, key)
        sn.commit(NS, key + "@c", key)
    names = os.listdir(os.path.join(sn.root, "snapshots"))
    assert sorted(names, key=int) == [str(i) for i in range(1, len(keys) + 1)]
    assert sorted(i.name for i in sn.walk(NS)) == sorted(k + "@c" for k in keys)
    with pytest.raises(errdefs.InvalidArgument):
        sn.prepare(NS, "")


def test_labels_are_validated(sn: SnapshotterBase) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="info.Labels"):
        sn.prepare(NS, "a", labels={"k": "v" * 5000})
    assert sn.walk(NS) == []
    assert os.listdir(os.path.join(sn.root, "snapshots")) == []


def test_target_label_reports_an_existing_snapshot(sn: SnapshotterBase) -> None:
    sn.prepare(NS, "x")
    sn.commit(NS, "sha256:chain", "x")
    with pytest.raises(errdefs.AlreadyExists, match='target snapshot "sha256:chain"'):
        sn.prepare(NS, "extract-1", labels={"containerd.io/snapshot.ref": "sha256:chain"})
    sn.prepare(NS, "extract-2", labels={"containerd.io/snapshot.ref": "sha256:other"})


# -- stat, update, walk ----------------------------------------------------------------------


def test_stat_update_walk(sn: SnapshotterBase) -> None:
    sn.prepare(NS, "a", labels={"x": "1", "empty": ""})
    info = sn.stat(NS, "a")
    assert (info.kind, info.name, info.parent, info.labels) == (Kind.ACTIVE, "a", "", {"x": "1"})
    assert info.created_at == info.updated_at > 0
    sn.commit(NS, "A", "a", labels={"y": "2"})
    committed = sn.stat(NS, "A")
    assert committed.labels == {"y": "2"}  # commit replaces labels
    sn.prepare(NS, "b", "A", labels={"role": "rootfs"})
    sn.view(NS, "v", "A")

    updated = sn.update(NS, Info(name="A", labels={"z": "3", "y": ""}), ["labels.z"])
    assert updated.labels == {"y": "2", "z": "3"}
    assert updated.kind is Kind.COMMITTED and updated.updated_at >= committed.updated_at
    assert updated.created_at == committed.created_at
    assert sn.update(NS, Info(name="A", labels={}), ["labels.y"]).labels == {"z": "3"}
    assert sn.update(NS, Info(name="A", labels={"only": "this"})).labels == {"only": "this"}
    assert sn.update(NS, Info(name="A", labels={"w": "1"}), ["labels"]).labels == {"w": "1"}
    assert sn.stat(NS, "A").labels == {"w": "1"}
    with pytest.raises(errdefs.InvalidArgument, match='cannot update "parent" field on snapshot "A"'):
        sn.update(NS, Info(name="A"), ["parent"])
    with pytest.raises(errdefs.NotFound):
        sn.update(NS, Info(name="nope"), ["labels"])
    with pytest.raises(errdefs.InvalidArgument):
        sn.update(NS, Info(name=""), ["labels"])

    def names(*filters: str) -> list[str]:
        return [i.name for i in sn.walk(NS, filters)]

    assert names() == ["A", "b", "v"]
    assert names("kind==committed") == ["A"]
    assert names("kind==active") == ["b"]
    assert names("kind==view") == ["v"]
    assert names("parent==A") == ["b", "v"]
    assert names("parent==A,kind==view") == ["v"]
    assert names("name==b", "name==v") == ["b", "v"]
    assert names("labels.role==rootfs") == ["b"]
    assert names("labels.w") == ["A"]
    assert names("labels.nope") == []
    assert names("name~=^[Ab]$") == ["A", "b"]
    assert names('labels."role"!=rootfs') == ["A", "v"]
    with pytest.raises(errdefs.InvalidArgument):
        sn.walk(NS, ["name=="])


def test_walk_refs_and_namespaces_for_gc(sn: SnapshotterBase) -> None:
    assert sn.namespaces() == []
    sn.prepare(NS, "a", labels={"containerd.io/gc.root": "x"})
    sn.commit(NS, "A", "a", labels={"containerd.io/gc.ref.snapshot.overlayfs": "B"})
    sn.prepare(NS, "b", "A")
    sn.view("other", "v")
    assert sn.namespaces() == ["default", "other"]
    refs = sn.walk_refs(NS)
    assert refs == [
        SnapshotRef(key="A", parent="", labels={"containerd.io/gc.ref.snapshot.overlayfs": "B"}, kind=Kind.COMMITTED),
        SnapshotRef(key="b", parent="A", labels={}, kind=Kind.ACTIVE),
    ]
    assert hash(refs[0]) == hash(SnapshotRef(key="A", parent="", labels={}, kind=Kind.COMMITTED))
    sn.remove(NS, "b")
    sn.remove(NS, "A")
    assert sn.namespaces() == ["other"]


# -- usage -----------------------------------------------------------------------------------


def _layer_dir(sn: SnapshotterBase, key: str) -> Path:
    """Where the layer's files are, without mounting (bind sources for a layer without parent)."""
    (m,) = sn.mounts(NS, key)
    if m.type == "overlay":
        upper = next(o for o in m.options if o.startswith("upperdir="))
        return Path(upper[len("upperdir="):])
    return Path(m.source)


def test_usage(sn: SnapshotterBase) -> None:
    sn.prepare(NS, "a")
    empty = sn.usage(NS, "a")
    assert empty.inodes == 1 and empty.size > 0
    d = _layer_dir(sn, "a")
    (d / "f").write_bytes(os.urandom(3 * 4096))
    os.link(d / "f", d / "f2")  # counted once
    (d / "sub").mkdir()
    u = sn.usage(NS, "a")
    assert u.inodes == 3
    assert u.size >= empty.size + 3 * 4096
    sn.commit(NS, "A", "a")
    assert sn.usage(NS, "A") == u
    sn.view(NS, "v", "A")
    assert sn.usage(NS, "v") == Usage(0, 0)

    sn.prepare(NS, "b", "A")
    (_layer_dir(sn, "b") / "g").write_bytes(b"x" * 10000)
    ub = sn.usage(NS, "b")
    if isinstance(sn, OverlaySnapshotter):
        assert ub.inodes == 2  # only the changes
    else:
        assert ub.inodes == 4  # the whole copy: root, f (= f2), sub, g


# -- cleanup and persistence -----------------------------------------------------------------


def test_cleanup_removes_orphan_directories(sn: SnapshotterBase) -> None:
    sn.prepare(NS, "keep")
    sn.prepare(NS, "gone")
    snapdir = Path(sn.root) / "snapshots"
    (snapdir / "999" / "fs" / "deep").mkdir(parents=True)
    (snapdir / "999" / "fs" / "deep" / "file").write_text("orphan")
    (snapdir / "new-crashed").mkdir()
    (snapdir / "stray-file").write_text("x")
    removed = sn.cleanup()
    assert sorted(os.path.basename(p) for p in removed) == ["999", "new-crashed", "stray-file"]
    assert sorted(os.listdir(snapdir)) == ["1", "2"]
    sn.remove(NS, "gone")
    assert sorted(os.listdir(snapdir)) == ["1"]
    assert sn.cleanup() == []


@needs_root
def test_cleanup_never_removes_under_a_mount(sn: SnapshotterBase, tmp_path: Path) -> None:
    snapdir = Path(sn.root) / "snapshots"
    (snapdir / "77").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious").write_text("keep me")
    with mounted_at([Mount("bind", str(data), ("rbind",))], snapdir / "77"):
        assert sn.cleanup() == []
        assert (data / "precious").exists()
    assert sn.cleanup() == [str(snapdir / "77")]
    assert (data / "precious").read_text() == "keep me"


def test_metadata_persists_across_reopening(tmp_path: Path) -> None:
    for cls in (OverlaySnapshotter, NativeSnapshotter):
        root = tmp_path / cls.name
        with cls(root) as sn:
            sn.prepare(NS, "a", labels={"x": "1"})
            sn.commit(NS, "A", "a")
            sn.prepare(NS, "b", "A")
            sn.prepare(NS, "last")
            sn.remove(NS, "last")
            before = sn.walk(NS)
            mounts_b = sn.mounts(NS, "b")
        with cls(root) as sn:
            assert sn.walk(NS) == before
            assert sn.mounts(NS, "b") == mounts_b
            sn.prepare(NS, "c")  # ids are never reused, even the highest removed one
            assert sorted(os.listdir(root / "snapshots"), key=int) == ["1", "2", "4"]
            with pytest.raises(errdefs.FailedPrecondition):
                sn.remove(NS, "A")
        conn = sqlite3.connect(root / "metadata.db")
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        finally:
            conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with OverlaySnapshotter(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / "metadata.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(errdefs.FailedPrecondition, match="newer than this ketch supports"):
        OverlaySnapshotter(tmp_path)


def test_concurrent_prepares_and_cleanup(sn: SnapshotterBase) -> None:
    """Prepares run in threads (the native copy outside any lock) while cleanup runs: every
    snapshot gets its directory, and cleanup never takes one that is being made."""
    sn.prepare(NS, "a")
    layer = _layer_dir(sn, "a")
    for i in range(50):
        (layer / f"f{i}").write_bytes(os.urandom(2048))
    sn.commit(NS, "A", "a")
    stop = threading.Event()
    removed: list[str] = []

    def clean() -> None:
        while not stop.is_set():
            removed.extend(sn.cleanup())

    cleaner = threading.Thread(target=clean)
    cleaner.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: sn.prepare(NS, f"c{i}", "A"), range(24)))
    finally:
        stop.set()
        cleaner.join()
    assert removed == []
    assert len(sn.walk(NS, ["kind==active"])) == 24
    for i in range(24):
        assert len(os.listdir(_layer_dir(sn, f"c{i}"))) == (0 if isinstance(sn, OverlaySnapshotter) else 50)
    assert sorted(os.listdir(os.path.join(sn.root, "snapshots")), key=int) == [str(i) for i in range(1, 26)]


@needs_root
def test_garbage_collection_reclaims_leftover_directories_but_never_a_mounted_one(
        sn: SnapshotterBase, tmp_path: Path) -> None:
    """What a ketchd killed during a prepare leaves (a ``new-*`` directory, or one named by an
    id with no record), and a directory whose removal was refused while something was mounted
    in it, are reclaimed by the next collection, not only by an explicit Cleanup call; the
    mounted one only once it is unmounted."""
    from ketch import gc
    from ketch.metadata import Store

    sn.prepare(NS, "kept", labels={"containerd.io/gc.root": "x"})
    snapdir = Path(sn.root) / "snapshots"
    (snapdir / "new-killed" / "fs").mkdir(parents=True)
    (snapdir / "new-killed" / "fs" / "half-copied").write_text("x")
    (snapdir / "99" / "fs").mkdir(parents=True)
    sn.prepare(NS, "busy")
    busy_dir = _layer_dir(sn, "busy") if sn.name == "native" else _layer_dir(sn, "busy").parent
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "precious").write_text("keep me")
    with Store(tmp_path / "meta.db") as store:
        with mounted_at([Mount("bind", str(volume), ("rbind",))], busy_dir / "mnt"):
            sn.remove(NS, "busy")  # the record goes; the directory stays: something is mounted in it
            assert busy_dir.exists()
            stats = gc.collect(store, None, {sn.name: sn})
            assert sorted(stats.directories) == [str(snapdir / "99"), str(snapdir / "new-killed")]
            assert busy_dir.exists() and (busy_dir / "mnt" / "precious").read_text() == "keep me"
        stats = gc.collect(store, None, {sn.name: sn})
        assert stats.directories == (str(busy_dir),)
    assert (volume / "precious").read_text() == "keep me"
    assert [i.name for i in sn.walk(NS)] == ["kept"]
    assert sorted(os.listdir(snapdir)) == ["1"]


def test_reclaiming_at_startup_removes_leftovers_but_judges_no_snapshot(sn: SnapshotterBase) -> None:
    """What ketchd runs as it starts: a snapshot that nothing references yet (just prepared by
    a client, without a lease) stays; what no snapshot owns goes."""
    from ketch import gc

    sn.prepare(NS, "just-prepared")
    snapdir = Path(sn.root) / "snapshots"
    (snapdir / "new-killed" / "fs").mkdir(parents=True)
    stats = gc.reclaim(None, {sn.name: sn})
    assert stats.directories == (str(snapdir / "new-killed"),)
    assert [i.name for i in sn.walk(NS)] == ["just-prepared"] and sorted(os.listdir(snapdir)) == ["1"]
