"""Layers: applying (plainly and onto overlay uppers), creating, and never escaping the root.

Layers are built here with ``tarfile``. Tests that mount, chown or mknod need root and skip
without it; every mount is undone in a ``finally`` (the ``mounted`` helper, or ``mounted_at``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.diff import (
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    apply_layer,
    apply_to_mounts,
    clean_name,
    compare_mounts,
    compression_of,
    create_layer,
    mounted,
    readonly_mounts,
    root_path,
)
from ketch.mount import Mount, mount_all, unmount_all
from ketch.snapshots import NativeSnapshotter, OverlaySnapshotter, SnapshotterBase
from ketch.mount import mounts_under
from ketch.snapshots._fsutil import copy_tree

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mount, chown, mknod)")
NS = "default"


# -- building layers -------------------------------------------------------------------------


@dataclass
class E:
    """One tar entry to write."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


def D(name: str, **kw: object) -> E:  # noqa: N802
    kw.setdefault("mode", 0o755)
    return E(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def S(name: str, target: str) -> E:  # noqa: N802
    return E(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def H(name: str, target: str) -> E:  # noqa: N802
    return E(name, tarfile.LNKTYPE, linkname=target)


def layer(entries: Sequence[E], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.linkname
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.pax)
            if e.type == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    raw = buf.getvalue()
    return gzip.compress(raw) if compress else raw


def apply(data: bytes, root: Path, media_type: str = MEDIA_TYPE_LAYER, **kw: object) -> tuple[str, int]:
    return apply_layer(io.BytesIO(data), str(root), media_type, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def mounted_at(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount_all(mounts, str(target))
        yield target
    finally:
        unmount_all(str(target))
        assert not mounts_under(str(target))


def overlay(lowers: Sequence[Path], upper: Path | None = None, work: Path | None = None) -> Mount:
    opts = []
    if upper is not None and work is not None:
        opts += [f"workdir={work}", f"upperdir={upper}"]
    opts.append("lowerdir=" + ":".join(str(p) for p in lowers))
    return Mount("overlay", "overlay", tuple(opts))


# -- media types and digests -----------------------------------------------------------------


def test_media_types() -> None:
    assert compression_of(MEDIA_TYPE_LAYER) == ""
    assert compression_of(MEDIA_TYPE_LAYER_GZIP) == "gzip"
    assert compression_of(MEDIA_TYPE_LAYER + "+zstd") == "zstd"
    assert compression_of(MEDIA_TYPE_DOCKER_LAYER_GZIP) == "gzip"
    assert compression_of(MEDIA_TYPE_DOCKER_LAYER) == "unknown"
    assert compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip") == "gzip"
    with pytest.raises(errdefs.Unimplemented, match="unrecognised mediatype"):
        compression_of("application/vnd.oci.image.config.v1+json")
    with pytest.raises(errdefs.Unimplemented):
        compression_of(MEDIA_TYPE_LAYER_GZIP + "+encrypted")


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (MEDIA_TYPE_LAYER, False),
        (MEDIA_TYPE_LAYER_GZIP, True),
        (MEDIA_TYPE_DOCKER_LAYER_GZIP, True),
        (MEDIA_TYPE_DOCKER_LAYER, True),  # compressed though the type says not: found by magic
        (MEDIA_TYPE_LAYER, True),
    ],
)
def test_diff_id_is_sha256_of_uncompressed_tar(tmp_path: Path, media_type: str, compress: bool) -> None:
    raw = layer([D("d/"), E("d/f", data=b"hello")])
    blob = gzip.compress(raw) if compress else raw
    diff_id, size = apply(blob, tmp_path, media_type)
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert size == len(raw)
    assert (tmp_path / "d" / "f").read_bytes() == b"hello"


def test_trailing_data_counts_in_the_digest(tmp_path: Path) -> None:
    raw = layer([E("f", data=b"x")]) + b"\0" * 4096
    assert apply(raw, tmp_path) == ("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))


def test_bad_streams_are_invalid(tmp_path: Path) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        apply(b"this is not a tar archive at all" * 20, tmp_path)
    truncated = gzip.compress(layer([E("f", data=os.urandom(100_000))]))[:5000]
    with pytest.raises(errdefs.InvalidArgument):
        apply(truncated, tmp_path, MEDIA_TYPE_LAYER_GZIP)
    with pytest.raises(errdefs.Unimplemented, match="zstd"):
        apply(b"\x28\xb5\x2f\xfd" + b"\0" * 100, tmp_path, MEDIA_TYPE_LAYER + "+zstd")


# -- applying --------------------------------------------------------------------------------


def test_apply_entries(tmp_path: Path) -> None:
    entries = [
        D("etc/", mode=0o750, mtime=1_000_000_000),
        E("etc/passwd", data=b"root:x:0:0\n", mode=0o600, mtime=1_500_000_000),
        E("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, pax={"SCHILY.xattr.user.origin": "layer"}),
        S("bin/sh", "tool"),
        E("bin/tool2", tarfile.LNKTYPE, linkname="bin/tool", mode=0o4755),
        E("run/fifo", tarfile.FIFOTYPE, mode=0o640),
        D("deep/a/b/"),
        E("./dot/relative", data=b"ok"),
    ]
    apply(layer(entries), tmp_path)
    etc = os.lstat(tmp_path / "etc")
    assert stat.S_IMODE(etc.st_mode) == 0o750
    assert etc.st_mtime == 1_000_000_000  # set after its child was written
    pw = os.lstat(tmp_path / "etc" / "passwd")
    assert (stat.S_IMODE(pw.st_mode), pw.st_mtime) == (0o600, 1_500_000_000)
    tool = os.lstat(tmp_path / "bin" / "tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert os.getxattr(tmp_path / "bin" / "tool", "user.origin") == b"layer"
    assert os.readlink(tmp_path / "bin" / "sh") == "tool"
    assert os.lstat(tmp_path / "bin" / "tool2").st_ino == tool.st_ino
    assert stat.S_ISFIFO(os.lstat(tmp_path / "run" / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(tmp_path / "bin").st_mode) == 0o755  # implicit parent
    assert (tmp_path / "deep" / "a" / "b").is_dir()
    assert (tmp_path / "dot" / "relative").read_bytes() == b"ok"


@needs_root
def test_apply_ownership_and_devices(tmp_path: Path) -> None:
    entries = [
        E("home/u/file", data=b"x", uid=1000, gid=1001, mode=0o2755),
        S("home/u/link", "file"),
        E("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        E("dev/loop0", tarfile.BLKTYPE, mode=0o660, dev=(7, 0), gid=6),
    ]
    entries[1].uid = entries[1].gid = 1000
    apply(layer(entries), tmp_path)
    f = os.lstat(tmp_path / "home/u/file")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 1001, 0o2755)  # setgid survives chown
    assert os.lstat(tmp_path / "home/u/link").st_uid == 1000
    null = os.lstat(tmp_path / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(tmp_path / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0) and loop.st_gid == 6


def test_apply_replaces_and_merges(tmp_path: Path) -> None:
    apply(layer([D("d/"), E("d/old", data=b"1"), E("f", data=b"file"), D("x/"), E("x/inner")]), tmp_path)
    apply(layer([D("d/", mode=0o700), E("d/new", data=b"2"), D("f/"), E("x", data=b"now a file")]), tmp_path)
    assert sorted(os.listdir(tmp_path / "d")) == ["new", "old"]  # directories merge
    assert stat.S_IMODE(os.lstat(tmp_path / "d").st_mode) == 0o700
    assert (tmp_path / "f").is_dir()
    assert (tmp_path / "x").read_bytes() == b"now a file"


def test_trusted_xattrs_from_a_layer_are_ignored(tmp_path: Path) -> None:
    apply(layer([E("f", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})]), tmp_path)
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "f")


def test_plain_whiteouts(tmp_path: Path) -> None:
    apply(layer([
        E("keep", data=b"k"), E("gone", data=b"g"), D("gonedir/"), E("gonedir/f"),
        D("opq/"), E("opq/old1"), D("opq/olddir/"), E("opq/olddir/x"), D("opq/mixed/"), E("opq/mixed/lower"),
        S("gonelink", "/etc"),
    ]), tmp_path)
    apply(layer([
        E(".wh.gone"), E(".wh.gonedir"), E(".wh.gonelink"), E(".wh.never-existed"),
        E("opq/.wh..wh..opq"), E("opq/new", data=b"n"), E("opq/mixed/upper"),
        E("same", data=b"s"), E(".wh.same"),  # a whiteout never hides its own layer's entry
        E(".wh..wh.plnk"),  # reserved names are ignored
    ]), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep", "opq", "same"]
    assert sorted(os.listdir(tmp_path / "opq")) == ["mixed", "new"]
    assert os.listdir(tmp_path / "opq" / "mixed") == ["upper"]


def test_opaque_marker_before_its_siblings(tmp_path: Path) -> None:
    apply(layer([D("d/"), E("d/lower")]), tmp_path)
    apply(layer([D("d/"), E("d/.wh..wh..opq"), E("d/upper")]), tmp_path)
    assert os.listdir(tmp_path / "d") == ["upper"]


@needs_root
def test_overlay_whiteouts_in_an_upper_dir(tmp_path: Path) -> None:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    apply(layer([
        D("etc/", mode=0o711, uid=5, gid=6), E("etc/gone", data=b"g"), E("etc/keep", data=b"k"),
        D("opq/"), E("opq/old"), D("opq/olddir/"), E("opq/olddir/x"),
    ]), lower)
    apply(layer([
        E("etc/.wh.gone", uid=0), E("etc/added", data=b"a"),
        E("opq/.wh..wh..opq"), E("opq/new", data=b"n"),
    ]), upper, overlay_whiteouts=True, parents=[str(lower)])
    wh = os.lstat(upper / "etc" / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    assert not (upper / "opq" / ".wh..wh..opq").exists()
    # the implicit parent copied its attributes from the lower layer
    st = os.lstat(upper / "etc")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 5, 6)
    with mounted_at([overlay([lower], upper, work)], tmp_path / "merged") as merged:
        assert sorted(os.listdir(merged / "etc")) == ["added", "keep"]
        assert os.listdir(merged / "opq") == ["new"]


# -- snapshots + layers, end to end ----------------------------------------------------------


@pytest.fixture(params=["overlayfs", "native"])
def sn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotterBase]:
    cls = OverlaySnapshotter if request.param == "overlayfs" else NativeSnapshotter
    s = cls(tmp_path / "snapshotter")
    try:
        yield s
    finally:
        s.close()


@needs_root
def test_unpack_layers_into_snapshots(sn: SnapshotterBase, tmp_path: Path) -> None:
    layers = [
        layer([D("etc/"), E("etc/os-release", data=b"ketch\n"), E("etc/motd", data=b"hi\n"),
               D("var/cache/"), E("var/cache/a"), E("var/cache/b"), S("bin", "usr/bin"), D("usr/bin/"),
               E("usr/bin/tool", data=b"1", mode=0o755), E("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))],
              compress=True),
        layer([E("etc/.wh.motd"), E("var/cache/.wh..wh..opq"), E("var/cache/c", data=b"c"),
               E("usr/bin/tool", data=b"2", mode=0o755), H("usr/bin/tool-link", "usr/bin/tool")], compress=True),
    ]
    parent = ""
    for i, blob in enumerate(layers):
        key = f"extract-{i}"
        mounts = sn.prepare(NS, key, parent)
        diff_id, size = apply_to_mounts(io.BytesIO(blob), mounts, MEDIA_TYPE_LAYER_GZIP)
        assert diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
        assert size == len(gzip.decompress(blob))
        sn.commit(NS, f"layer-{i}", key)
        parent = f"layer-{i}"
    if isinstance(sn, OverlaySnapshotter):
        upper = Path(sn.root) / "snapshots" / "2" / "fs"
        assert stat.S_ISCHR(os.lstat(upper / "etc" / "motd").st_mode)  # an overlay whiteout
        assert os.getxattr(upper / "var" / "cache", "trusted.overlay.opaque") == b"y"
    with mounted(sn.view(NS, "look", parent), readonly=True) as root:
        r = Path(root)
        assert sorted(os.listdir(r / "etc")) == ["os-release"]
        assert os.listdir(r / "var" / "cache") == ["c"]
        assert (r / "usr" / "bin" / "tool").read_bytes() == b"2"
        assert (r / "bin" / "tool-link").read_bytes() == b"2"
        assert os.lstat(r / "usr/bin/tool").st_ino == os.lstat(r / "usr/bin/tool-link").st_ino
        assert os.lstat(r / "dev" / "null").st_rdev == os.makedev(1, 3)
    sn.remove(NS, "look")
    sn.remove(NS, "layer-1")
    sn.remove(NS, "layer-0")


# -- creating layers -------------------------------------------------------------------------


def _build_lower(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "same").write_text("unchanged\n")
    (root / "etc" / "modes").write_text("m")
    (root / "gone-dir" / "sub").mkdir(parents=True)
    (root / "gone-dir" / "sub" / "f").write_text("x")
    (root / "gone-file").write_text("bye")
    (root / "dir-to-file").mkdir()
    (root / "dir-to-file" / "child").write_text("c")
    (root / "file-to-dir").write_text("f")
    (root / "link").symlink_to("etc/hosts")
    (root / "hard1").write_text("shared")
    os.link(root / "hard1", root / "hard2")
    (root / "big").write_bytes(os.urandom(300_000))
    os.setxattr(root / "etc" / "same", "user.tag", b"one")


def _modify_upper(root: Path) -> None:
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost ketch\n")
    os.chmod(root / "etc" / "modes", 0o600)
    import shutil

    shutil.rmtree(root / "gone-dir")
    (root / "gone-file").unlink()
    shutil.rmtree(root / "dir-to-file")
    (root / "dir-to-file").write_text("now a file")
    (root / "file-to-dir").unlink()
    (root / "file-to-dir").mkdir()
    (root / "file-to-dir" / "inside").write_text("i")
    (root / "link").unlink()
    (root / "link").symlink_to("etc/modes")
    os.link(root / "hard1", root / "hard3")  # a new name for an unchanged file
    (root / "new" / "deep").mkdir(parents=True)
    (root / "new" / "deep" / "file").write_bytes(b"\0" * 10)
    os.setxattr(root / "new" / "deep" / "file", "user.new", b"\xff\x00binary")
    os.mkfifo(root / "new" / "fifo")


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a layer carries about each path under ``root``."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            link = None
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                link = inodes.setdefault(st.st_ino, rel)
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
            mtime = int(st.st_mtime) if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, content, link, xattrs, mtime)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_create_layer_round_trip(tmp_path: Path, compress: bool) -> None:
    lower, upper, target = tmp_path / "lower", tmp_path / "upper", tmp_path / "target"
    lower.mkdir()
    _build_lower(lower)
    copy_tree(str(lower), str(upper))
    _modify_upper(upper)
    out = io.BytesIO()
    diff_id, size = create_layer(str(lower), str(upper), out, compress=compress)
    blob = out.getvalue()
    assert size == len(blob)
    raw = gzip.decompress(blob) if compress else blob
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar}
    assert {".wh.gone-dir", ".wh.gone-file", "etc/hosts", "hard3"} <= members.keys()
    assert not {"etc/same", "big", "gone-dir/sub"} & members.keys()  # unchanged, or under a whiteout
    # the new name of a linked file carries the data; the old names are links to it again
    assert members["hard3"].isreg()
    assert members["hard1"].islnk() and members["hard1"].linkname == "hard3"

    copy_tree(str(lower), str(target))
    media = MEDIA_TYPE_LAYER_GZIP if compress else MEDIA_TYPE_LAYER
    assert apply(blob, target, media) == (diff_id, len(raw))
    assert _snapshot(target) == _snapshot(upper)

    # same trees, same bytes
    again = io.BytesIO()
    assert create_layer(str(lower), str(upper), again, compress=compress) == (diff_id, size)
    assert again.getvalue() == blob


def test_create_layer_from_nothing(tmp_path: Path) -> None:
    upper, target = tmp_path / "upper", tmp_path / "target"
    upper.mkdir()
    _build_lower(upper)
    out = io.BytesIO()
    create_layer(None, str(upper), out)
    target.mkdir()
    apply(out.getvalue(), target, MEDIA_TYPE_LAYER_GZIP)
    assert _snapshot(target) == _snapshot(upper)


@needs_root
def test_create_layer_from_snapshot_mounts(sn: SnapshotterBase, tmp_path: Path) -> None:
    base = sn.prepare(NS, "base")
    with mounted(base) as root:
        _build_lower(Path(root))
    sn.commit(NS, "BASE", "base")
    work = sn.prepare(NS, "work", "BASE")
    with mounted(work) as root:
        _modify_upper(Path(root))
    out = io.BytesIO()
    diff_id, _ = compare_mounts(sn.view(NS, "lower-view", "BASE"), sn.mounts(NS, "work"), out)
    # applying that layer on a fresh child of BASE gives the same tree
    check = sn.prepare(NS, "check", "BASE")
    assert apply_to_mounts(io.BytesIO(out.getvalue()), check, MEDIA_TYPE_LAYER_GZIP)[0] == diff_id
    with mounted(sn.mounts(NS, "check"), readonly=True) as a, mounted(sn.mounts(NS, "work"), readonly=True) as b:
        assert _snapshot(Path(a)) == _snapshot(Path(b))


# -- mounts ----------------------------------------------------------------------------------


def test_readonly_mounts() -> None:
    ms = [
        Mount("bind", "/a", ("rw", "rbind")),
        Mount("overlay", "overlay", ("index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2")),
        Mount("overlay", "overlay", ("lowerdir=/l1:/l2",)),
    ]
    assert readonly_mounts(ms) == [
        Mount("bind", "/a", ("rbind", "ro")),
        Mount("overlay", "overlay", ("index=off", "lowerdir=/u:/l1:/l2")),
        Mount("overlay", "overlay", ("lowerdir=/l1:/l2",)),
    ]


@needs_root
def test_mounted_always_unmounts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    seen = ""
    with pytest.raises(RuntimeError):
        with mounted([Mount("bind", str(src), ("rbind", "rw"))], parent=str(tmp_path)) as root:
            seen = root
            assert Path(root, "f").read_text() == "data"
            raise RuntimeError("boom")
    assert seen and not os.path.exists(seen)
    assert not mounts_under(str(tmp_path))
    with mounted([Mount("bind", str(src), ("rbind", "rw"))], readonly=True, parent=str(tmp_path)) as root:
        with pytest.raises(OSError):
            Path(root, "g").write_text("no")
    assert (src / "f").read_text() == "data"
    # a mount that fails leaves nothing behind either
    with pytest.raises(OSError):
        with mounted([Mount("bind", str(tmp_path / "missing"), ("rbind",))], parent=str(tmp_path)):
            pass
    assert sorted(os.listdir(tmp_path)) == ["src"]


# -- safety: nothing lands outside the root --------------------------------------------------


def test_clean_name_and_root_path(tmp_path: Path) -> None:
    assert clean_name("./a//b/./c/") == "a/b/c"
    assert clean_name("/abs/x") == "abs/x"
    assert clean_name("a/../b") == "b"
    assert clean_name(".") == ""
    for bad in ("..", "../x", "a/../../x", "/../x"):
        with pytest.raises(errdefs.InvalidArgument):
            clean_name(bad)
    r = tmp_path
    (r / "real").mkdir()
    os.symlink("/etc", r / "abs")
    os.symlink("../../..", r / "up")
    os.symlink("real", r / "rel")
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    assert root_path(str(r), "abs/passwd") == f"{r}/etc/passwd"
    assert root_path(str(r), "up/x") == f"{r}/x"
    assert root_path(str(r), "rel/y") == f"{r}/real/y"
    assert root_path(str(r), "missing/../z") == f"{r}/z"
    with pytest.raises(errdefs.InvalidArgument, match="too many symbolic links"):
        root_path(str(r), "loop1/x")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(root, outside): a layer is applied to root; outside must never change."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("do not touch")
    (outside / "sub").mkdir()
    os.utime(outside / "sub", (1000, 1000))
    before = _snapshot(outside), os.stat(outside).st_mtime_ns
    yield root, outside
    assert (_snapshot(outside), os.stat(outside).st_mtime_ns) == before, "something outside the root changed"


def _passwd() -> tuple[object, ...]:
    st = os.stat("/etc/passwd")
    return st.st_ino, st.st_nlink, st.st_mode, st.st_mtime_ns, st.st_ctime_ns, Path("/etc/passwd").read_bytes()


def test_dotdot_entry_is_refused(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    for name in ("../outside/evil", "../evil", "a/../../evil", "../outside/precious"):
        with pytest.raises(errdefs.InvalidArgument, match=re.escape(f"layer entry {name!r}")):
            apply(layer([E(name, data=b"pwned")]), root)
    assert not (root.parent / "evil").exists()


def test_absolute_entry_stays_inside(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply(layer([E("/abs/evil", data=b"x"), E(f"{outside}/precious", data=b"pwned")]), root)
    assert (root / "abs" / "evil").read_bytes() == b"x"
    assert (root / str(outside).lstrip("/") / "precious").read_bytes() == b"pwned"
    assert not os.path.exists("/abs/evil")


def test_write_through_absolute_symlink_stays_inside(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply(layer([S("link", str(outside)), E("link/evil", data=b"x"), E("link/precious", data=b"pwned"),
                 D("link/sub/", mtime=5)]), root)
    inside = root / str(outside).lstrip("/")
    assert (inside / "evil").read_bytes() == b"x"
    assert (inside / "precious").read_bytes() == b"pwned"
    assert os.readlink(root / "link") == str(outside)


def test_write_through_relative_symlink_stays_inside(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    apply(layer([S("l2", "../../.."), E("l2/x", data=b"x"), S("d/l3", "../../outside"), E("d/l3/precious", data=b"p")]),
          root)
    assert (root / "x").read_bytes() == b"x"
    assert (root / "outside" / "precious").read_bytes() == b"p"


def test_symlink_planted_by_a_lower_layer_is_not_followed_out(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    os.symlink(str(outside), root / "lowerlink")
    os.symlink(str(outside / "precious"), root / "filelink")
    apply(layer([E("lowerlink/new", data=b"n"), E("filelink", data=b"replaced the link")]), root)
    assert (root / str(outside).lstrip("/") / "new").read_bytes() == b"n"
    assert (root / "filelink").read_bytes() == b"replaced the link"
    assert not (root / "filelink").is_symlink()


def test_hardlinks_cannot_reach_outside(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    before = _passwd()
    for target in ("/etc/passwd", "../../../../../../etc/passwd", f"{outside}/precious", "../outside/precious"):
        with pytest.raises(errdefs.InvalidArgument, match="hard link target"):
            apply(layer([H("pw", target)]), root)
    with pytest.raises(errdefs.InvalidArgument, match="hard link target"):
        apply(layer([S("etcl", "/etc"), H("pw", "etcl/passwd")]), root)
    with pytest.raises(errdefs.InvalidArgument, match="hard link target"):
        apply(layer([S("out", str(outside)), H("pw", "out/precious")]), root)
    assert _passwd() == before
    assert not (root / "pw").exists()
    # a link to a name inside the root is fine, even through an absolute symlink
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("the image's own")
    apply(layer([H("pw", "/etc/passwd"), H("pw2", "etcl/passwd")]), root)
    assert os.lstat(root / "pw").st_ino == os.lstat(root / "etc" / "passwd").st_ino
    assert os.lstat(root / "pw2").st_ino == os.lstat(root / "etc" / "passwd").st_ino


def test_whiteouts_cannot_reach_outside(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply(layer([S("l", str(outside)), E("l/.wh.precious"), E("l/.wh.sub"), E("l/.wh..wh..opq"),
                 S("up", "../.."), E("up/outside/.wh.precious")]), root)
    for name in (".wh..", ".wh...", "d/.wh.."):
        with pytest.raises(errdefs.InvalidArgument, match="invalid whiteout name"):
            apply(layer([E(name)]), root)


@needs_root
def test_overlay_whiteouts_cannot_reach_outside(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    apply(layer([S("l", str(outside)), E("l/.wh.precious"), E("l/.wh..wh..opq"), E("l/sub/.wh..wh..opq")]),
          root, overlay_whiteouts=True)
    assert "trusted.overlay.opaque" not in os.listxattr(outside / "sub")


def test_directory_times_are_not_set_through_a_later_symlink(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    # d/sub is a directory when written, then d is replaced by a link to outside: the final
    # pass that sets directory times must not follow it
    apply(layer([D("d/"), D("d/sub/", mtime=123), S("d", str(outside))]), root)
    assert os.readlink(root / "d") == str(outside)


def test_symlink_loops_are_refused(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    with pytest.raises(errdefs.InvalidArgument, match="layer entry 'a/x': too many symbolic links"):
        apply(layer([S("a", "b"), S("b", "a"), E("a/x")]), root)
