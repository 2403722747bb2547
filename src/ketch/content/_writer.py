"""Writing blobs: :class:`Writer`, one resumable ingest, and the files of its directory.

``ingest/<sha256(bref)>/`` holds ``data``, ``ref``, ``startedat``, ``updatedat`` and ``total``
(containerd ``content/local/writer.go``); this module is the only one that writes them, and
:func:`ingest_status` the one that reads them back. They are written atomically but not
durably (as containerd): after a power cut an ingest whose files are damaged starts over, and
a resumed one re-hashes its data; what must survive is the committed blob (durable rename). A writer never reaches into its store:
what it needs of it (where blobs live, moving a verified ingest into place with its
records, aborting) is handed over as an :class:`Owner`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ketch import digests
from ketch.content._disk import CHUNK, format_time, os_error, parse_time, read_text
from ketch.content._locks import Handle
from ketch.errdefs import FailedPrecondition, InvalidArgument, KetchError, OutOfRange, ResourceExhausted
from ketch.files import write_atomic
from ketch.metadata import ContentInfo, Ingest
from ketch.metadata._content import validate_labels

__all__ = ["Owner", "Status", "Writer", "ingest_status"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """Progress of one ingest (containerd ``content.Status``)."""

    ref: str
    """The client's ref."""
    offset: int
    """Bytes written so far: where the next write must start."""
    total: int
    """The size announced when the write began (0 if none)."""
    expected: str = ""
    """For a shared write: the digest of the blob already on disk; else ""."""
    started_at: float = 0.0
    """When the ingest was first opened (seconds since the epoch)."""
    updated_at: float = 0.0
    """When data was last written."""


@dataclass(frozen=True, slots=True)
class Owner:
    """What a :class:`Writer` needs of the store that made it (the store's internal interface
    for writers; :class:`ContentStore` builds one and hands it to each writer)."""

    blob_path: Callable[[str], str]
    """Where the blob of a (checked) digest lives."""
    commit: Callable[[Writer, str, int, dict[str, str], str | None], ContentInfo]
    """``commit(writer, digest, size, labels, data)``: drop the writer's ingest record, move
    ``data`` (the verified file, or None for a shared write) to the blob's place and add the
    namespace's row, atomically as seen by readers; returns the stored info."""
    abort: Callable[[str, str, str | None], None]
    """``abort(namespace, ref, lease)``: forget an ingest that can no longer be trusted."""


def ingest_status(path: str, ref: str, bref: str) -> Status:
    """Read an ingest directory (OSError/ValueError when it is missing or damaged)."""
    st = os.stat(os.path.join(path, "data"))
    if read_text(os.path.join(path, "ref")) != bref:
        raise ValueError(f"ingest {path} belongs to another ref")
    started = parse_time(read_text(os.path.join(path, "startedat")))
    updated = parse_time(read_text(os.path.join(path, "updatedat")))
    try:
        total = int(read_text(os.path.join(path, "total")))
    except (OSError, ValueError):
        total = 0
    return Status(ref=ref, offset=st.st_size, total=total, started_at=started,
                  updated_at=max(updated, st.st_mtime))


class Writer:
    """One write in progress; made by :meth:`ContentStore.writer`.

    ``write`` appends (or, with containerd's offset rules, restarts), ``commit`` verifies and
    publishes the blob, ``close`` keeps the progress for a later writer on the same ref.
    After ``commit`` — successful or not — the writer is closed.
    """

    def __init__(self, owner: Owner, namespace: str, ingest: Ingest, path: str, total: int, lease: str | None,
                 handle: Handle, *, shared: tuple[str, int] | None = None) -> None:
        self._owner = owner
        self.namespace = namespace
        self.ref = ingest.ref
        self.bref = ingest.bref
        """The ref as recorded (namespace-qualified), which names the ingest directory."""
        self.path = path
        """The ingest directory."""
        self.lease = lease
        self._total = total
        self._offset = 0
        self._hash = hashlib.sha256()
        self._started = self._updated = time.time()
        self._shared: tuple[str, int] | None = None  # (digest, size) of a shared write
        self._closed = False
        self._handle = handle  # the ref is locked for this writer
        self._finalizer = weakref.finalize(self, self._handle.release)
        if shared is not None:
            self._shared = shared
            self._offset = self._total = shared[1]
        else:
            self._open(total)

    # -- opening ----------------------------------------------------------------------------

    def _open(self, total: int, *, fresh: bool = False) -> None:
        """Open the ingest directory: resume it (unless ``fresh``), or create it."""
        created = False
        try:
            try:
                os.mkdir(self.path, 0o755)
                created = True
            except FileExistsError:
                pass
            resumed = False
            if not created and not fresh:
                try:
                    resumed = self._resume(total)
                except (OSError, ValueError):
                    resumed = False
            if not resumed:
                self._create(total)
        except OSError as exc:
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            raise os_error(exc, f"opening ingest {self.ref}") from None

    def _resume(self, total: int) -> bool:
        status = ingest_status(self.path, self.ref, self.bref)
        if total > 0 and status.total > 0 and total != status.total:
            return False  # containerd: "provided total differs from status": start over
        fd = os.open(os.path.join(self.path, "data"), os.O_RDWR | os.O_CLOEXEC)
        try:
            offset = 0
            while chunk := os.read(fd, CHUNK):
                self._hash.update(chunk)
                offset += len(chunk)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            self._hash = hashlib.sha256()
            raise
        self._handle.fd = fd
        self._offset = offset
        self._started, self._updated = status.started_at, status.updated_at
        self._total = status.total
        if total > 0 and status.total == 0:
            write_atomic(os.path.join(self.path, "total"), str(total).encode(), durable=False)
            self._total = total
        return True

    def _create(self, total: int) -> None:
        now = time.time()
        write_atomic(os.path.join(self.path, "ref"), self.bref.encode(), durable=False)
        write_atomic(os.path.join(self.path, "startedat"), format_time(now).encode(), durable=False)
        write_atomic(os.path.join(self.path, "updatedat"), format_time(now).encode(), durable=False)
        total_path = os.path.join(self.path, "total")
        if total > 0:
            write_atomic(total_path, str(total).encode(), durable=False)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(total_path)
        self._handle.fd = os.open(os.path.join(self.path, "data"),
                                  os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._hash = hashlib.sha256()
        self._offset, self._total = 0, total
        self._started = self._updated = now

    # -- state ------------------------------------------------------------------------------

    def status(self) -> Status:
        """Where this write stands."""
        expected = self._shared[0] if self._shared else ""
        return Status(ref=self.ref, offset=self._offset, total=self._total, expected=expected,
                      started_at=self._started, updated_at=self._updated)

    def digest(self) -> str:
        """The digest of the bytes written so far (of the shared blob, for a shared write)."""
        if self._shared:
            return self._shared[0]
        return digests.from_sha256_hex(self._hash.hexdigest())

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, offset: int | None = None) -> int:
        """Append ``data``; returns the new offset.

        ``offset``, when given, follows containerd's Write service: a positive offset must
        equal the current one (else OutOfRange ``write @N must occur at current offset M``);
        offset 0 on a started ingest truncates it and starts over. Disk full is
        ResourceExhausted and leaves the ingest as it was before this call.
        """
        self._check_open()
        if offset is not None:
            if offset > 0 and offset != self._offset:
                raise OutOfRange(f"write @{offset} must occur at current offset {self._offset}")
            if offset == 0 and self._offset > 0:
                self.truncate(0)
        view = memoryview(data).cast("B")
        if not len(view):
            return self._offset
        if self._shared:
            self._unshare(copy=True)
        fd = self._handle.fd
        before, hashed = self._offset, self._hash.copy()
        written = 0
        try:
            while written < len(view):
                n = os.write(fd, view[written:])
                self._hash.update(view[written:written + n])
                written += n
        except OSError as exc:
            self._hash = hashed
            try:
                os.ftruncate(fd, before)
                os.lseek(fd, before, os.SEEK_SET)
            except OSError:
                self.close()  # cannot roll back: a later writer resumes from what is on disk
            raise os_error(exc, f"writing ingest {self.ref}") from None
        self._offset = before + written
        self._updated = time.time()
        return self._offset

    def truncate(self, size: int = 0) -> None:
        """Start the write over; only size 0 is supported (as containerd)."""
        self._check_open()
        if size != 0:
            raise InvalidArgument(f"truncate of ingest {self.ref} to {size}: only 0 is supported")
        if self._shared:
            self._unshare(copy=False)
            return
        fd = self._handle.fd
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise os_error(exc, f"truncating ingest {self.ref}") from None
        self._hash = hashlib.sha256()
        self._offset = 0
        self._updated = time.time()

    def _unshare(self, *, copy: bool) -> None:
        """A shared write receives data after all: make a real ingest (containerd's
        createAndCopy), holding a copy of the shared blob when ``copy``."""
        assert self._shared is not None
        digest, size = self._shared
        self._shared = None
        try:
            self._open(size if copy else 0, fresh=True)
        except BaseException:
            self._shared = (digest, size)
            raise
        if copy:
            try:
                with open(self._owner.blob_path(digest), "rb") as f:
                    while chunk := f.read(CHUNK):
                        self.write(chunk)
            except OSError as exc:
                raise os_error(exc, f"copying blob {digest} into ingest {self.ref}") from None

    # -- committing -------------------------------------------------------------------------

    def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> ContentInfo:
        """Verify the data and make it the blob ``sha256:<digest>`` of this namespace.

        ``size`` (when > 0) and ``expected`` (when set) must match what was written:
        FailedPrecondition ``unexpected commit size N, expected M`` / ``unexpected commit
        digest sha256:x, expected sha256:y``; the ingest is kept. When the namespace already
        holds the blob: AlreadyExists ``content sha256:…`` (the ingest is gone, the lease
        holds the blob). Returns the stored info. The writer is closed afterwards, whatever
        the outcome.
        """
        self._check_open()
        try:
            labels = dict(labels or {})
            validate_labels(labels)
            if expected:
                digests.check_digest(expected)
        except BaseException:
            self.close()
            raise
        handle = self._handle
        self._closed = True
        try:
            data: str | None = None
            if self._shared:
                digest, actual_size = self._shared
            else:
                actual_size = self._sync_and_close()
                digest, data = self.digest(), os.path.join(self.path, "data")
            if size > 0 and size != actual_size:
                raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
            if expected and expected != digest:
                raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
            # the ref stays locked until the ingest record is gone, so that no new writer
            # resumes a directory this commit is about to empty
            return self._owner.commit(self, digest, actual_size, labels, data)
        finally:
            handle.release()
            self._finalizer.detach()

    def _sync_and_close(self) -> int:
        """Flush the data file to disk and close it; returns its size."""
        handle = self._handle
        try:
            os.fsync(handle.fd)
            return os.fstat(handle.fd).st_size
        except OSError as exc:
            error = os_error(exc, f"committing ingest {self.ref}")
            if isinstance(error, ResourceExhausted):
                # after a failed fsync the kernel may have dropped the data: start over
                with contextlib.suppress(KetchError):
                    self._owner.abort(self.namespace, self.ref, self.lease)
                error = ResourceExhausted(f"{error.message}; the ingest was discarded, write it again")
            raise error from None
        finally:
            os.close(handle.fd)
            handle.fd = -1

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the ref, keeping the progress: a later writer on it resumes here."""
        if self._closed:
            return
        self._closed = True
        handle = self._handle
        if handle.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(handle.fd)
            with contextlib.suppress(OSError):
                write_atomic(os.path.join(self.path, "updatedat"), format_time(self._updated).encode(),
                             durable=False)
        handle.release()
        self._finalizer.detach()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"writer for ref {self.ref} is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

