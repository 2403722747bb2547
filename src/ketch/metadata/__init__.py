"""ketchd's metadata: namespaces, containers, leases, images and content records in one SQLite file.

Open it with :class:`Store`; the records are the dataclasses in :mod:`ketch.metadata.types`;
the schema and its migrations are drawn in :mod:`ketch.metadata.schema`. Errors are
:mod:`ketch.errdefs` classes with containerd's messages. Nothing here imports grpc.
"""

from __future__ import annotations

from ketch.metadata.schema import SCHEMA_VERSION
from ketch.metadata.store import Store
from ketch.metadata.types import (
    Container,
    ContainerStore,
    ContentInfo,
    ContentRecordStore,
    Descriptor,
    Image,
    ImageStore,
    Ingest,
    Lease,
    LeaseResource,
    LeaseStore,
    Namespace,
    NamespaceStore,
    Runtime,
    TypedValue,
)

__all__ = [
    "SCHEMA_VERSION",
    "Container",
    "ContainerStore",
    "ContentInfo",
    "ContentRecordStore",
    "Descriptor",
    "Image",
    "ImageStore",
    "Ingest",
    "Lease",
    "LeaseResource",
    "LeaseStore",
    "Namespace",
    "NamespaceStore",
    "Runtime",
    "Store",
    "TypedValue",
]
