"""The walking differ: compare two trees and write the changes as an OCI layer.

Both trees are walked together, names in sorted order, a directory before its contents:

- a path only in ``upper`` is added, with everything below it;
- a path only in ``lower`` is deleted: one ``.wh.<name>`` entry, even for a whole directory;
- a path in both is written again when it differs: another type, mode, owner, device
  number, extended attributes, symlink target, size, or modification time (when both times
  are whole seconds, as a tar keeps them, the contents are compared instead);
- the parent directories of every entry are written before it, with ``upper``'s attributes,
  so that applying the layer recreates them as they are;
- hard links inside ``upper`` stay links: the first name written carries the data, later
  names (modified or not, as containerd) link to it.

Entries are PAX, with times truncated to seconds, no user or group names, and extended
attributes as ``SCHILY.xattr.*`` (all but ``trusted.*`` and ``security.selinux``, which
belong to the host). Sockets are left out. Whiteouts are empty regular files dated 0, so two
runs over the same trees give the same bytes.
"""

from __future__ import annotations

import os
import stat
import tarfile

from ketch.diff._streams import DigestingWriter, Writable, gzip_writer

__all__ = ["create_layer"]

_CHUNK = 1 << 20


def create_layer(lower_dir: str | None, upper_dir: str, out: Writable, compress: bool = True) -> tuple[str, int]:
    """Write to ``out`` the layer that turns ``lower_dir`` (None: empty) into ``upper_dir``.

    With ``compress`` the layer is gzip-compressed (``application/vnd.oci.image.layer.v1.tar+gzip``),
    else a plain tar. Returns ``(diff_id, size)``: the sha256 of the **uncompressed** tar and
    the number of bytes written to ``out`` (the blob's size). Blocking: run it in a thread.
    """
    blob = DigestingWriter(out)
    gz = gzip_writer(blob) if compress else None
    tar_out = DigestingWriter(gz if gz is not None else blob)
    try:
        with tarfile.open(fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            _Walker(tar, lower_dir, upper_dir).walk("")
    finally:
        if gz is not None:
            gz.close()
    return tar_out.digest, blob.size


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.startswith("trusted.") or name == "security.selinux":
            continue
        try:
            found[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return found


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            ca = fa.read(_CHUNK)
            cb = fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


class _Walker:
    def __init__(self, tar: tarfile.TarFile, lower: str | None, upper: str) -> None:
        self.tar = tar
        self.lower = lower
        self.upper = upper
        #: directories already written (relative names)
        self.written_dirs: set[str] = set()
        #: (dev, ino) → the name that carries the data
        self.link_source: dict[tuple[int, int], str] = {}
        #: (dev, ino) → unmodified names waiting for a modified link to be written
        self.link_waiting: dict[tuple[int, int], list[str]] = {}

    # -- the walk ---------------------------------------------------------------------------

    def walk(self, rel: str, lower_is_dir: bool = True) -> None:
        upath = os.path.join(self.upper, rel)
        upper_names = set(os.listdir(upath))
        lower_names: set[str] = set()
        if self.lower is not None and lower_is_dir:
            try:
                lower_names = set(os.listdir(os.path.join(self.lower, rel)))
            except (FileNotFoundError, NotADirectoryError):
                lower_names = set()
        for name in sorted(upper_names | lower_names):
            p = f"{rel}/{name}" if rel else name
            if name not in upper_names:
                self._delete(p)
                continue
            ust = os.lstat(os.path.join(self.upper, p))
            lst = os.lstat(os.path.join(self.lower, p)) if name in lower_names and self.lower else None
            if lst is None:
                self._change(p, ust, modified=True)
            else:
                self._change(p, ust, modified=not self._same(p, lst, ust))
            if stat.S_ISDIR(ust.st_mode):
                self.walk(p, lst is not None and stat.S_ISDIR(lst.st_mode))

    def _same(self, p: str, lst: os.stat_result, ust: os.stat_result) -> bool:
        assert self.lower is not None
        lpath = os.path.join(self.lower, p)
        upath = os.path.join(self.upper, p)
        if (lst.st_mode, lst.st_uid, lst.st_gid) != (ust.st_mode, ust.st_uid, ust.st_gid):
            return False
        mode = ust.st_mode
        if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and lst.st_rdev != ust.st_rdev:
            return False
        if _xattrs(lpath) != _xattrs(upath):
            return False
        if stat.S_ISDIR(mode):
            return True
        if lst.st_size != ust.st_size:
            return False
        if stat.S_ISLNK(mode) and os.readlink(lpath) != os.readlink(upath):
            return False
        lt, ut = lst.st_mtime_ns, ust.st_mtime_ns
        if lt // 1_000_000_000 != ut // 1_000_000_000:
            return False
        if lt % 1_000_000_000 == 0 and ut % 1_000_000_000 == 0:
            # both truncated (as a tar leaves them): the times say nothing, compare the data
            if stat.S_ISREG(mode) and ust.st_size > 0:
                return _same_content(lpath, upath)
            return True
        return lt == ut

    # -- entries ----------------------------------------------------------------------------

    def _delete(self, p: str) -> None:
        parent, _, base = p.rpartition("/")
        name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.type = tarfile.REGTYPE
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = ""
        self.tar.addfile(info)

    def _change(self, p: str, st: os.stat_result, modified: bool) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        waiting: list[str] = []
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            source = self.link_source.get(inode)
            if source is not None:
                self._write(p, st, link_to=source)
                return
            if not modified:
                self.link_waiting.setdefault(inode, []).append(p)
                return
            self.link_source[inode] = p
            waiting = self.link_waiting.pop(inode, [])
        elif not modified:
            return
        self._write(p, st)
        for other in waiting:
            self._write(other, st, link_to=p)

    def _parents(self, name: str) -> None:
        parent = name.rpartition("/")[0]
        if not parent or parent in self.written_dirs:
            return
        self._parents(parent)
        self.written_dirs.add(parent)
        self._write(parent, os.lstat(os.path.join(self.upper, parent)), parents_done=True)

    def _write(self, p: str, st: os.stat_result, link_to: str | None = None, parents_done: bool = False) -> None:
        if not parents_done:
            self._parents(p)
        path = os.path.join(self.upper, p)
        mode = st.st_mode
        info = tarfile.TarInfo(p + "/" if stat.S_ISDIR(mode) else p)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        has_data = False
        if link_to is not None:
            info.type = tarfile.LNKTYPE
            info.linkname = link_to
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            self.written_dirs.add(p)
        elif stat.S_ISREG(mode):
            info.type = tarfile.REGTYPE
            info.size = st.st_size
            has_data = True
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return
        info.pax_headers = {
            "SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
            for key, value in sorted(_xattrs(path).items())
        }
        if not has_data:
            self.tar.addfile(info)
        else:
            with open(path, "rb") as f:
                self.tar.addfile(info, f)
