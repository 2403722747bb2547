"""Waiting, before a process's exit is reported, until its output has reached its client.

ctr 1.6 (containerd's Go client before 34a93a0c2, see moby/moby#45689) closes its stdout and
stderr FIFOs as soon as Wait has answered and a Tasks/Get has followed, and only then waits
for its copy: whatever its reader had not taken from the FIFO yet is lost, and ``ctr run``
exits 0 having printed nothing. containerd's runc shim answers Wait as soon as it reaps the
process, while its copy into the FIFO may still be running, and a loaded host may not have
let the client read what is there. So ketchd answers a Wait, and our shim reports an exit,
only once the output is delivered:

* the shim no longer holds the FIFO (its copy reached the end of the output and closed its
  ends): ``holder``'s open files, for a shim ketchd watches from outside, and
* nothing is left in the FIFO for the client to read: FIONREAD on a reader opened for a
  moment. A FIFO nobody holds any more is empty, so a client that went away costs nothing.

Bounded (``TIMEOUT``): a process's background child may keep its output open for ever (the
runc shim's own Delete waits as long for its copy), and a client may stop reading.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import stat
import termios
from collections.abc import Iterable

#: how long the exit waits for the output
TIMEOUT = 2.0

Inode = tuple[int, int]


def fifos(paths: Iterable[str]) -> dict[Inode, str]:
    """The FIFOs among stdio destinations ``paths`` (FIFO paths, files, URIs), by inode."""
    found = {}
    for path in paths:
        if not path.startswith("/"):
            continue  # none, or a binary:// or file:// URI: the shim writes there itself
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode):
            found[(st.st_dev, st.st_ino)] = path
    return found


def holds(pid: int, inodes: Iterable[Inode]) -> bool:
    """Whether process ``pid`` has one of ``inodes`` open."""
    wanted = set(inodes)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            return True
    return False


def unread(path: str) -> int:
    """Bytes waiting in the FIFO at ``path`` (0 if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO):
            return 0
        raise
    try:
        n = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, n)
        return n[0]
    finally:
        os.close(fd)


def pending(paths: Iterable[str], holder: int = 0) -> str:
    """Why the output sent to ``paths`` is not delivered yet ("" when it is)."""
    found = fifos(paths)
    if holder > 0 and found and holds(holder, found):
        return "the shim is still copying it"
    for path in found.values():
        try:
            if unread(path) > 0:
                return "the client has not read it all"
        except OSError:
            continue
    return ""


async def delivered(paths: Iterable[str], holder: int = 0, timeout: float | None = None) -> str:
    """Wait (at most ``timeout``, default ``TIMEOUT``) until the output sent to ``paths`` is
    delivered: "" once it is, else why not."""
    paths = [p for p in paths if p]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (TIMEOUT if timeout is None else timeout)
    delay = 0.001
    while True:
        why = pending(paths, holder)
        if not why or loop.time() >= deadline:
            return why
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
