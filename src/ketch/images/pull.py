"""Pulling an image from a registry into the content store, and unpacking it into snapshots,
in-process (what ``ctr pull`` does through the API, for ketchd's own callers: the CRI).

A pull resolves the reference, fetches the index (if any), the manifest for this machine's
platform, its config and its layers (verified against their digests, a few at a time), labels
them as containerd does so that garbage collection follows index → manifest → config and layers
→ snapshot, and records the image under its normalized name. Everything it writes is held by a
lease until the image record (and the config's snapshot label) holds it.

Unpacking applies each layer on a snapshot of the one below it and commits it under its chain
id; a chain id that exists already is reused. Whatever fails leaves nothing half-made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ketch import errdefs
from ketch.content import ContentStore
from ketch.diff.service import DiffService
from ketch.distribution.manifests import INDEX_TYPES, chain_ids, gc_labels, select_manifest
from ketch.distribution.reference import Reference, parse
from ketch.distribution.registry import Credentials, Registry, RemoteDescriptor
from ketch.images.store import ImageService
from ketch.metadata import Descriptor, Image, LeaseStore
from ketch.snapshots.service import SnapshotService

__all__ = ["Progress", "Puller", "Pulled"]

_CHUNK = 1 << 20
_PARALLEL = 3
#: how long a pull's lease keeps what it fetched if ketchd dies before the pull ends
_LEASE_EXPIRY = 24 * 3600

#: called with (what, bytes done, bytes total) as blobs arrive
Progress = Callable[[str, int, int], None]


@dataclass
class Pulled:
    """What a pull recorded."""

    image: Image
    manifest: Descriptor
    config: Descriptor
    config_json: dict[str, Any]
    layers: list[Descriptor] = field(default_factory=list)
    chain_id: str = ""
    """The top snapshot (empty when not unpacked)."""

    @property
    def size(self) -> int:
        """Bytes of the manifest, config and layers as stored."""
        return self.manifest.size + self.config.size + sum(layer.size for layer in self.layers)


def _descriptor(d: dict[str, Any]) -> Descriptor:
    try:
        return Descriptor(media_type=str(d.get("mediaType", "")), digest=str(d["digest"]), size=int(d["size"]))
    except (KeyError, TypeError, ValueError):
        raise errdefs.InvalidArgument(f"malformed descriptor in manifest: {d!r}") from None


class Puller:
    def __init__(self, content: ContentStore, images: ImageService, snapshots: SnapshotService, diff: DiffService,
                 leases: LeaseStore, *, registry: Callable[[Credentials], Registry] = Registry) -> None:
        self._content = content
        self._images = images
        self._snapshots = snapshots
        self._diff = diff
        self._leases = leases
        self._registry = registry

    async def pull(self, namespace: str, ref: str, *, credentials: Credentials | None = None,
                   snapshotter: str = "overlayfs", unpack: bool = True, labels: dict[str, str] | None = None,
                   progress: Progress | None = None) -> Pulled:
        """Fetch ``ref`` into ``namespace``, record it as an image (named by the normalized
        reference) and, with ``unpack``, unpack it for ``snapshotter``."""
        parsed = parse(ref)
        registry = self._registry(credentials or (lambda host: None))
        lease = f"pull-{time.time_ns()}-{secrets.token_hex(4)}"
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + _LEASE_EXPIRY))
        self._leases.create(namespace, lease, {"containerd.io/gc.expire": expire})
        try:
            root = await asyncio.to_thread(registry.resolve, parsed)
            source = {f"containerd.io/distribution.source.{parsed.domain}": parsed.path}
            manifest, body = await self._platform_manifest(namespace, registry, parsed, root, lease, source)
            config = _descriptor(body.get("config") or {})
            layers = [_descriptor(layer) for layer in body.get("layers") or []]
            config_bytes = await self._fetch(namespace, registry, parsed, config, lease, source, progress=progress)
            config_json = json.loads(config_bytes)
            await self._fetch_layers(namespace, registry, parsed, layers, lease, source, progress)
            chain_id = await self.unpack(namespace, config, config_json, layers, snapshotter, lease) if unpack else ""
            target = Descriptor(media_type=root.media_type, digest=root.digest, size=root.size)
            image = self._record(namespace, Image(str(parsed), dict(labels or {}), target))
            return Pulled(image, manifest, config, config_json, layers, chain_id)
        finally:
            with contextlib.suppress(errdefs.KetchError):
                self._leases.delete(namespace, lease)

    def _record(self, namespace: str, image: Image) -> Image:
        try:
            return self._images.create(namespace, image)
        except errdefs.AlreadyExists:
            return self._images.update(namespace, image, ["target", "labels"])

    async def _platform_manifest(self, namespace: str, registry: Registry, ref: Reference, root: RemoteDescriptor,
                                 lease: str, source: dict[str, str]) -> tuple[Descriptor, dict[str, Any]]:
        desc = Descriptor(media_type=root.media_type, digest=root.digest, size=root.size)
        if root.media_type not in INDEX_TYPES:
            body = await self._fetch(namespace, registry, ref, desc, lease, source, manifest=True, labels_for=True)
            return desc, json.loads(body)
        index_bytes = await self._fetch_bytes(registry, ref, desc, manifest=True)
        index = json.loads(index_bytes)
        chosen = _descriptor(dict(select_manifest(index, str(ref))))
        body = await self._fetch(namespace, registry, ref, chosen, lease, source, manifest=True, labels_for=True)
        # the index after its child, so that its label finds the child stored
        await self._store(namespace, desc, index_bytes, registry, ref, lease, {**source, **gc_labels(index)},
                          manifest=True)
        return chosen, json.loads(body)

    async def _fetch_layers(self, namespace: str, registry: Registry, ref: Reference, layers: list[Descriptor],
                            lease: str, source: dict[str, str], progress: Progress | None) -> None:
        limit = asyncio.Semaphore(_PARALLEL)

        async def one(layer: Descriptor) -> None:
            async with limit:
                await self._store(namespace, layer, None, registry, ref, lease, source, progress=progress)

        await asyncio.gather(*(one(layer) for layer in layers))

    async def _fetch(self, namespace: str, registry: Registry, ref: Reference, desc: Descriptor, lease: str,
                     source: dict[str, str], *, manifest: bool = False, labels_for: bool = False,
                     progress: Progress | None = None) -> bytes:
        """Store a small blob (manifest or config) and return its bytes; a manifest is
        labelled with its config and layers."""
        body = await self._fetch_bytes(registry, ref, desc, manifest=manifest)
        labels = dict(source)
        if labels_for:
            labels.update(gc_labels(json.loads(body)))
        await self._store(namespace, desc, body, registry, ref, lease, labels, manifest=manifest, progress=progress)
        return body

    async def _fetch_bytes(self, registry: Registry, ref: Reference, desc: Descriptor, *, manifest: bool) -> bytes:
        def fetch() -> bytes:
            with contextlib.closing(registry.fetch(ref, _remote(desc), manifest=manifest)) as got:
                body: bytes = got.body.read(desc.size + 1 if desc.size > 0 else -1)
            _verify(ref, desc, body)
            return body

        return await asyncio.to_thread(fetch)

    async def _store(self, namespace: str, desc: Descriptor, body: bytes | None, registry: Registry, ref: Reference,
                     lease: str, labels: dict[str, str], *, manifest: bool = False,
                     progress: Progress | None = None) -> None:
        """Write ``desc`` into the content store (from ``body``, else fetched), verified."""

        def write() -> None:
            try:
                w = self._content.writer(namespace, f"pull-{desc.digest}", desc.size, desc.digest, lease=lease)
            except errdefs.AlreadyExists:
                self._label(namespace, desc.digest, labels)
                return
            with contextlib.closing(w):
                if w.offset != desc.size or w.digest() != desc.digest:
                    w.truncate(0)
                    if body is not None:
                        w.write(body)
                    else:
                        with contextlib.closing(registry.fetch(ref, _remote(desc), manifest=manifest)) as got:
                            while chunk := got.body.read(_CHUNK):
                                w.write(chunk)
                                if w.offset > desc.size:
                                    break
                                if progress is not None:
                                    progress(desc.digest, w.offset, desc.size)
                try:
                    w.commit(desc.size, desc.digest, labels)
                except errdefs.FailedPrecondition as e:
                    raise errdefs.DataLoss(f"{ref}: blob {desc.digest} from the registry does not match: {e}") from None
                except errdefs.AlreadyExists:
                    self._label(namespace, desc.digest, labels)

        await asyncio.to_thread(write)

    def _label(self, namespace: str, digest: str, labels: dict[str, str]) -> None:
        info = self._content.info(namespace, digest)
        if any(info.labels.get(k) != v for k, v in labels.items()):
            info.labels.update(labels)
            self._content.update(namespace, info, [f"labels.{k}" for k in labels])

    async def unpack(self, namespace: str, config: Descriptor, config_json: dict[str, Any],
                     layers: list[Descriptor], snapshotter: str, lease: str) -> str:
        """Unpack ``layers`` for ``snapshotter``; the top chain id. The config is labelled
        with it, so that the image holds its snapshots."""
        diff_ids = (config_json.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise errdefs.InvalidArgument(
                f"image config {config.digest} lists {len(diff_ids)} diff ids for {len(layers)} layers")
        chains = chain_ids(diff_ids)
        sn = self._snapshots.get(snapshotter)
        parent = ""
        for layer, diff_id, chain in zip(layers, diff_ids, chains):
            try:
                await asyncio.to_thread(sn.stat, namespace, chain)
            except errdefs.NotFound:
                await self._apply_layer(namespace, snapshotter, layer, diff_id, chain, parent, lease)
            parent = chain
        top = chains[-1] if chains else ""
        if top:
            self._label(namespace, config.digest, {f"containerd.io/gc.ref.snapshot.{snapshotter or 'overlayfs'}": top})
        return top

    async def _apply_layer(self, namespace: str, snapshotter: str, layer: Descriptor, diff_id: str, chain: str,
                           parent: str, lease: str) -> None:
        key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
        mounts = await self._snapshots.prepare(namespace, snapshotter, key, parent, lease=lease)
        try:
            _, applied, _ = await self._diff.apply(namespace, layer.digest, layer.media_type, mounts)
            if applied != diff_id:
                raise errdefs.DataLoss(f"layer {layer.digest} unpacks to {applied}, its image says {diff_id}")
            self._label(namespace, layer.digest, {"containerd.io/uncompressed": diff_id})
            try:
                await self._snapshots.commit(namespace, snapshotter, chain, key, lease=lease)
            except errdefs.AlreadyExists:
                pass  # unpacked meanwhile by another pull
            else:
                return
        except BaseException:
            with contextlib.suppress(errdefs.KetchError):
                await self._snapshots.remove(namespace, snapshotter, key)
            raise
        with contextlib.suppress(errdefs.KetchError):
            await self._snapshots.remove(namespace, snapshotter, key)


def _remote(desc: Descriptor) -> RemoteDescriptor:
    return RemoteDescriptor(desc.media_type, desc.digest, desc.size)


def _verify(ref: Reference, desc: Descriptor, body: bytes) -> None:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest != desc.digest or (desc.size > 0 and len(body) != desc.size):
        raise errdefs.DataLoss(f"{ref}: {desc.digest} from the registry does not match its digest or size")
