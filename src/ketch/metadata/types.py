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
