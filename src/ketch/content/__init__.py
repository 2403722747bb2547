"""The content store: content-addressed blobs (sha256) with resumable, verified ingests.

:class:`ContentStore` owns the files (``blobs/sha256/<hex>``, ``ingest/…``); which namespace
sees which blob, and with which labels, is recorded in :class:`ketch.metadata.Store`. Nothing
here imports grpc; the Content servicer decodes, calls these methods (from a thread for the
big IO) and encodes.
"""

from __future__ import annotations

from ketch.content._store import INGEST_EXPIRY, BlobReader, ContentStore, Publish, Status, Sweep, Writer
from ketch.metadata import ContentInfo as Info
from ketch.digests import check_digest

__all__ = [
    "INGEST_EXPIRY",
    "BlobReader",
    "ContentStore",
    "Info",
    "Publish",
    "Status",
    "Sweep",
    "Writer",
    "check_digest",
]
