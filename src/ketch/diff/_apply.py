"""Applying an OCI layer (a tar of changes) onto a directory.

The layer is read once, as a stream (``tarfile`` mode ``r|``): nothing is buffered whole and
nothing seeks. Entries are applied in order, as containerd's ``archive.Apply`` does:

- an existing path is replaced, except that a directory entry over a directory merges (only
  the metadata changes);
- missing parent directories are created 0755, or with the attributes of the same directory
  in ``parents`` (the lower layers of an overlay), so a new upper dir does not hide them;
- owner (when root), mode, extended attributes (PAX ``SCHILY.xattr.*``, except ``trusted.*``)
  and times are set per entry; directory times last, after their children;
- whiteouts: ``.wh.<name>`` deletes ``<name>`` of the lower layers and ``.wh..wh..opq`` hides
  everything the lower layers have in its directory. Plainly applied (native snapshots, bind
  mounts), they delete; applied to an overlay upper dir (``overlay_whiteouts=True``), they
  become overlay's own markers: a 0/0 character device, and ``trusted.overlay.opaque=y``.
  Following the OCI spec, a whiteout never removes what this same layer put there.

Safety: every entry lands inside ``root`` (see :mod:`ketch.diff._paths`): names that climb
out with ``..``, hard links whose target would be outside, and whiteouts naming ``.`` or
``..`` are InvalidArgument naming the entry; absolute names and symbolic links met on the way
are taken relative to ``root``, never to the host's ``/``. The last component of a path is
never followed: a regular file is created with ``O_EXCL | O_NOFOLLOW`` after whatever was
there is removed, and owner, xattrs and times are set with no-follow calls.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Sequence

from ketch.diff._paths import clean_name, root_path
from ketch.diff._streams import DigestingReader, Readable, open_uncompressed
from ketch.errdefs import InvalidArgument

__all__ = ["apply_layer"]

log = logging.getLogger("ketch.diff")

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
WHITEOUT_OPAQUE = WHITEOUT_META_PREFIX + ".opq"
PAX_XATTR = "SCHILY.xattr."

_CHUNK = 1 << 20
_MAX_NS = (1 << 63) - 1


def apply_layer(
    fileobj: Readable,
    root: str,
    media_type: str,
    *,
    overlay_whiteouts: bool = False,
    parents: Sequence[str] = (),
    userxattr: bool = False,
) -> tuple[str, int]:
    """Apply the layer read from ``fileobj`` onto the directory ``root``.

    ``media_type`` is the layer's (OCI or Docker; gzip is also recognised by its magic).
    With ``overlay_whiteouts``, ``root`` is an overlay upper dir and whiteouts become overlay
    markers (``user.overlay.opaque`` when mounted with ``userxattr``); ``parents`` are the
    overlay's lower dirs, nearest first, whose directory attributes new parent directories
    copy. Returns ``(diff_id, size)``: the sha256 and the length of the uncompressed stream.
    Blocking: run it in a thread from an event loop.
    """
    root = os.path.abspath(root)
    reader = DigestingReader(open_uncompressed(fileobj, media_type))
    applier = _Applier(root, overlay_whiteouts, tuple(parents), userxattr)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                applier.apply(tar, member)
        applier.finish()
        reader.drain()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidArgument(f"invalid layer stream: {exc}") from exc
    return reader.digest, reader.size


def _remove(path: str) -> None:
    """Remove whatever is at ``path`` (a tree, a file, a link: never what a link points to)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _bound_ns(seconds: float) -> int:
    """containerd's boundTime: times before the epoch or beyond int64 nanoseconds become 0."""
    ns = int(seconds * 1_000_000_000)
    return ns if 0 <= ns <= _MAX_NS else 0


class _Applier:
    def __init__(self, root: str, overlay: bool, parents: tuple[str, ...], userxattr: bool) -> None:
        self.root = root
        self.overlay = overlay
        self.parents = parents
        self.opaque_xattr = ("user" if userxattr else "trusted") + ".overlay.opaque"
        self.is_root = os.geteuid() == 0
        #: paths this layer created (and their ancestors): whiteouts spare them
        self.unpacked: set[str] = set()
        #: directories whose times are set at the end: (clean name, atime ns, mtime ns)
        self.dirs: list[tuple[str, int, int]] = []

    # -- one entry --------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        try:
            self._apply(tar, member)
        except InvalidArgument as exc:
            if exc.message.startswith("layer entry "):
                raise
            raise InvalidArgument(f"layer entry {member.name!r}: {exc.message}") from None

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = clean_name(member.name)
        if not name:
            log.debug("layer entry %r ignored: it names the root", member.name)
            return
        pdir, _, base = name.rpartition("/")
        ppath = root_path(self.root, pdir)
        path = os.path.join(ppath, base)
        if ppath != self.root:
            self._mkparent(ppath, member.name)

        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, ppath, base)
            return

        target = self._hardlink_target(member) if member.islnk() else ""
        if target == path:
            return  # a link to itself: nothing to do
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISDIR(st.st_mode) and member.isdir()):
            _remove(path)
            st = None

        if member.isdir():
            if st is None:
                os.mkdir(path, 0o700)
        elif member.isreg():
            self._write_file(tar, member, path)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            os.link(target, path, follow_symlinks=False)
        elif member.ischr() or member.isblk() or member.isfifo():
            if not self._mknod(member, path):
                return
        else:
            raise InvalidArgument(f"layer entry {member.name!r}: unhandled tar header type {member.type!r}")

        self._set_attributes(member, path)
        if member.isdir():
            self.dirs.append((name, *self._times(member)))
        self._record(path)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        src = tar.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if src is not None:
                while chunk := src.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _hardlink_target(self, member: tarfile.TarInfo) -> str:
        try:
            linkname = clean_name(member.linkname)
        except InvalidArgument:
            raise InvalidArgument(
                f"layer entry {member.name!r}: hard link target {member.linkname!r} is outside the root"
            ) from None
        if not linkname:
            raise InvalidArgument(f"layer entry {member.name!r}: hard link to the root")
        ldir, _, lbase = linkname.rpartition("/")
        target = os.path.join(root_path(self.root, ldir), lbase)
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidArgument(
                f"layer entry {member.name!r}: hard link target {member.linkname!r} does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"layer entry {member.name!r}: hard link to a directory")
        return target

    def _mknod(self, member: tarfile.TarInfo, path: str) -> bool:
        if member.ischr():
            kind = stat.S_IFCHR
        elif member.isblk():
            kind = stat.S_IFBLK
        else:
            kind = stat.S_IFIFO
        try:
            os.mknod(path, kind | (member.mode & 0o7777), os.makedev(member.devmajor, member.devminor))
        except PermissionError:
            if kind == stat.S_IFIFO or self.is_root:
                raise
            log.warning("layer entry %r skipped: creating a device needs privilege", member.name)
            return False
        return True

    def _set_attributes(self, member: tarfile.TarInfo, path: str) -> None:
        if self.is_root:
            os.lchown(path, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            if key.startswith(PAX_XATTR):
                self._setxattr(member, path, key[len(PAX_XATTR):], value)
        if not member.issym():
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                # after lchown, which clears setuid/setgid
                os.chmod(path, member.mode & 0o7777)
        if not member.isdir():
            os.utime(path, ns=self._times(member), follow_symlinks=False)

    def _setxattr(self, member: tarfile.TarInfo, path: str, key: str, value: str) -> None:
        if key.startswith("trusted."):
            log.warning("layer entry %r: xattr %s ignored (admin attributes are not applied)", member.name, key)
            return
        data = value.encode("utf-8", "surrogateescape")
        try:
            os.setxattr(path, key, data, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                log.warning("layer entry %r: xattr %s ignored: %s", member.name, key, exc)
                return
            if exc.errno == errno.EPERM and key.startswith("user.") and not (member.isreg() or member.isdir()):
                # user.* attributes exist on regular files and directories only
                log.warning("layer entry %r: xattr %s ignored: %s", member.name, key, exc)
                return
            raise

    @staticmethod
    def _times(member: tarfile.TarInfo) -> tuple[int, int]:
        mtime = float(member.mtime)
        atime = mtime
        raw = member.pax_headers.get("atime")
        if raw is not None:
            try:
                atime = max(float(raw), mtime)
            except ValueError:
                pass
        return _bound_ns(atime), _bound_ns(mtime)

    def _record(self, path: str) -> None:
        while path != self.root and path not in self.unpacked:
            self.unpacked.add(path)
            path = os.path.dirname(path)

    # -- parents ----------------------------------------------------------------------------

    def _mkparent(self, ppath: str, entry: str) -> None:
        rel = os.path.relpath(ppath, self.root)
        current = self.root
        sub = ""
        for part in rel.split("/"):
            current = os.path.join(current, part)
            sub = f"{sub}/{part}" if sub else part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    continue
                raise InvalidArgument(f"layer entry {entry!r}: parent {sub!r} is not a directory")
            os.mkdir(current, 0o755)
            os.chmod(current, 0o755)
            self._copy_parent_attributes(current, sub)
            self._record(current)

    def _copy_parent_attributes(self, path: str, sub: str) -> None:
        for lower in self.parents:
            lpath = root_path(lower, sub)
            try:
                st = os.lstat(lpath)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(st.st_mode):
                return  # replaced in that layer: keep the defaults
            os.lchown(path, st.st_uid, st.st_gid)
            os.chmod(path, stat.S_IMODE(st.st_mode))
            for key in _listxattr(lpath):
                if key.startswith("trusted."):
                    continue
                try:
                    os.setxattr(path, key, os.getxattr(lpath, key, follow_symlinks=False), follow_symlinks=False)
                except OSError as exc:
                    log.debug("xattr %s of %s not copied up: %s", key, lpath, exc)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            return

    # -- whiteouts --------------------------------------------------------------------------

    def _whiteout(self, member: tarfile.TarInfo, ppath: str, base: str) -> None:
        if base == WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(ppath, self.opaque_xattr, b"y", follow_symlinks=False)
            else:
                self._clear_lower(ppath)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("layer entry %r ignored: reserved whiteout name", member.name)
            return
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in ("", ".", ".."):
            raise InvalidArgument(f"layer entry {member.name!r}: invalid whiteout name")
        path = os.path.join(ppath, victim)
        if path in self.unpacked:
            return  # the same layer's own entry: a whiteout hides lower layers only
        _remove(path)
        if self.overlay:
            os.mknod(path, stat.S_IFCHR, 0)
            if self.is_root:
                os.lchown(path, member.uid, member.gid)

    def _clear_lower(self, dirpath: str) -> None:
        """Remove from ``dirpath`` everything this layer did not put there."""
        try:
            names = os.listdir(dirpath)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(dirpath, name)
            if path not in self.unpacked:
                _remove(path)
            elif stat.S_ISDIR(os.lstat(path).st_mode):
                self._clear_lower(path)

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        for name, atime, mtime in self.dirs:
            # resolved again: a later entry may have replaced a directory on the way by a link
            pdir, _, base = name.rpartition("/")
            path = os.path.join(root_path(self.root, pdir), base)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)


def _listxattr(path: str) -> Iterable[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
