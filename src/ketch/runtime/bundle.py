"""A task's bundle: the directory a shim runs in, one per task.

    <state>/runtime/v2/<namespace>/<id>/     mode 0711: a user-namespaced container's root
                                             must traverse it to its rootfs, as with containerd
        config.json      the OCI spec (the container's spec, as stored)
        rootfs/          mount point for the task's rootfs mounts (0711)
        log              FIFO the shim writes its log to; ketchd copies it into its own log
        work -> <root>/runtime/v2/<namespace>/<id>   persistent scratch space for the shim;
                         ketchd's too: checkpoint-*/ a CRIU dump on its way to the content
                         store, restore/ a checkpoint to restore from, until the task starts
        ketch.json       what ketchd needs to reload the task: runtime name, shim binary
        address          the shim's ttrpc address (written by the shim's start)
        exited.json      written when the shim died: the task is a tombstone until deleted
        exits            one line per /tasks/exit a shim forwarded (process id, pid, time):
                         a shim that resends one after a lost answer is not published twice

Namespace and id are validated before any path is built from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ketch import errdefs, identifiers, mount
from ketch.files import write_atomic


#: how many forwarded exits a bundle remembers (see Bundle.note_exit)
EXITS_KEPT = 64
#: the names of CRIU dumps being made in a bundle's work directory (ketch.runtime.checkpoint)
DUMP_PREFIX = "checkpoint-"


@dataclass(frozen=True)
class Bundle:
    namespace: str
    id: str
    path: Path
    work: Path

    @classmethod
    def at(cls, state: str, root: str, namespace: str, id: str) -> Bundle:
        identifiers.validate(namespace)
        identifiers.validate(id)
        return cls(namespace, id, Path(state, "runtime", "v2", namespace, id),
                   Path(root, "runtime", "v2", namespace, id))

    def create(self, spec: bytes, info: dict[str, str]) -> None:
        """Make the bundle; AlreadyExists if one is there (a task of that id exists)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.path.mkdir(mode=0o711)
        except FileExistsError:
            raise errdefs.AlreadyExists(f"bundle for task {self.id} in namespace {self.namespace}") from None
        try:
            self.work.mkdir(parents=True, exist_ok=True, mode=0o711)
            (self.path / "work").symlink_to(self.work)
            (self.path / "rootfs").mkdir(mode=0o711)
            write_atomic(self.path / "config.json", spec, durable=False)
            write_atomic(self.path / "ketch.json", json.dumps(info).encode(), durable=False)
            os.mkfifo(self.path / "log", 0o700)
        except BaseException:
            with contextlib.suppress(errdefs.FailedPrecondition):  # nothing was mounted yet
                self.delete()
            raise

    @property
    def restore_image(self) -> Path:
        """Where the checkpoint a task is restored from is unpacked, until the task starts."""
        return self.work / "restore"

    def drop_checkpoints(self, *, restore: bool) -> None:
        """Remove the CRIU dumps left in the work directory by checkpoints that did not finish
        (ketchd died during them) and, with ``restore``, the image the task was restored from.
        Blocking: call it from a thread on an event loop."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.work):
                if entry.name.startswith(DUMP_PREFIX) or (restore and entry.path == str(self.restore_image)):
                    shutil.rmtree(entry.path, ignore_errors=True)

    @property
    def info(self) -> dict[str, str]:
        try:
            data: dict[str, str] = json.loads((self.path / "ketch.json").read_text())
            return data
        except (OSError, ValueError):
            return {}

    def address(self) -> str:
        try:
            return (self.path / "address").read_text().strip()
        except OSError:
            return ""

    def read_exit(self) -> dict[str, float] | None:
        try:
            data: dict[str, float] = json.loads((self.path / "exited.json").read_text())
            return data
        except (OSError, ValueError):
            return None

    def write_exit(self, pid: int, exit_status: int, exited_at: float) -> None:
        write_atomic(self.path / "exited.json",
                     json.dumps({"pid": pid, "exit_status": exit_status, "exited_at": exited_at}).encode(),
                     durable=False)  # runtime state: a reboot discards it with the bundle

    def note_exit(self, key: str) -> bool:
        """Record that the exit ``key`` was published; False if it was already. Only the last
        EXITS_KEPT are remembered: a shim resends an exit right after a lost answer, never
        one from long ago (and a task with many execs must not grow this file forever)."""
        path = self.path / "exits"
        try:
            seen = path.read_text().splitlines()
        except FileNotFoundError:
            seen = []
        if key in seen:
            return False
        if len(seen) >= 2 * EXITS_KEPT:
            write_atomic(path, "".join(f"{k}\n" for k in [*seen[-EXITS_KEPT:], key]).encode(), durable=False)
        else:
            with open(path, "a") as f:
                f.write(key + "\n")
        return True

    def delete(self) -> None:
        """Remove the bundle and its work directory, unmounting a rootfs left mounted first.

        Removal never reaches into a mount: a rootfs still mounted would show the container's
        image, whose files (a snapshot's layers) a recursive removal would delete. So every
        mount at or under the rootfs is unmounted, deepest first; if one will not go, or
        anything is still mounted in the bundle or its work directory, nothing is removed and
        FailedPrecondition says what is mounted where. The rootfs itself is removed with rmdir
        only (it holds nothing but mount points): a file left in it stops the removal too.
        Blocking: call it from a thread on an event loop."""
        rootfs = str(self.path / "rootfs")
        try:
            mount.unmount_recursive(rootfs)
        except OSError as e:
            raise self._kept(f"its rootfs will not unmount ({e})") from None
        busy = mount.mounts_under(str(self.path)) + mount.mounts_under(str(self.work))
        if busy:
            raise self._kept(f"still mounted at {', '.join(busy)}")
        try:
            _remove_directories(rootfs)
        except OSError as e:
            raise self._kept(f"its rootfs holds more than empty mount points after unmounting ({e})") from None
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def _kept(self, why: str) -> errdefs.FailedPrecondition:
        return errdefs.FailedPrecondition(
            f"bundle of task {self.id} in namespace {self.namespace} left in place at {self.path}: {why}; "
            "unmount it, then delete the task again")


def _remove_directories(path: str) -> None:
    """Remove the directory ``path`` and the directories in it, with rmdir only: OSError
    (ENOTEMPTY) when it holds anything else."""
    if not os.path.lexists(path):
        return
    for top, dirs, _files in os.walk(path, topdown=False):
        for name in dirs:
            os.rmdir(os.path.join(top, name))
    os.rmdir(path)


def walk(state: str, root: str) -> list[Bundle]:
    """Every bundle on disk, for reloading after a restart (invalid names are skipped)."""
    base = Path(state, "runtime", "v2")
    found: list[Bundle] = []
    if not base.is_dir():
        return found
    for ns_dir in sorted(base.iterdir()):
        if not ns_dir.is_dir():
            continue
        for task_dir in sorted(ns_dir.iterdir()):
            try:
                found.append(Bundle.at(state, root, ns_dir.name, task_dir.name))
            except errdefs.InvalidArgument:
                continue
    return found
