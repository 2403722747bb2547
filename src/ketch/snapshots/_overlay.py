"""The overlayfs snapshotter (containerd ``snapshots/overlay``).

On disk, under ``root``::

    metadata.db                 the snapshot table (see ketch.snapshots._metastore)
    snapshots/<id>/fs           the layer: the upper dir while ACTIVE, a lower dir once committed
    snapshots/<id>/work         overlay's work dir; ACTIVE snapshots only, removed on commit

Mounts, as containerd returns them:

- no parent: a bind of the snapshot's own ``fs`` (``rw`` when ACTIVE, ``ro`` for a VIEW);
- a VIEW of one parent: a read-only bind of the parent's ``fs``;
- otherwise ``overlay`` with ``index=off`` (when the kernel knows the option), ``userxattr``
  (in a user namespace), ``workdir=`` and ``upperdir=`` (ACTIVE), and ``lowerdir=`` listing the
  parents' ``fs``, nearest first, joined by ``:``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from ketch.mount import Mount, mount, remove_tree, unmount
from ketch.snapshots._base import SnapshotterBase
from ketch.snapshots._metastore import Row
from ketch.snapshots._types import Kind

__all__ = ["OverlaySnapshotter", "supported"]

log = logging.getLogger("ketch.snapshots")


def _supports_index_option() -> bool:
    return os.path.exists("/sys/module/overlay/parameters/index")


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def supported(root: str | os.PathLike[str]) -> bool:
    """Whether overlayfs works on the filesystem of ``root``: mounts a tiny overlay (two
    lowers, an upper) in a temporary directory under ``root``, then unmounts and removes it."""
    root = os.fspath(root)
    os.makedirs(root, 0o700, exist_ok=True)
    td = tempfile.mkdtemp(prefix="overlay-check-", dir=root)
    merged = os.path.join(td, "merged")
    mounted = False
    try:
        for d in ("lower1", "lower2", "upper", "work", "merged"):
            os.mkdir(os.path.join(td, d))
        options = [f"lowerdir={td}/lower2:{td}/lower1", f"upperdir={td}/upper", f"workdir={td}/work"]
        if _in_user_namespace():
            options.insert(0, "userxattr")
        mount(Mount("overlay", "overlay", tuple(options)), merged)
        mounted = True
        return True
    except OSError as exc:
        log.info("overlayfs is not supported on %s: %s", root, exc)
        return False
    finally:
        if mounted:
            unmount(merged)
        remove_tree(td)


class OverlaySnapshotter(SnapshotterBase):
    """Snapshots as overlayfs layers: a child adds an upper dir over its parents' dirs."""

    name = "overlayfs"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._index_off = _supports_index_option()
        self._userxattr = _in_user_namespace()

    def _fs(self, id: int) -> str:
        return os.path.join(self._dir(id), "fs")

    def _work(self, id: int) -> str:
        return os.path.join(self._dir(id), "work")

    def _usage_path(self, id: int) -> str:
        return self._fs(id)

    def _populate(self, tmp: str, kind: Kind, parent: Row | None) -> bool:
        fs = os.path.join(tmp, "fs")
        os.mkdir(fs, 0o755)
        os.chmod(fs, 0o755)
        if kind is Kind.ACTIVE:
            os.mkdir(os.path.join(tmp, "work"), 0o711)
        if parent is not None:
            # the upper dir becomes the root of the merged view: give it the parent's owner
            st = os.stat(self._fs(parent.id))
            os.lchown(fs, st.st_uid, st.st_gid)
        return True

    def _mounts(self, row: Row) -> list[Mount]:
        if not row.parent_ids:
            return [Mount("bind", self._fs(row.id), ("ro" if row.kind is Kind.VIEW else "rw", "rbind"))]
        if row.kind is not Kind.ACTIVE and len(row.parent_ids) == 1:
            return [Mount("bind", self._fs(row.parent_ids[0]), ("ro", "rbind"))]
        options = []
        if self._index_off:
            options.append("index=off")
        if self._userxattr:
            options.append("userxattr")
        if row.kind is Kind.ACTIVE:
            options += [f"workdir={self._work(row.id)}", f"upperdir={self._fs(row.id)}"]
        options.append("lowerdir=" + ":".join(self._fs(p) for p in row.parent_ids))
        return [Mount("overlay", "overlay", tuple(options))]

    def _committed(self, id: int) -> None:
        work = self._work(id)
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                in_use = f"workdir={work}" in f.read()
        except OSError:
            in_use = True
        if in_use:
            log.info("keeping %s: an overlay mounted from the snapshot still uses it", work)
            return
        shutil.rmtree(work, ignore_errors=True)
