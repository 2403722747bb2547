"""The records the metadata store keeps, and one typed ``Store`` protocol per noun.

The records are plain dataclasses (no protobuf, no grpc): servicers convert them to and from
the API messages. Each field's docstring says whether it is required or optional, and whether
an update may change it. The store hands out fresh objects: changing one changes nothing
stored until it is passed back to ``update``.

Timestamps are seconds since the epoch (``time.time()``), UTC.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
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
    "TypedValue",
]


@dataclass(frozen=True, slots=True)
class TypedValue:
    """A serialized message and the name of its type: a ``google.protobuf.Any``."""

    type_url: str
    """The message's full name as containerd's typeurl registry writes it
    (``containerd.runc.v1.Options``; ``types.containerd.io/opencontainers/runtime-spec/1/Spec``)."""
    value: bytes
    """The serialized message, opaque to the store."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """Which runtime (shim) runs a container's task, and its options."""

    name: str = ""
    """Required when a container is created, immutable: e.g. ``io.containerd.runc.v2``."""
    options: TypedValue | None = None
    """Optional, immutable: runtime-specific options (``containerd.runc.v1.Options``)."""


@dataclass(slots=True)
class Namespace:
    """A namespace: a name and labels. Every other record lives in one."""

    name: str
    """Required, immutable: an identifier (see :mod:`ketch.identifiers`)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, mutable. An empty value removes the label."""


@dataclass(slots=True)
class Container:
    """A container record: what to run, and how. The running task is not stored here."""

    id: str
    """Required, immutable: an identifier, unique within the namespace."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, mutable (field paths ``labels``, ``labels.<key>``). Empty values are dropped."""
    image: str = ""
    """Optional, mutable (``image``): the image reference the container was made from."""
    runtime: Runtime = field(default_factory=Runtime)
    """Required (``runtime.name``), immutable."""
    spec: TypedValue | None = None
    """Required, mutable (``spec``): the OCI runtime spec as an Any."""
    snapshotter: str = ""
    """Optional, immutable: the snapshotter holding the root filesystem."""
    snapshot_key: str = ""
    """Optional, mutable (``snapshotkey``): the snapshot key; needs ``snapshotter``."""
    created_at: float = 0.0
    """Set by the store on create; ignored on input."""
    updated_at: float = 0.0
    """Set by the store on create and on each update; ignored on input."""
    extensions: dict[str, TypedValue] = field(default_factory=dict)
    """Optional, mutable (``extensions``, ``extensions.<key>``): client data; keys non-empty."""


@dataclass(slots=True)
class Lease:
    """A lease: while it exists, the resources it names are kept from garbage collection."""

    id: str
    """Required, immutable; unique within the namespace (not restricted to identifiers)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, set at creation (``containerd.io/gc.expire`` and friends)."""
    created_at: float = 0.0
    """Set by the store on create."""


@dataclass(frozen=True, slots=True)
class LeaseResource:
    """One resource a lease holds."""

    id: str
    """A digest for ``content``, an ingest ref for ``ingests``, a key for snapshots."""
    type: str
    """``content``, ``ingests`` or ``snapshots/<snapshotter>``."""


@dataclass(slots=True)
class ContentInfo:
    """A blob as one namespace sees it: the shared bytes, and this namespace's labels."""

    digest: str
    """Required, immutable: ``sha256:<64 lowercase hex>``."""
    size: int = 0
    """Set when the blob is committed; immutable."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, mutable (``labels``, ``labels.<key>``). An empty value removes the label.
    ``containerd.io/gc.ref.content*`` values must be digests."""
    created_at: float = 0.0
    """Set by the store when the namespace first holds the blob."""
    updated_at: float = 0.0
    """Set by the store on create and on each update."""


@dataclass(frozen=True, slots=True)
class Ingest:
    """The record of a write in progress (the bytes live in the content store's ingest dir)."""

    ref: str
    """The client's ref, unique within the namespace."""
    bref: str
    """``<namespace>/<seq>/<ref>``: unique across namespaces and never reused; the ingest
    directory is named after its sha256."""
    expected: str = ""
    """A blob already on disk that this write may take without data ("" when none)."""
    expires_at: float | None = None
    """When garbage collection may drop an ingest that no lease holds; None when leased."""


@dataclass(slots=True)
class Descriptor:
    """An OCI descriptor: what an image points at."""

    media_type: str = ""
    """Required (non-empty)."""
    digest: str = ""
    """Required: a valid digest."""
    size: int = 0
    """Required: greater than zero."""
    annotations: dict[str, str] = field(default_factory=dict)
    """Optional, mutable (``annotations``, ``annotations.<key>``); empty values are dropped."""


@dataclass(slots=True)
class Image:
    """An image record: a name pointing at a target descriptor (a manifest or an index)."""

    name: str
    """Required, immutable: a reference such as ``docker.io/library/busybox:latest``. Any
    non-empty string; images are *not* restricted to identifiers."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, mutable (``labels``, ``labels.<key>``). Empty values are dropped."""
    target: Descriptor = field(default_factory=Descriptor)
    """Required, mutable as a whole (``target``); its annotations also one by one."""
    created_at: float = 0.0
    """Set by the store on create; kept by updates."""
    updated_at: float = 0.0
    """Set by the store on create and on each update."""


class NamespaceStore(Protocol):
    """Namespaces. Namespaced calls on other stores create their namespace on first use."""

    def create(self, name: str, labels: Mapping[str, str] | None = None) -> Namespace:
        """Create ``name``; AlreadyExists if it exists, InvalidArgument if it is not an identifier."""
        ...

    def ensure(self, name: str) -> bool:
        """Create ``name`` unless it exists; True when it was created."""
        ...

    def get(self, name: str) -> Namespace:
        """The namespace ``name``; NotFound if there is none."""
        ...

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()) -> Namespace:
        """Set labels: all of them without field paths, else ``labels`` / ``labels.<key>``."""
        ...

    def delete(self, name: str) -> None:
        """Delete an empty namespace (its leases go with it); FailedPrecondition if not empty."""
        ...

    def list(self) -> builtins.list[Namespace]:
        """Every namespace, by name."""
        ...


class ContainerStore(Protocol):
    """Container records, per namespace."""

    def create(self, namespace: str, container: Container) -> Container:
        """Store a new container; returns it as stored (timestamps set, empty labels dropped)."""
        ...

    def get(self, namespace: str, id: str) -> Container:
        """The container ``id``; NotFound if there is none."""
        ...

    def update(self, namespace: str, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        """Apply the fields of ``container`` named by ``fieldpaths`` (all mutable ones if empty)."""
        ...

    def delete(self, namespace: str, id: str) -> None:
        """Remove the container record; NotFound if there is none."""
        ...

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Container]:
        """Containers matching any of ``filters`` (containerd syntax), by id."""
        ...


class LeaseStore(Protocol):
    """Leases and the resources they hold, per namespace."""

    def create(self, namespace: str, id: str, labels: Mapping[str, str] | None = None) -> Lease:
        """Create a lease; AlreadyExists if ``id`` is taken."""
        ...

    def delete(self, namespace: str, id: str) -> None:
        """Delete a lease and its resource references; NotFound if there is none."""
        ...

    def add_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Reference ``resource`` from the lease (idempotent)."""
        ...

    def delete_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Drop the reference (no error when it was not there)."""
        ...

    def list_resources(self, namespace: str, lease_id: str) -> builtins.list[LeaseResource]:
        """The lease's resources: content, then ingests, then snapshots."""
        ...

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Lease]:
        """Leases matching any of ``filters`` (fields ``id``, ``labels.<key>``), by id."""
        ...


class ContentRecordStore(Protocol):
    """Which namespaces hold which blobs, with their labels, and the ingests in progress.

    Records only: :class:`ketch.content.ContentStore` owns the files and calls these inside
    its transactions. Digests are checked (``sha256:`` + 64 lowercase hex) before use.
    """

    def get(self, namespace: str, digest: str) -> ContentInfo:
        """The blob's record; NotFound ``content digest sha256:...`` if the namespace lacks it."""
        ...

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[ContentInfo]:
        """Records matching any filter (``digest``, ``size``, ``labels.<key>``), by digest."""
        ...

    def add(self, namespace: str, info: ContentInfo) -> ContentInfo:
        """Record a committed blob in the namespace; AlreadyExists ``content sha256:...``."""
        ...

    def update(self, namespace: str, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        """Set labels: all of them without field paths, else ``labels`` / ``labels.<key>``."""
        ...

    def delete(self, namespace: str, digest: str) -> None:
        """Drop the namespace's record (the file stays until garbage collection); NotFound."""
        ...

    def referenced(self) -> set[str]:
        """Every digest some namespace holds or some ingest expects: the blobs to keep."""
        ...

    def usage(self) -> dict[str, tuple[int, int]]:
        """Namespace → (blobs, bytes) of the records it has."""
        ...

    def open_ingest(self, namespace: str, ref: str, expected: str = "",
                    expires_at: float | None = None) -> Ingest:
        """Create the ingest record of ``ref`` or take the existing one (keeping its bref),
        setting ``expected`` and ``expires_at``."""
        ...

    def get_ingest(self, namespace: str, ref: str) -> Ingest:
        """The ingest record of ``ref``; NotFound ``reference <ref>`` if there is none."""
        ...

    def delete_ingest(self, namespace: str, ref: str) -> Ingest:
        """Drop the ingest record and return it; NotFound ``reference <ref>``."""
        ...

    def list_ingests(self, namespace: str) -> builtins.list[Ingest]:
        """The namespace's ingest records, by ref."""
        ...

    def ingest_brefs(self) -> set[str]:
        """The brefs of every ingest record, all namespaces: the ingest dirs to keep."""
        ...


class ImageStore(Protocol):
    """Image records, per namespace (containerd ``metadata/images.go``)."""

    def create(self, namespace: str, image: Image) -> Image:
        """Store a new image; AlreadyExists ``image "name"``. Returns it as stored."""
        ...

    def get(self, namespace: str, name: str) -> Image:
        """The image ``name``; NotFound ``image "name"``."""
        ...

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        """Images matching any filter (``name``, ``target.digest``, ``target.mediatype``,
        ``labels.<key>``, ``annotations.<key>``), by name."""
        ...

    def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Apply the fields named by ``fieldpaths`` (``labels``, ``labels.<key>``, ``target``,
        ``annotations``, ``annotations.<key>``); none replaces every field but the name."""
        ...

    def delete(self, namespace: str, name: str) -> None:
        """Remove the record; NotFound ``image "name"``."""
        ...
