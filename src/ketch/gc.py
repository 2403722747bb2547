"""Garbage collection of content, snapshots, ingests and expired leases (containerd
``metadata/gc.go``, ``gc/gc.go``, ``metadata/db.go`` GarbageCollect).

A tricolour mark from the roots, per namespace, then a sweep of everything unmarked.

Roots, in every namespace:

- each lease that has not expired (``containerd.io/gc.expire``, RFC 3339, in the past means
  expired; an unparsable value is ignored) and every resource it holds: content digests,
  ingests, snapshots (``snapshots/<snapshotter>``). A lease labelled ``containerd.io/gc.flat``
  holds its resources *flat*: content without what its labels refer to, snapshots with their
  parents but without their label references;
- each image's target digest, and the references in the image's labels;
- each container's snapshot (``snapshotter``/``snapshot_key``) and its labels' references;
- each ingest no lease holds, until it expires (24 h after it was opened);
- content and snapshots labelled ``containerd.io/gc.root``.

References (edges):

- labels ``containerd.io/gc.ref.content`` (alone, or followed by ``.<name>`` or ``/<name>``)
  name a digest in the same namespace; ``containerd.io/gc.ref.snapshot.<snapshotter>``
  (optionally followed by ``/<name>``) name a snapshot key in that snapshotter. Content,
  images, containers and snapshots may carry them;
- a snapshot refers to its parent;
- an ingest refers to the blob it expects (a shared write).

The sweep deletes the unmarked content rows, ingest rows and (expired) leases in the same
write transaction as the mark, so nothing written meanwhile is judged on stale data; then
removes unmarked snapshots through the snapshotters, children before parents; then removes
the files no record wants: each snapshotter's ``cleanup`` the directories no snapshot owns
(left by a crash during a prepare, or by a removal refused while something was mounted there;
never one still mounted), as containerd's snapshotters' Cleanup after its collection, and the
content store's sweep the blob files and ingest directories no row wants any more.

:func:`reclaim` is that files half alone, judging no record: ketchd runs it as it starts, to
remove what a crash left on disk while clients may already be making records that nothing
references yet.

Snapshotters are reached only through :class:`SnapshotterLike`. Their snapshots live in
their own files, outside the metadata transaction: a snapshot that a container starts using
between the mark and its removal may be removed (containerd closes that gap by keeping
snapshot records in its one bolt file). Removals that fail (the snapshotter refuses, or the
snapshot is already gone) are logged and skipped.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ketch.errdefs import KetchError
from ketch.metadata import labels as _labels

if TYPE_CHECKING:
    from ketch.content import ContentStore
    from ketch.metadata import Store

__all__ = ["Collector", "Node", "ResourceType", "SnapshotRefLike", "SnapshotterLike", "Stats", "collect", "lease_expired",
           "reclaim"]

log = logging.getLogger("ketch.gc")


class SnapshotRefLike(Protocol):
    """One snapshot as garbage collection sees it."""

    @property
    def key(self) -> str:
        """The snapshot's key (active, view) or name (committed)."""
        ...

    @property
    def parent(self) -> str:
        """The parent's name, "" for none."""
        ...

    @property
    def labels(self) -> Mapping[str, str]:
        """Its labels (``containerd.io/gc.*``)."""
        ...


class SnapshotterLike(Protocol):
    """What garbage collection needs of a snapshotter (:class:`ketch.snapshots.Snapshotter`
    provides it)."""

    #: the snapshotter's name, as containers and labels name it (``overlayfs``)
    name: str

    def walk_refs(self, namespace: str) -> Sequence[SnapshotRefLike]:
        """Every snapshot of ``namespace``, with its parent and labels."""
        ...

    def remove(self, namespace: str, key: str) -> None:
        """Remove one snapshot that has no children (the caller removes leaves first)."""
        ...

    def namespaces(self) -> Sequence[str]:
        """The namespaces holding at least one snapshot."""
        ...

    def cleanup(self) -> Sequence[str]:
        """Remove the directories no snapshot owns (never one still mounted); those removed."""
        ...


class ResourceType(enum.Enum):
    CONTENT = "content"  #: key: a digest
    SNAPSHOT = "snapshot"  #: key: ``<snapshotter>/<snapshot key>``
    LEASE = "lease"  #: key: the lease id
    INGEST = "ingest"  #: key: the ingest ref


class Node(NamedTuple):
    """One resource in the graph."""

    type: ResourceType
    namespace: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """What one collection removed, and how long it took."""

    content: tuple[tuple[str, str], ...] = ()
    """(namespace, digest) of each content row removed."""
    blobs: tuple[str, ...] = ()
    """Digests of the blob files removed from disk (held by no namespace any more)."""
    snapshots: tuple[tuple[str, str, str], ...] = ()
    """(snapshotter, namespace, key) of each snapshot removed, in removal order."""
    directories: tuple[str, ...] = ()
    """Snapshotter directories that no snapshot owned, removed: left by a crash (a ketchd
    killed during a prepare) or by a removal refused while something was mounted there."""
    leases: tuple[tuple[str, str], ...] = ()
    """(namespace, id) of each expired lease removed."""
    ingests: tuple[tuple[str, str], ...] = ()
    """(namespace, ref) of each ingest record removed (its directory goes too)."""
    duration: float = 0.0
    """Seconds the whole collection took."""


def lease_expired(labels: Mapping[str, str], now: float) -> bool:
    """Whether a lease with these labels has expired at ``now`` (containerd: an RFC 3339
    ``containerd.io/gc.expire`` strictly before now; an unparsable one is ignored)."""
    value = labels.get(_labels.GC_EXPIRE)
    if value is None:
        return False
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in value.upper():
        log.info("ignoring invalid lease expiration %r", value)
        return False
    return now > when.timestamp()


def _label_refs(namespace: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """containerd's sendLabelRefs: the content and snapshots that labels keep."""
    content, snapshot = _labels.GC_REF_CONTENT, _labels.GC_REF_SNAPSHOT
    for key in sorted(labels):
        value = labels[key]
        if key.startswith(content) and (key == content or key[len(content)] in "./"):
            yield Node(ResourceType.CONTENT, namespace, value)
        elif key.startswith(snapshot):
            snapshotter = key[len(snapshot):].split("/", 1)[0]
            yield Node(ResourceType.SNAPSHOT, namespace, f"{snapshotter}/{value}")


class _Graph:
    """Everything the mark reads, loaded once inside the collection's transaction."""

    def __init__(self) -> None:
        self.roots: list[tuple[Node, bool]] = []  # (node, flat)
        self.content: dict[tuple[str, str], Mapping[str, str]] = {}  # (ns, digest) → labels
        self.ingests: dict[tuple[str, str], str] = {}  # (ns, ref) → expected digest
        self.leases: list[tuple[str, str]] = []  # every lease (ns, id)
        self.snapshots: dict[tuple[str, str], dict[str, SnapshotRefLike]] = {}  # (ss, ns) → key → ref

    def references(self, node: Node, flat: bool) -> Iterable[tuple[Node, bool]]:
        ns = node.namespace
        if node.type is ResourceType.CONTENT:
            labels = self.content.get((ns, node.key))
            if labels is not None and not flat:
                yield from ((n, False) for n in _label_refs(ns, labels))
        elif node.type is ResourceType.SNAPSHOT:
            snapshotter, _, key = node.key.partition("/")
            ref = self.snapshots.get((snapshotter, ns), {}).get(key)
            if ref is None:
                return
            if ref.parent:
                yield Node(ResourceType.SNAPSHOT, ns, f"{snapshotter}/{ref.parent}"), flat
            if not flat:
                yield from ((n, False) for n in _label_refs(ns, ref.labels))
        elif node.type is ResourceType.INGEST:
            expected = self.ingests.get((ns, node.key))
            if expected:
                yield Node(ResourceType.CONTENT, ns, expected), False

    def mark(self) -> set[Node]:
        """containerd's Tricolor: depth first; a node seen flat is seen again when reached
        non-flat (the flat bit is part of what was seen, not of what is reachable)."""
        seen: set[tuple[Node, bool]] = set()
        reachable: set[Node] = set()
        grays = list(self.roots)
        while grays:
            item = grays.pop()
            if item in seen:
                continue
            seen.add(item)
            reachable.add(item[0])
            grays.extend(ref for ref in self.references(*item) if ref not in seen)
        return reachable


def _load_snapshots(graph: _Graph, snapshotters: Mapping[str, SnapshotterLike]) -> None:
    """Every snapshot of every snapshotter, and the ones labelled as roots."""
    for name, snapshotter in snapshotters.items():
        for ns in snapshotter.namespaces():
            refs = {ref.key: ref for ref in snapshotter.walk_refs(ns)}
            graph.snapshots[(name, ns)] = refs
            for ref in refs.values():
                if _labels.GC_ROOT in ref.labels:
                    graph.roots.append((Node(ResourceType.SNAPSHOT, ns, f"{name}/{ref.key}"), False))


def _load(graph: _Graph, store: Store, now: float) -> None:
    """Scan the roots and everything sweepable in the records (containerd's scanRoots and
    scanAll); call inside the collection's transaction."""
    root = graph.roots.append
    for namespace in store.namespaces.list():
        ns = namespace.name
        for lease in store.leases.list(ns):
            graph.leases.append((ns, lease.id))
            if lease_expired(lease.labels, now):
                continue
            flat = _labels.GC_FLAT in lease.labels
            root((Node(ResourceType.LEASE, ns, lease.id), False))
            for resource in store.leases.list_resources(ns, lease.id):
                if resource.type == "content":
                    root((Node(ResourceType.CONTENT, ns, resource.id), flat))
                elif resource.type == "ingests":
                    root((Node(ResourceType.INGEST, ns, resource.id), False))
                elif resource.type.startswith("snapshots/"):
                    snapshotter = resource.type.removeprefix("snapshots/")
                    root((Node(ResourceType.SNAPSHOT, ns, f"{snapshotter}/{resource.id}"), flat))
        for image in store.images.list(ns):
            root((Node(ResourceType.CONTENT, ns, image.target.digest), False))
            graph.roots.extend((n, False) for n in _label_refs(ns, image.labels))
        for ingest in store.content.list_ingests(ns):
            graph.ingests[(ns, ingest.ref)] = ingest.expected
            if ingest.expires_at is not None and ingest.expires_at >= now:
                root((Node(ResourceType.INGEST, ns, ingest.ref), False))
        for info in store.content.list(ns):
            graph.content[(ns, info.digest)] = info.labels
            if _labels.GC_ROOT in info.labels:
                root((Node(ResourceType.CONTENT, ns, info.digest), False))
        for container in store.containers.list(ns):
            if container.snapshotter:
                key = f"{container.snapshotter}/{container.snapshot_key}"
                root((Node(ResourceType.SNAPSHOT, ns, key), False))
            graph.roots.extend((n, False) for n in _label_refs(ns, container.labels))


def _leaves_first(refs: Mapping[str, SnapshotRefLike], keys: Iterable[str]) -> list[str]:
    """``keys`` ordered so that every snapshot comes before its parent (deepest first)."""

    def depth(key: str) -> int:
        d, seen = 0, set()
        while key in refs and key not in seen:
            seen.add(key)
            key = refs[key].parent
            d += 1
        return d

    return sorted(keys, key=lambda k: (-depth(k), k))


def collect(store: Store, content: ContentStore | None,
            snapshotters: Mapping[str, SnapshotterLike] | None = None, *, now: float | None = None) -> Stats:
    """Collect garbage once, synchronously; returns what was removed.

    ``content`` may be None to touch records only (no file is removed then). ``now``
    (seconds since the epoch) is for tests of expiry.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    snapshotters = snapshotters or {}
    removed_content: list[tuple[str, str]] = []
    removed_ingests: list[tuple[str, str]] = []
    removed_leases: list[tuple[str, str]] = []
    graph = _Graph()
    # the snapshotters keep their own files: read them before taking the metadata write lock
    _load_snapshots(graph, snapshotters)
    with store.transaction():
        _load(graph, store, now)
        marked = graph.mark()
        for ns, lease_id in graph.leases:
            if Node(ResourceType.LEASE, ns, lease_id) not in marked:
                store.leases.delete(ns, lease_id)
                removed_leases.append((ns, lease_id))
        for ns, ref in graph.ingests:
            if Node(ResourceType.INGEST, ns, ref) not in marked:
                store.content.delete_ingest(ns, ref)
                removed_ingests.append((ns, ref))
        for ns, digest in graph.content:
            if Node(ResourceType.CONTENT, ns, digest) not in marked:
                store.content.delete(ns, digest)
                removed_content.append((ns, digest))

    removed_snapshots: list[tuple[str, str, str]] = []
    for (name, ns), refs in graph.snapshots.items():
        doomed = [k for k in refs if Node(ResourceType.SNAPSHOT, ns, f"{name}/{k}") not in marked]
        for key in _leaves_first(refs, doomed):
            try:
                snapshotters[name].remove(ns, key)
            except KetchError as exc:
                log.warning("gc: could not remove snapshot %r of %s in namespace %s: %s", key, name, ns, exc)
                continue
            removed_snapshots.append((name, ns, key))
    blobs, directories = _sweep_files(content, snapshotters)
    stats = Stats(content=tuple(removed_content), blobs=blobs, snapshots=tuple(removed_snapshots),
                  directories=directories, leases=tuple(removed_leases), ingests=tuple(removed_ingests),
                  duration=time.monotonic() - started)
    log.info("gc: removed %d content rows, %d blobs, %d snapshots, %d leftover snapshot directories, "
             "%d leases, %d ingests in %.3fs", len(stats.content), len(stats.blobs), len(stats.snapshots),
             len(stats.directories), len(stats.leases), len(stats.ingests), stats.duration)
    return stats


def _sweep_files(content: ContentStore | None,
                 snapshotters: Mapping[str, SnapshotterLike]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Remove from disk what no record wants: snapshot directories no snapshot owns (each
    snapshotter's cleanup, as containerd's after its collection), then blob files and ingest
    directories (the content store's sweep). The removed blobs' digests and directories."""
    directories: list[str] = []
    for name, snapshotter in snapshotters.items():
        try:
            directories.extend(snapshotter.cleanup())
        except (KetchError, OSError) as exc:
            log.warning("gc: cleanup of snapshotter %s failed: %s", name, exc)
    blobs: tuple[str, ...] = ()
    if content is not None:
        blobs = content.sweep().blobs
    return blobs, tuple(directories)


def reclaim(content: ContentStore | None, snapshotters: Mapping[str, SnapshotterLike]) -> Stats:
    """Only the files half of a collection: remove what no record wants (what a crash left on
    disk: a directory of a prepare that never finished, a blob renamed into place whose row
    never committed), judging no record. For the daemon's start, when clients may already be
    making records that nothing references yet (a snapshot prepared without a lease)."""
    started = time.monotonic()
    blobs, directories = _sweep_files(content, snapshotters)
    stats = Stats(blobs=blobs, directories=directories, duration=time.monotonic() - started)
    log.info("gc: reclaimed %d blobs and %d leftover snapshot directories in %.3fs", len(stats.blobs),
             len(stats.directories), stats.duration)
    return stats


class Collector:
    """Garbage collection for the daemon: ``schedule()`` after a delete (debounced, in a
    thread), ``now()`` for a synchronous delete."""

    def __init__(self, store: Store, content: ContentStore, snapshotters: Mapping[str, SnapshotterLike],
                 delay: float = 0.1) -> None:
        self._store = store
        self._content = content
        self._snapshotters = snapshotters
        self._delay = delay
        self._pending: asyncio.Task[None] | None = None
        self._running: asyncio.Future[Stats] | None = None
        self._lock = asyncio.Lock()
        #: by kind ("collect", "reclaim"): runs finished, and seconds they took (for ketchd's metrics)
        self.runs: collections.Counter[str] = collections.Counter()
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        #: what collections removed, by resource ("content", "blobs", "snapshots", ...)
        self.removed: collections.Counter[str] = collections.Counter()

    async def now(self) -> Stats:
        return await self._in_thread(collect, self._store, self._content, self._snapshotters)

    async def reclaim(self) -> Stats:
        """:func:`reclaim`: what a crash left on disk goes; for the daemon's start."""
        return await self._in_thread(reclaim, self._content, self._snapshotters)

    async def _in_thread(self, fn: Callable[..., Stats], *args: object) -> Stats:
        async with self._lock:
            # the thread goes on if the caller is cancelled: close() waits for it
            self._running = running = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            running.add_done_callback(functools.partial(self._count, fn.__name__))
            return await asyncio.shield(running)

    def _count(self, kind: str, done: asyncio.Future[Stats]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        stats = done.result()
        self.runs[kind] += 1
        self.seconds[kind] += stats.duration
        for resource in ("content", "blobs", "snapshots", "directories", "leases", "ingests"):
            self.removed[resource] += len(getattr(stats, resource))

    async def after_delete(self, sync: bool) -> None:
        """After a client deleted something: collect now when it asked for a synchronous
        delete (the call answers once the garbage is gone), else soon."""
        if sync:
            await self.now()
        else:
            self.schedule()

    def schedule(self) -> None:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self._delay)
        await self.now()

    async def close(self) -> None:
        """Collect no more: a scheduled collection is dropped, one running is waited for (it
        uses the stores, which the caller is about to close)."""
        if self._pending is not None:
            self._pending.cancel()
        if self._running is not None:
            await asyncio.wait([self._running])
