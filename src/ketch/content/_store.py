"""The content store: blobs addressed by their sha256, written through resumable ingests.

Everything that touches blob and ingest files lives here; the records (which namespace holds
which blob, which ingests exist) are :class:`ketch.metadata.Store`'s ``content`` noun. The
rules, after containerd's ``content/local`` and ``metadata/content.go``:

- **Visibility is a row.** A namespace sees a blob when it has a ``content`` row for it. A
  blob file appears only by an atomic rename of a verified ingest, inside the transaction
  that adds the row; a file without a row is invisible and garbage collection removes it.
  Nothing half-written or unverified is ever readable.
- **Files are shared, rows are not.** ``blobs/sha256/<hex>`` serves every namespace. A writer
  whose expected digest is already on disk (committed in another namespace) needs no data:
  committing it only adds the row ("shared" write, containerd's default policy).
- **Ingests are resumable.** ``ingest/<sha256(bref)>/`` holds ``data``, ``ref``,
  ``startedat``, ``updatedat`` and ``total``; a new writer on the same ref (after a close, a
  lost stream or a daemon restart) continues at the data's length, re-hashing what is there.
  One live writer per ref: another gets Unavailable ``ref X locked``.
- **A failed commit never leaves a blob.** Wrong size or digest: FailedPrecondition, the
  writer is closed, the ingest is kept (abort it, or write it again from offset 0), as
  containerd does.
- **Disk full is ResourceExhausted.** ENOSPC/EDQUOT while writing rolls the ingest back to
  where the failed write began, so the same writer may retry once space is freed; during
  commit's fsync the ingest can no longer be trusted and is discarded.
- **GC excludes writers.** Writer creation, commit and abort hold a shared lock; :meth:`sweep`
  (called by :mod:`ketch.gc`) holds it exclusively, so a file is never removed between the
  check that it exists and the row that makes it wanted.

Calls are synchronous and may do large IO: from an event loop, run them in a thread. A
:class:`Writer` is not safe for concurrent use; different writers are.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import random
import shutil
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ketch import filters as _filters
from ketch.topics import Publish
from ketch import identifiers
from ketch.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KetchError,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unknown,
)
from ketch.files import write_atomic
from ketch.metadata import ContentInfo, Ingest, LeaseResource
from ketch.digests import check_digest
from ketch.metadata._content import validate_labels

if TYPE_CHECKING:
    from ketch.metadata import Store

__all__ = ["BlobReader", "ContentStore", "Publish", "Status", "Sweep", "Writer"]


#: an ingest no lease holds may be dropped by garbage collection this long after it was opened
INGEST_EXPIRY = 24 * 3600.0

_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    """What :meth:`ContentStore.sweep` removed from disk."""

    blobs: tuple[str, ...] = ()
    """Digests of the blob files removed (wanted by no namespace and no ingest)."""
    ingests: tuple[str, ...] = ()
    """Names of the ingest directories removed (their record was gone)."""


# ---------------------------------------------------------------------------------------------
# small helpers


_check_namespace = identifiers.require_namespace


def _os_error(exc: OSError, doing: str) -> KetchError:
    """The one place an OS error becomes a typed error: disk full → ResourceExhausted."""
    words = _DISK_FULL.get(exc.errno or 0)
    if words is not None:
        return ResourceExhausted(f"{words} {doing}")
    return Unknown(f"{doing}: {exc.strerror or exc}")


def _format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.strip()).timestamp()


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GCLock:
    """A readers–writer lock: writers of content share it, the sweep takes it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _RefLocks:
    """One live writer per (namespace, ref), in this process (containerd ``content/local/locks.go``)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._held: dict[tuple[str, str], float] = {}

    def acquire(self, key: tuple[str, str], timeout: float) -> None:
        """Take the lock, retrying with growing random pauses for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            with self._mu:
                since = self._held.get(key)
                if since is None:
                    self._held[key] = time.time()
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                held_for = time.time() - since
                raise Unavailable(f"ref {key[1]} locked for {held_for:.3f}s (since {_format_time(since)})")
            time.sleep(min(remaining, random.random() * (1 << attempt) / 1000))
            attempt = min(attempt + 1, 9)

    def release(self, key: tuple[str, str]) -> None:
        with self._mu:
            self._held.pop(key, None)


@dataclass(slots=True)
class _Handle:
    """What a writer holds that must be let go even if the writer is dropped unclosed."""

    locks: _RefLocks
    key: tuple[str, str]
    fd: int = -1
    locked: bool = False

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.locked:
            self.locks.release(self.key)
            self.locked = False


# ---------------------------------------------------------------------------------------------
# reading


class BlobReader:
    """An open blob: random access with :meth:`read_at`, or sequential :meth:`read`.

    Made by :meth:`ContentStore.reader`. It reads the file it opened, even if garbage
    collection removes the blob meanwhile. Close it (or use ``with``).
    """

    def __init__(self, fd: int, digest: str, size: int) -> None:
        self._fd = fd
        self._pos = 0
        #: the blob's digest
        self.digest = digest
        #: the blob's size in bytes
        self.size = size

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``: fewer only at the end of the blob.

        An offset past the end is OutOfRange (``read past object length N bytes``, as
        containerd's Read service); a negative offset or size is InvalidArgument.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"read of blob {self.digest}: negative offset {offset} or size {size}")
        if offset > self.size:
            raise OutOfRange(f"read past object length {self.size} bytes")
        size = min(size, self.size - offset)
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def read(self, size: int = -1) -> bytes:
        """Read sequentially from the current position (all the rest when ``size < 0``)."""
        if size < 0:
            size = self.size - self._pos
        data = self.read_at(min(self._pos, self.size), size)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position of :meth:`read`."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise InvalidArgument(f"seek to negative position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        """The open file descriptor (for ``os.sendfile`` and friends)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# the store


class ContentStore:
    """Blobs under ``root`` (``blobs/sha256/<hex>``, ``ingest/…``), records in ``store``.

    ``publish(namespace, message)`` receives ``/content/delete`` events
    (``containerd.events.ContentDelete``). ``lock_timeout`` is how long :meth:`writer` waits
    for a ref that another writer holds before it answers Unavailable (containerd retries
    for about as long).
    """

    def __init__(self, root: str | os.PathLike[str], store: Store, *, publish: Publish | None = None,
                 lock_timeout: float = 0.5) -> None:
        self.root = os.fspath(root)
        self._store = store
        self._publish = publish
        self._lock_timeout = lock_timeout
        self._locks = _RefLocks()
        self._gc = _GCLock()
        self._blobs = os.path.join(self.root, "blobs", "sha256")
        self._ingests = os.path.join(self.root, "ingest")
        os.makedirs(self._blobs, mode=0o755, exist_ok=True)
        os.makedirs(self._ingests, mode=0o755, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        """Where the blob ``digest`` lives on disk (whether or not it is there); the digest is
        checked first, so the path is always inside ``blobs/sha256``."""
        check_digest(digest)
        return os.path.join(self._blobs, digest.partition(":")[2])

    def _ingest_path(self, bref: str) -> str:
        return os.path.join(self._ingests, hashlib.sha256(bref.encode()).hexdigest())

    # -- blobs ------------------------------------------------------------------------------

    def info(self, namespace: str, digest: str) -> ContentInfo:
        """The blob as ``namespace`` sees it; NotFound ``content digest sha256:…``."""
        _check_namespace(namespace)
        return self._store.content.get(namespace, digest)

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[ContentInfo]:
        """The namespace's blobs matching any filter (``digest``, ``size``, ``labels.<key>``)."""
        _check_namespace(namespace)
        return self._store.content.list(namespace, filters)

    def update(self, namespace: str, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        """Set labels (``labels``, ``labels.<key>``; none = all); returns the stored info."""
        _check_namespace(namespace)
        return self._store.content.update(namespace, info, fieldpaths)

    def delete(self, namespace: str, digest: str, *, lease: str | None = None) -> None:
        """Drop the namespace's hold on the blob and publish ``/content/delete``.

        The file stays until garbage collection finds nothing else wanting it. With
        ``lease``, the lease's reference to the blob goes too (containerd does this for the
        lease of the call).
        """
        _check_namespace(namespace)
        check_digest(digest)
        with self._store.transaction():
            self._store.content.delete(namespace, digest)
            if lease:
                self._store.leases.delete_resource(namespace, lease, LeaseResource(digest, "content"))
        if self._publish is not None:
            from ketch.api.containerd.events import content_pb2

            self._publish(namespace, content_pb2.ContentDelete(digest=digest))

    def reader(self, namespace: str, digest: str) -> BlobReader:
        """Open the blob for reading; NotFound unless ``namespace`` holds it."""
        _check_namespace(namespace)
        self._store.content.get(namespace, digest)
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} expected at {path}") from None
        except OSError as exc:
            raise _os_error(exc, f"opening blob {digest}") from None
        return BlobReader(fd, digest, os.fstat(fd).st_size)

    def read(self, namespace: str, digest: str, offset: int = 0, size: int = 0,
             chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The bytes of a blob in chunks, with the Read service's rules: a negative offset
        reads from 0; ``size <= 0`` or past the end reads to the end; an offset past the
        end is OutOfRange. Errors are raised by this call, before the first chunk."""
        reader = self.reader(namespace, digest)
        try:
            offset = max(offset, 0)
            if offset > reader.size:
                raise OutOfRange(f"read past object length {reader.size} bytes")
            if size <= 0 or offset + size > reader.size:
                size = reader.size - offset
        except BaseException:
            reader.close()
            raise
        return self._chunks(reader, offset, size, chunk_size)

    @staticmethod
    def _chunks(reader: BlobReader, offset: int, size: int, chunk_size: int) -> Iterator[bytes]:
        with reader:
            end = offset + size
            while offset < end:
                chunk = reader.read_at(offset, min(chunk_size, end - offset))
                if not chunk:
                    return
                yield chunk
                offset += len(chunk)

    # -- ingests ----------------------------------------------------------------------------

    def status(self, namespace: str, ref: str) -> Status:
        """Progress of the ingest ``ref``; NotFound ``reference <ref>``."""
        _check_namespace(namespace)
        ingest = self._store.content.get_ingest(namespace, ref)
        status = self._status(ingest)
        if status is None:
            raise NotFound(f"reference {ref}")
        return status

    def list_statuses(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Status]:
        """The namespace's ingests matching any filter (field ``ref``), by ref."""
        _check_namespace(namespace)
        match = _filters.parse(list(filters))
        out = []
        for ingest in self._store.content.list_ingests(namespace):
            status = self._status(ingest)
            if status is not None and match.match(_filters.adaptor_for({"ref": status.ref})):
                out.append(status)
        return out

    def abort(self, namespace: str, ref: str, *, lease: str | None = None) -> None:
        """Forget the ingest ``ref`` and remove its data; NotFound ``reference <ref>``.

        A live writer on the ref fails at commit afterwards. With ``lease``, the lease's
        reference to the ingest goes too.
        """
        _check_namespace(namespace)
        with self._gc.shared():
            with self._store.transaction():
                ingest = self._store.content.delete_ingest(namespace, ref)
                if lease:
                    self._store.leases.delete_resource(namespace, lease, LeaseResource(ref, "ingests"))
            shutil.rmtree(self._ingest_path(ingest.bref), ignore_errors=True)

    def writer(self, namespace: str, ref: str, total: int = 0, expected: str = "", *,
               lease: str | None = None) -> Writer:
        """Open (or resume) the write ``ref``; the result is locked to this writer until closed.

        - ``expected`` already held by the namespace: AlreadyExists ``content sha256:…`` (the
          lease, if any, is made to hold it first, as containerd does);
        - ``expected`` on disk from another namespace, and ``total`` 0 or its size: a shared
          writer; its status is already complete, commit adds the namespace's row;
        - otherwise the ingest directory is created, or resumed at the length of its data;
        - another live writer on the ref: Unavailable ``ref <ref> locked …``.

        With ``lease`` the lease holds the ingest (and, after commit, the blob); without one
        the ingest expires after :data:`INGEST_EXPIRY` for garbage collection.
        """
        _check_namespace(namespace)
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if total < 0:
            raise InvalidArgument(f"ref {ref}: total {total} is negative")
        if expected:
            check_digest(expected)
        records, leases = self._store.content, self._store.leases
        # one live writer per ref, shared writes included; wait for the ref holding nothing else
        handle = _Handle(self._locks, (namespace, ref))
        self._locks.acquire(handle.key, self._lock_timeout)
        handle.locked = True
        try:
            with self._gc.shared():
                shared_size = -1
                with self._store.transaction():
                    if expected and self._held(namespace, expected):
                        if lease:
                            leases.add_resource(namespace, lease, LeaseResource(expected, "content"))
                        exists = True
                    else:
                        exists = False
                        if expected:
                            with contextlib.suppress(FileNotFoundError):
                                size = os.stat(self.blob_path(expected)).st_size
                                if total in (0, size):
                                    shared_size = total = size
                        if lease:
                            leases.add_resource(namespace, lease, LeaseResource(ref, "ingests"))
                        ingest = records.open_ingest(
                            namespace, ref, expected if shared_size >= 0 else "",
                            None if lease else time.time() + INGEST_EXPIRY,
                        )
                if exists:
                    raise AlreadyExists(f"content {expected}")
                writer = Writer(self, namespace, ingest, total, lease, handle)
                if shared_size >= 0:
                    writer._share(expected, shared_size)
                else:
                    writer._open(total)
        except BaseException:
            handle.release()
            raise
        return writer

    # -- garbage collection -----------------------------------------------------------------

    def sweep(self) -> Sweep:
        """Remove blob files no namespace holds and no ingest expects, and ingest
        directories whose record is gone (containerd's content cleanup after a GC)."""
        blobs: list[str] = []
        ingests: list[str] = []
        with self._gc.exclusive():
            keep = self._store.content.referenced()
            with os.scandir(self._blobs) as entries:
                for entry in entries:
                    digest = f"sha256:{entry.name}"
                    if digest in keep:
                        continue
                    try:
                        check_digest(digest)
                    except KetchError:
                        continue  # not ours to judge
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        blobs.append(digest)
            wanted = {os.path.basename(self._ingest_path(b)) for b in self._store.content.ingest_brefs()}
            with os.scandir(self._ingests) as entries:
                for entry in entries:
                    if entry.name not in wanted:
                        shutil.rmtree(entry.path, ignore_errors=True)
                        ingests.append(entry.name)
        return Sweep(blobs=tuple(sorted(blobs)), ingests=tuple(sorted(ingests)))

    # -- for writers ------------------------------------------------------------------------

    def _held(self, namespace: str, digest: str) -> bool:
        try:
            self._store.content.get(namespace, digest)
        except NotFound:
            return False
        return True

    def _status(self, ingest: Ingest) -> Status | None:
        path = self._ingest_path(ingest.bref)
        try:
            return _disk_status(path, ingest.ref, ingest.bref)
        except (OSError, ValueError):
            pass
        if ingest.expected:
            with contextlib.suppress(OSError):
                st = os.stat(self.blob_path(ingest.expected))
                return Status(ref=ingest.ref, offset=st.st_size, total=st.st_size, expected=ingest.expected,
                              started_at=st.st_mtime, updated_at=st.st_mtime)
        return None


def _disk_status(path: str, ref: str, bref: str) -> Status:
    """Read an ingest directory (OSError/ValueError when it is missing or damaged)."""
    st = os.stat(os.path.join(path, "data"))
    if _read_text(os.path.join(path, "ref")) != bref:
        raise ValueError(f"ingest {path} belongs to another ref")
    started = _parse_time(_read_text(os.path.join(path, "startedat")))
    updated = _parse_time(_read_text(os.path.join(path, "updatedat")))
    try:
        total = int(_read_text(os.path.join(path, "total")))
    except (OSError, ValueError):
        total = 0
    return Status(ref=ref, offset=st.st_size, total=total, started_at=started,
                  updated_at=max(updated, st.st_mtime))


# ---------------------------------------------------------------------------------------------
# writing


class Writer:
    """One write in progress; made by :meth:`ContentStore.writer`.

    ``write`` appends (or, with containerd's offset rules, restarts), ``commit`` verifies and
    publishes the blob, ``close`` keeps the progress for a later writer on the same ref.
    After ``commit`` — successful or not — the writer is closed.
    """

    def __init__(self, cs: ContentStore, namespace: str, ingest: Ingest, total: int, lease: str | None,
                 handle: _Handle) -> None:
        self._cs = cs
        self.namespace = namespace
        self.ref = ingest.ref
        self._bref = ingest.bref
        self._path = cs._ingest_path(ingest.bref)
        self._lease = lease
        self._total = total
        self._offset = 0
        self._hash = hashlib.sha256()
        self._started = self._updated = time.time()
        self._shared: tuple[str, int] | None = None  # (digest, size) of a shared write
        self._closed = False
        self._handle = handle  # the ref is locked for this writer
        self._finalizer = weakref.finalize(self, self._handle.release)

    # -- opening ----------------------------------------------------------------------------

    def _share(self, digest: str, size: int) -> None:
        self._shared = (digest, size)
        self._offset = self._total = size

    def _open(self, total: int, *, fresh: bool = False) -> None:
        """Open the ingest directory: resume it (unless ``fresh``), or create it."""
        created = False
        try:
            try:
                os.mkdir(self._path, 0o755)
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
                shutil.rmtree(self._path, ignore_errors=True)
            raise _os_error(exc, f"opening ingest {self.ref}") from None

    def _resume(self, total: int) -> bool:
        status = _disk_status(self._path, self.ref, self._bref)
        if total > 0 and status.total > 0 and total != status.total:
            return False  # containerd: "provided total differs from status": start over
        fd = os.open(os.path.join(self._path, "data"), os.O_RDWR | os.O_CLOEXEC)
        try:
            offset = 0
            while chunk := os.read(fd, _CHUNK):
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
            write_atomic(os.path.join(self._path, "total"), str(total).encode())
            self._total = total
        return True

    def _create(self, total: int) -> None:
        now = time.time()
        write_atomic(os.path.join(self._path, "ref"), self._bref.encode())
        write_atomic(os.path.join(self._path, "startedat"), _format_time(now).encode())
        write_atomic(os.path.join(self._path, "updatedat"), _format_time(now).encode())
        total_path = os.path.join(self._path, "total")
        if total > 0:
            write_atomic(total_path, str(total).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(total_path)
        self._handle.fd = os.open(os.path.join(self._path, "data"),
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
        return f"sha256:{self._hash.hexdigest()}"

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
            raise _os_error(exc, f"writing ingest {self.ref}") from None
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
            raise _os_error(exc, f"truncating ingest {self.ref}") from None
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
                with open(self._cs.blob_path(digest), "rb") as f:
                    while chunk := f.read(_CHUNK):
                        self.write(chunk)
            except OSError as exc:
                raise _os_error(exc, f"copying blob {digest} into ingest {self.ref}") from None

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
        cs = self._cs
        try:
            labels = dict(labels or {})
            validate_labels(labels)
            if expected:
                check_digest(expected)
        except BaseException:
            self.close()
            raise
        handle = self._handle
        self._closed = True
        try:
            if self._shared:
                digest, actual_size = self._shared
                if size > 0 and size != actual_size:
                    raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
                if expected and expected != digest:
                    raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
                return self._record(digest, actual_size, labels, data=None)
            try:
                os.fsync(handle.fd)
                actual_size = os.fstat(handle.fd).st_size
            except OSError as exc:
                error = _os_error(exc, f"committing ingest {self.ref}")
                if isinstance(error, ResourceExhausted):
                    # after a failed fsync the kernel may have dropped the data: start over
                    with contextlib.suppress(KetchError):
                        cs.abort(self.namespace, self.ref, lease=self._lease)
                    error = ResourceExhausted(f"{error.message}; the ingest was discarded, write it again")
                raise error from None
            finally:
                os.close(handle.fd)
                handle.fd = -1
            digest = self.digest()
            if size > 0 and size != actual_size:
                raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
            if expected and expected != digest:
                raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
            # the ref stays locked until the ingest record is gone, so that no new writer
            # resumes a directory this commit is about to empty
            return self._record(digest, actual_size, labels, data=os.path.join(self._path, "data"))
        finally:
            handle.release()
            self._finalizer.detach()

    def _record(self, digest: str, size: int, labels: dict[str, str], data: str | None) -> ContentInfo:
        """Move the verified data into place and add the namespace's row, atomically as seen
        by readers: the row, which makes the blob visible, comes with or after the file."""
        cs, store = self._cs, self._cs._store
        ns, ref = self.namespace, self.ref
        target = cs.blob_path(digest)
        already = False
        with cs._gc.shared():
            with store.transaction():
                try:
                    ingest = store.content.get_ingest(ns, ref)
                except NotFound:
                    raise NotFound(f"ingest {ref} was aborted before its commit") from None
                if ingest.bref != self._bref:
                    raise NotFound(f"ingest {ref} was aborted before its commit")
                store.content.delete_ingest(ns, ref)
                if self._lease:
                    store.leases.delete_resource(ns, self._lease, LeaseResource(ref, "ingests"))
                    store.leases.add_resource(ns, self._lease, LeaseResource(digest, "content"))
                if data is not None and not os.path.exists(target):
                    try:
                        os.rename(data, target)
                    except OSError as exc:
                        raise _os_error(exc, f"committing ingest {ref}") from None
                    # no row sees the file yet: making it read-only after the rename is safe
                    with contextlib.suppress(OSError):
                        os.chmod(target, 0o444)
                        _fsync_dir(cs._blobs)
                try:
                    info = store.content.add(ns, ContentInfo(digest, size, labels))
                except AlreadyExists:
                    already = True  # as containerd: the ingest and lease changes still stand
            shutil.rmtree(self._path, ignore_errors=True)
        if already:
            raise AlreadyExists(f"content {digest}")
        return info

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
                write_atomic(os.path.join(self._path, "updatedat"), _format_time(self._updated).encode())
        handle.release()
        self._finalizer.detach()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"writer for ref {self.ref} is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

