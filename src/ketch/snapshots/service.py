"""Snapshots as the Snapshots service sees them: the snapshotters by name, plus containerd's
rules and events (as containerd's ``services/snapshots`` local service).

An empty snapshotter name means ``overlayfs``; an unknown one is InvalidArgument. A lease named
by the caller holds what ``prepare``, ``view`` and ``commit`` create. ``prepare``, ``commit``
and ``remove`` publish /snapshot/prepare, /snapshot/commit and /snapshot/remove; a removal
schedules garbage collection (``collect``). Calls that may be slow run in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from ketch import errdefs, metadata
from ketch.mount import Mount
from ketch.snapshots._types import Snapshotter
from ketch.topics import Publish

__all__ = ["DEFAULT", "SnapshotService"]

DEFAULT = "overlayfs"


class SnapshotService:
    def __init__(self, snapshotters: Mapping[str, Snapshotter], leases: metadata.LeaseStore, publish: Publish,
                 collect: Callable[[], object]) -> None:
        self._snapshotters = snapshotters
        self._leases = leases
        self._publish = publish
        self._collect = collect

    def get(self, snapshotter: str) -> Snapshotter:
        try:
            return self._snapshotters[snapshotter or DEFAULT]
        except KeyError:
            raise errdefs.InvalidArgument(f"snapshotter not loaded: {snapshotter}") from None

    def _hold(self, namespace: str, snapshotter: str, key: str, lease: str | None) -> Snapshotter:
        sn = self.get(snapshotter)
        if lease:
            self._leases.add_resource(namespace, lease,
                                      metadata.LeaseResource(key, f"snapshots/{snapshotter or DEFAULT}"))
        return sn

    async def prepare(self, namespace: str, snapshotter: str, key: str, parent: str = "",
                      labels: dict[str, str] | None = None, lease: str | None = None) -> list[Mount]:
        from ketch.api.containerd.events import snapshot_pb2

        sn = self._hold(namespace, snapshotter, key, lease)
        mounts = await asyncio.to_thread(sn.prepare, namespace, key, parent, labels or {})
        self._publish(namespace, snapshot_pb2.SnapshotPrepare(key=key, parent=parent))
        return mounts

    async def view(self, namespace: str, snapshotter: str, key: str, parent: str = "",
                   labels: dict[str, str] | None = None, lease: str | None = None) -> list[Mount]:
        sn = self._hold(namespace, snapshotter, key, lease)
        return await asyncio.to_thread(sn.view, namespace, key, parent, labels or {})

    async def commit(self, namespace: str, snapshotter: str, name: str, key: str,
                     labels: dict[str, str] | None = None, lease: str | None = None) -> None:
        from ketch.api.containerd.events import snapshot_pb2

        sn = self._hold(namespace, snapshotter, name, lease)
        await asyncio.to_thread(sn.commit, namespace, name, key, labels or {})
        self._publish(namespace, snapshot_pb2.SnapshotCommit(key=key, name=name))

    async def remove(self, namespace: str, snapshotter: str, key: str) -> None:
        from ketch.api.containerd.events import snapshot_pb2

        await asyncio.to_thread(self.get(snapshotter).remove, namespace, key)
        self._publish(namespace, snapshot_pb2.SnapshotRemove(key=key))
        self._collect()
