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
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ketch import digests
from ketch import filters as _filters
from ketch import identifiers
from ketch.files import rename_durable
from ketch.content._disk import CHUNK, os_error
from ketch.content._locks import GCLock, Handle, RefLocks
from ketch.content._reader import BlobReader
from ketch.content._writer import Owner, Status, Writer, ingest_status
from ketch.errdefs import AlreadyExists, InvalidArgument, KetchError, NotFound
from ketch.metadata import ContentInfo, Ingest, LeaseResource
from ketch.topics import Publish

if TYPE_CHECKING:
    from ketch.metadata import Store

__all__ = ["INGEST_EXPIRY", "ContentStore", "Sweep"]


#: an ingest no lease holds may be dropped by garbage collection this long after it was opened
INGEST_EXPIRY = 24 * 3600.0

_check_namespace = identifiers.require_namespace


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    """What :meth:`ContentStore.sweep` removed from disk."""

    blobs: tuple[str, ...] = ()
    """Digests of the blob files removed (wanted by no namespace and no ingest)."""
    ingests: tuple[str, ...] = ()
    """Names of the ingest directories removed (their record was gone)."""


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
        self._locks = RefLocks()
        self._gc = GCLock()
        self._blobs = os.path.join(self.root, "blobs", "sha256")
        self._ingests = os.path.join(self.root, "ingest")
        os.makedirs(self._blobs, mode=0o755, exist_ok=True)
        os.makedirs(self._ingests, mode=0o755, exist_ok=True)
        #: bytes of the blobs committed into new files (for ketchd's metrics; commits run in threads)
        self.ingested = 0
        self._ingested_lock = threading.Lock()
        self._owner = Owner(blob_path=self.blob_path, commit=self._commit,
                            abort=lambda ns, ref, lease: self.abort(ns, ref, lease=lease))

    # -- paths ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        """Where the blob ``digest`` lives on disk (whether or not it is there); the digest is
        checked first, so the path is always inside ``blobs/sha256``."""
        return os.path.join(self._blobs, digests.sha256_hex(digest))

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
        digests.check_digest(digest)
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
            raise os_error(exc, f"opening blob {digest}") from None
        return BlobReader(fd, digest, os.fstat(fd).st_size)

    def read(self, namespace: str, digest: str, offset: int = 0, size: int = 0,
             chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The bytes of a blob in chunks, by the Read rules of :func:`read_span` (negative
        offset: from 0; size 0 or less, or past the end: to the end; offset past the end:
        OutOfRange). Errors are raised by this call, before the first chunk."""
        reader = self.reader(namespace, digest)
        try:
            chunks = reader.chunks(offset, size, chunk_size)
        except BaseException:
            reader.close()
            raise
        return self._data(reader, chunks)

    @staticmethod
    def _data(reader: BlobReader, chunks: Iterator[tuple[int, bytes]]) -> Iterator[bytes]:
        with reader:
            for _, data in chunks:
                yield data

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
            digests.check_digest(expected)
        records, leases = self._store.content, self._store.leases
        # one live writer per ref, shared writes included; wait for the ref holding nothing else
        handle = Handle(self._locks, (namespace, ref))
        handle.lock(self._lock_timeout)
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
                shared = (expected, shared_size) if shared_size >= 0 else None
                writer = Writer(self._owner, namespace, ingest, self._ingest_path(ingest.bref), total, lease,
                                handle, shared=shared)
        except BaseException:
            handle.release()
            raise
        return writer

    def usage(self) -> dict[str, tuple[int, int]]:
        """Namespace → (blobs, bytes) it holds (a blob two namespaces hold counts in both)."""
        return self._store.content.usage()

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
                    digest = digests.from_sha256_hex(entry.name)
                    if digest in keep:
                        continue
                    try:
                        digests.check_digest(digest)
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

    def _commit(self, writer: Writer, digest: str, size: int, labels: dict[str, str],
                data: str | None) -> ContentInfo:
        """The end of :meth:`Writer.commit` (the writer's :class:`Owner` ``commit``): drop the
        ingest record, move the verified ``data`` into place and add the namespace's row,
        atomically as seen by readers: the row, which makes the blob visible, comes with or
        after the file."""
        store = self._store
        ns, ref = writer.namespace, writer.ref
        target = self.blob_path(digest)
        already = False
        with self._gc.shared():
            with store.transaction():
                try:
                    ingest = store.content.get_ingest(ns, ref)
                except NotFound:
                    raise NotFound(f"ingest {ref} was aborted before its commit") from None
                if ingest.bref != writer.bref:
                    raise NotFound(f"ingest {ref} was aborted before its commit")
                store.content.delete_ingest(ns, ref)
                if writer.lease:
                    store.leases.delete_resource(ns, writer.lease, LeaseResource(ref, "ingests"))
                    store.leases.add_resource(ns, writer.lease, LeaseResource(digest, "content"))
                if data is not None and not os.path.exists(target):
                    try:
                        # on disk before the row that makes it visible commits
                        rename_durable(data, target)
                    except OSError as exc:
                        raise os_error(exc, f"committing ingest {ref}") from None
                    # no row sees the file yet: making it read-only after the rename is safe
                    with contextlib.suppress(OSError):
                        os.chmod(target, 0o444)
                    with self._ingested_lock:
                        self.ingested += size
                try:
                    info = store.content.add(ns, ContentInfo(digest, size, labels))
                except AlreadyExists:
                    already = True  # as containerd: the ingest and lease changes still stand
            shutil.rmtree(writer.path, ignore_errors=True)
        if already:
            raise AlreadyExists(f"content {digest}")
        return info

    def _held(self, namespace: str, digest: str) -> bool:
        try:
            self._store.content.get(namespace, digest)
        except NotFound:
            return False
        return True

    def _status(self, ingest: Ingest) -> Status | None:
        path = self._ingest_path(ingest.bref)
        try:
            return ingest_status(path, ingest.ref, ingest.bref)
        except (OSError, ValueError):
            pass
        if ingest.expected:
            with contextlib.suppress(OSError):
                st = os.stat(self.blob_path(ingest.expected))
                return Status(ref=ingest.ref, offset=st.st_size, total=st.st_size, expected=ingest.expected,
                              started_at=st.st_mtime, updated_at=st.st_mtime)
        return None
