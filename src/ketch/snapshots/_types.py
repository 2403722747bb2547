"""The values snapshotters hand out, and the protocol every snapshotter implements."""

from __future__ import annotations

import builtins
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ketch.mount import Mount

__all__ = ["Info", "Kind", "SnapshotRef", "Snapshotter", "Usage"]


class Kind(enum.IntEnum):
    """What a snapshot is; the numbers are containerd's (``snapshots.proto``)."""

    UNKNOWN = 0  #: never stored; the kind of an Info built only to name a snapshot
    VIEW = 1  #: read-only, made by ``view``; cannot be committed
    ACTIVE = 2  #: writable, made by ``prepare``; becomes COMMITTED by ``commit``
    COMMITTED = 3  #: immutable; the only kind that may be a parent

    @property
    def label(self) -> str:
        """The word containerd's filters use for this kind (``kind==committed``)."""
        return self.name.lower()


@dataclass(slots=True)
class Info:
    """A snapshot's metadata, as ``stat``, ``update`` and ``walk`` return it."""

    kind: Kind = Kind.UNKNOWN
    """Set by the snapshotter; ignored by ``update``."""
    name: str = ""
    """Required: the key (ACTIVE, VIEW) or the committed name; immutable. Any string."""
    parent: str = ""
    """Set at creation, immutable: the name of the committed parent, "" for none."""
    labels: dict[str, str] = field(default_factory=dict)
    """Optional, mutable (``labels``, ``labels.<key>``). An empty value removes the label."""
    created_at: float = 0.0
    """Seconds since the epoch; set by the snapshotter (on commit, the commit time)."""
    updated_at: float = 0.0
    """Seconds since the epoch; set by the snapshotter on create, commit and update."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk used by a snapshot's own layer: its changes, not its parents'."""

    size: int = 0
    """Bytes allocated (blocks × 512), each inode counted once."""
    inodes: int = 0
    """Distinct inodes, the layer's root directory included."""


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """What garbage collection needs to know of one snapshot (see ``walk_refs``)."""

    key: str
    """The snapshot's key or committed name."""
    parent: str
    """The committed parent's name, "" for none."""
    labels: Mapping[str, str] = field(hash=False)
    """The labels (``containerd.io/gc.*`` among them); do not mutate."""
    kind: Kind
    """ACTIVE, VIEW or COMMITTED."""


class Snapshotter(Protocol):
    """A namespaced snapshotter with containerd's semantics.

    Keys and names are arbitrary strings within a namespace, never used in paths. Every call
    is synchronous and may touch the disk (``prepare`` on the native snapshotter copies a whole
    tree, ``commit`` and ``usage`` walk one): call from a thread when on an event loop.
    """

    #: the name containerd gives this snapshotter (``overlayfs``, ``native``)
    name: str
    #: the directory holding the snapshotter's metadata and snapshots
    root: str

    def prepare(self, namespace: str, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create an ACTIVE snapshot on top of the committed ``parent``; its mounts."""
        ...

    def view(self, namespace: str, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create a read-only VIEW of the committed ``parent``; its mounts."""
        ...

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        """The mounts of an ACTIVE or VIEW snapshot (FailedPrecondition for COMMITTED)."""
        ...

    def commit(self, namespace: str, name: str, key: str,
               labels: Mapping[str, str] | None = None) -> None:
        """Turn the ACTIVE ``key`` into the COMMITTED ``name``; ``key`` is gone afterwards."""
        ...

    def remove(self, namespace: str, key: str) -> None:
        """Remove a snapshot without children, and its files."""
        ...

    def stat(self, namespace: str, key: str) -> Info:
        """The snapshot's metadata; NotFound when there is none."""
        ...

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of ``info.name``; returns the stored Info."""
        ...

    def walk(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Info]:
        """Snapshots matching any filter (fields ``name``, ``parent``, ``kind``, ``labels.<k>``)."""
        ...

    def usage(self, namespace: str, key: str) -> Usage:
        """Disk used by the snapshot's own layer (measured now for ACTIVE ones)."""
        ...

    def cleanup(self) -> builtins.list[str]:
        """Remove directories that no snapshot owns; the paths removed."""
        ...

    def namespaces(self) -> builtins.list[str]:
        """Namespaces that hold at least one snapshot, sorted."""
        ...

    def walk_refs(self, namespace: str) -> builtins.list[SnapshotRef]:
        """Every snapshot of ``namespace`` with its parent, labels and kind (for GC)."""
        ...

    def close(self) -> None:
        """Close the metadata file."""
        ...
