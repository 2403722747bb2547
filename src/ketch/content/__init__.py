"""The content store: content-addressed blobs (sha256) with resumable, verified ingests.

:class:`ContentStore` owns the files (``blobs/sha256/<hex>``, ``ingest/…``); which namespace
sees which blob, and with which labels, is recorded in :class:`ketch.metadata.Store`. Nothing
here imports grpc; the Content servicer decodes, calls these methods (from a thread for the
big IO) and encodes.

The pieces, each in its own private module: ``_store`` (:class:`ContentStore`), ``_reader``
(:class:`BlobReader` and :func:`read_span`, the one set of Read rules), ``_writer``
(:class:`Writer`, :class:`Status` and the ingest directory's files), ``_session`` (one
Content.Write stream's protocol: :class:`WriteSession`), ``_locks`` (the GC
lock and the per-ref writer locks) and ``_disk`` (OS errors, times, fsync).
"""

from __future__ import annotations

from ketch.content._reader import BlobReader, read_span
from ketch.content._session import WriteSession, WriteStep
from ketch.content._store import INGEST_EXPIRY, ContentStore, Sweep
from ketch.content._writer import Status, Writer
from ketch.digests import check_digest
from ketch.metadata import ContentInfo as Info
from ketch.topics import Publish

__all__ = [
    "INGEST_EXPIRY",
    "BlobReader",
    "ContentStore",
    "Info",
    "Publish",
    "Status",
    "Sweep",
    "WriteSession",
    "WriteStep",
    "Writer",
    "check_digest",
    "read_span",
]
