"""Mounting containerd.types.Mount values (type, source, options) with mount(2).

Options are split the way the kernel wants them: known words become mount flags
(ro, bind, nosuid, …) and the rest is passed as the filesystem's data string
(overlay's lowerdir=…,upperdir=…). A read-only bind mount takes a second, remounting call.

Removing a tree never reaches into a mounted filesystem (:func:`remove_tree`): a bundle's
rootfs or a snapshot's directory may still show a container's image, whose files a
recursive removal would delete.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("ketch.mount")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# option → (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS), "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC), "remount": (False, MS_REMOUNT),
    "mand": (False, MS_MANDLOCK), "nomand": (True, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME), "diratime": (True, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME), "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
}
_PROPAGATION = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
}

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: Iterable[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data) for a list of mount options."""
    flags = prop = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            prop |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, prop, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype) if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    """Mount ``m`` on ``target``; read-only binds and propagation get their own calls."""
    flags, prop, data = parse_options(m.options)
    _mount(m.source, target, m.type, flags & ~MS_RDONLY if flags & MS_BIND else flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        _mount("", target, "", flags | MS_REMOUNT, "")
    if prop:
        _mount("", target, "", prop, "")


def mount_all(mounts: Iterable[Mount], target: str) -> None:
    """Mount every item on ``target`` in order; on failure undo what was mounted."""
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str, flags: int = 0) -> bool:
    """Unmount one layer from ``target``; False when nothing was mounted there."""
    rc = _libc.umount2(os.fsencode(target), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY and not flags & MNT_DETACH:
        return unmount(target, flags | MNT_DETACH)
    raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount every layer stacked on ``target``."""
    for _ in range(64):
        if not unmount(target):
            return


def unmount_recursive(target: str) -> None:
    """Unmount everything mounted at or below ``target``, deepest first (containerd's
    UnmountRecursive); OSError when a mount will not go."""
    for point in sorted(mounts_under(target), key=lambda p: p.count("/"), reverse=True):
        unmount_all(point)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mounts_under(path: str) -> list[str]:
    """Mount points of this process at or below ``path``."""
    path = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == path or point.startswith(path.rstrip("/") + "/"):
            found.append(point)
    return found


def remove_tree(path: str) -> bool:
    """Remove the tree at ``path``; refuse (False, with a warning) while anything is mounted
    inside it, so that removal never reaches into a mounted filesystem."""
    busy = mounts_under(path)
    if busy:
        log.warning("not removing %s: still mounted at %s", path, ", ".join(busy))
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return True
