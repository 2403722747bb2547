"""Filesystem work the snapshotters share: copying a tree whole, measuring one (removing one
is :func:`ketch.mount.remove_tree`, which never reaches into a mount).

Nothing here follows a symbolic link: trees are read with ``lstat`` and written with
``O_NOFOLLOW`` / ``follow_symlinks=False``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from ketch.snapshots._types import Usage

__all__ = ["copy_tree", "disk_usage"]

log = logging.getLogger("ketch.snapshots")

_COPY_CHUNK = 1 << 30


def copy_tree(src: str, dst: str) -> None:
    """Copy the tree at ``src`` into the directory ``dst`` (created if missing).

    Keeps ownership, modes (setuid and sticky bits too), extended attributes, timestamps,
    symbolic links as links, hard links as links within the copy, and device nodes and FIFOs
    (which needs CAP_MKNOD). Sockets are skipped. The attributes of ``src`` itself are copied
    to ``dst``. Extended attributes that cannot be set are skipped, as containerd does.
    """
    links: dict[tuple[int, int], str] = {}
    _copy_dir(src, dst, os.lstat(src), links)


def _copy_dir(src: str, dst: str, st: os.stat_result, links: dict[tuple[int, int], str]) -> None:
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(dst).st_mode):
            raise
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        s = entry.path
        d = os.path.join(dst, entry.name)
        est = entry.stat(follow_symlinks=False)
        mode = est.st_mode
        if stat.S_ISDIR(mode):
            _copy_dir(s, d, est, links)
            continue
        ident = (est.st_dev, est.st_ino)
        if est.st_nlink > 1 and ident in links:
            os.link(links[ident], d, follow_symlinks=False)
            continue
        if stat.S_ISREG(mode):
            _copy_file(s, d)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(d, stat.S_IFMT(mode) | 0o600, est.st_rdev)
        else:
            log.warning("copy of %s skipped: unsupported file type %o", s, stat.S_IFMT(mode))
            continue
        if est.st_nlink > 1:
            links[ident] = d
        copy_attributes(s, d, est)
    copy_attributes(src, dst, st)


def _copy_file(src: str, dst: str) -> None:
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _copy_data(sfd, dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_data(sfd: int, dfd: int) -> None:
    try:
        while os.copy_file_range(sfd, dfd, _COPY_CHUNK) > 0:
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    # both offsets stand where copy_file_range stopped: go on with plain reads and writes
    while buf := os.read(sfd, 1 << 20):
        view = memoryview(buf)
        while view:
            view = view[os.write(dfd, view):]


def copy_attributes(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, mode, extended attributes and times of ``src`` (stat ``st``) onto ``dst``."""
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        # after chown, which clears the setuid and setgid bits
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as exc:
            log.debug("xattr %s of %s not copied: %s", name, src, exc)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def disk_usage(path: str) -> Usage:
    """Blocks and inodes used under ``path`` (itself included), each inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Usage()
    stack = [(path, st)]
    while stack:
        p, st = stack.pop()
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                for entry in it:
                    stack.append((entry.path, entry.stat(follow_symlinks=False)))
    return Usage(size=size, inodes=len(seen))
