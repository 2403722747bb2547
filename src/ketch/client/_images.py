"""Images through containerd's content, images, snapshots, diff and leases services, as
containerd's Go client handles them: import and export of archives (OCI layout, and
``docker save`` to import), pull from a registry (distribution API), unpack into snapshots
named by chain ID, and a container's snapshot prepared on top.

Everything written is held by a lease until the image record refers to it, and blobs carry
containerd's garbage-collection labels (``containerd.io/gc.ref.*``), so the daemon's GC keeps
an image's blobs and snapshots and removes them with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import field_mask_pb2

from ketch import digests, errdefs, timestamps
from ketch.api.containerd.services.containers.v1 import containers_pb2
from ketch.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from ketch.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from ketch.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from ketch.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2
from ketch.distribution import reference
from ketch.distribution.manifests import (DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, chain_ids,
                                          gc_labels, select_manifest)
from ketch.distribution.registry import Registry, RemoteDescriptor

if TYPE_CHECKING:
    from ketch.client._client import AsyncClient
    from ketch.client._conn import Connection
    from ketch.client._containers import Container, SpecOptions

__all__ = ["Image", "Progress"]

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
INDEXES = INDEX_TYPES
MANIFESTS = MANIFEST_TYPES
LEASE_KEY = "containerd-lease"
GC_REF = "containerd.io/gc.ref.content"
CHUNK = 1 << 20

#: progress callback: (what, bytes done, bytes in all)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Image:
    """An image record: its name, the descriptor it points to, labels, and when it was made."""

    name: str
    digest: str
    media_type: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "media_type": self.media_type, "size": self.size,
                "labels": self.labels, "created_at": self.created_at}


def _image_of(i: images_pb2.Image) -> Image:
    return Image(i.name, i.target.digest, i.target.media_type, i.target.size, dict(i.labels),
                 timestamps.seconds(i.created_at) if i.HasField("created_at") else None)


def _sha256(data: bytes) -> str:
    return digests.from_sha256_hex(hashlib.sha256(data).hexdigest())


class Store:
    """The daemon's content, images and snapshots, seen from one client namespace."""

    def __init__(self, conn: Connection, snapshotter: str = "overlayfs") -> None:
        self.conn = conn
        self.snapshotter = snapshotter
        self.content = conn.stub(content_pb2_grpc.ContentStub)
        self.images = conn.stub(images_pb2_grpc.ImagesStub)
        self.snapshots = conn.stub(snapshots_pb2_grpc.SnapshotsStub)
        self.lease: str | None = None

    def _md(self) -> tuple[tuple[str, str], ...]:
        md = self.conn.metadata()
        return (*md, (LEASE_KEY, self.lease)) if self.lease else md

    async def call(self, method: Any, request: Any) -> Any:
        from ketch.client._conn import from_grpc

        import grpc.aio

        try:
            return await method(request, metadata=self._md())
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.conn.address) from None

    @contextlib.asynccontextmanager
    async def leased(self) -> AsyncIterator[None]:
        """Hold what is written meanwhile with a lease (expiring in a day if we die)."""
        stub = self.conn.stub(leases_pb2_grpc.LeasesStub)
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
        r = await self.conn.call(stub.Create, leases_pb2.CreateRequest(
            id=f"ketch-{uuid.uuid4().hex[:16]}", labels={"containerd.io/gc.expire": expire}))
        self.lease = r.lease.id
        try:
            yield
        finally:
            self.lease = None
            with contextlib.suppress(errdefs.NotFound):
                await self.conn.call(stub.Delete, leases_pb2.DeleteRequest(id=r.lease.id))

    # -- content ---------------------------------------------------------------------------

    async def has(self, digest: str) -> bool:
        try:
            await self.call(self.content.Info, content_pb2.InfoRequest(digest=digest))
            return True
        except errdefs.NotFound:
            return False

    async def read(self, digest: str) -> bytes:
        from ketch.client._conn import from_grpc

        import grpc.aio

        out = bytearray()
        call = self.content.Read(content_pb2.ReadContentRequest(digest=digest), metadata=self._md())
        try:
            async for chunk in call:
                out += chunk.data
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.conn.address) from None
        return bytes(out)

    async def read_json(self, digest: str) -> Any:
        return json.loads(await self.read(digest))

    async def write(self, data: bytes, digest: str | None = None, labels: Mapping[str, str] | None = None,
                    progress: Progress | None = None, what: str = "") -> str:
        """Store ``data`` (its digest checked by the daemon); labels are set on the blob
        whether it was there already or not."""
        from ketch.client._conn import from_grpc

        import grpc.aio

        digest = digest or _sha256(data)
        if not await self.has(digest):
            ref = f"ketch-{digest}-{uuid.uuid4().hex[:8]}"
            call = self.content.Write(metadata=self._md())
            try:
                # as containerd's client: STAT names the total and digest, WRITEs carry data
                # at offsets, COMMIT checks it all
                await call.write(content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=ref, total=len(data), expected=digest))
                await call.read()
                for offset in range(0, len(data), CHUNK):
                    chunk = data[offset:offset + CHUNK]
                    await call.write(content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, offset=offset, data=chunk))
                    await call.read()
                    if progress:
                        progress(what or digest, offset + len(chunk), len(data))
                await call.write(content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, ref=ref, offset=len(data), total=len(data), expected=digest,
                    labels=dict(labels or {})))
                await call.read()
                await call.done_writing()
            except grpc.aio.AioRpcError as e:
                err = from_grpc(e, self.conn.address)
                if not isinstance(err, errdefs.AlreadyExists):
                    raise err from None
            finally:
                call.cancel()
        elif progress:
            progress(what or digest, len(data), len(data))
        if labels:
            await self.label(digest, labels)
        return digest

    async def label(self, digest: str, labels: Mapping[str, str]) -> None:
        info = content_pb2.Info(digest=digest, labels=dict(labels))
        await self.call(self.content.Update, content_pb2.UpdateRequest(
            info=info, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])))

    # -- images ----------------------------------------------------------------------------

    async def put_image(self, name: str, target: Mapping[str, Any]) -> Image:
        """Create the image ``name`` → ``target`` (a descriptor dict), or point it there."""
        image = images_pb2.Image(name=name, target=descriptor_pb2.Descriptor(
            media_type=target["mediaType"], digest=target["digest"], size=int(target["size"])))
        try:
            r = await self.call(self.images.Create, images_pb2.CreateImageRequest(image=image))
        except errdefs.AlreadyExists:
            r = await self.call(self.images.Update, images_pb2.UpdateImageRequest(
                image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])))
        return _image_of(r.image)

    async def manifest_of(self, desc: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest for this host's platform under ``desc`` (an index or a manifest)."""
        doc = await self.read_json(desc["digest"])
        if desc["mediaType"] in INDEXES or doc.get("mediaType") in INDEXES or "manifests" in doc:
            chosen = select_manifest(doc, desc["digest"])
            return await self.manifest_of(chosen)
        return dict(doc)

    async def unpack(self, manifest: Mapping[str, Any], config_digest: str) -> str:
        """Apply the manifest's layers as committed snapshots named by chain ID (skipping those
        present); the top chain ID."""
        config = await self.read_json(config_digest)
        diff_ids = list(config.get("rootfs", {}).get("diff_ids") or [])
        layers = list(manifest.get("layers") or [])
        if len(diff_ids) != len(layers):
            raise errdefs.InvalidArgument(f"image config has {len(diff_ids)} diff ids for {len(layers)} layers")
        chains = chain_ids(diff_ids)
        differ = self.conn.stub(diff_pb2_grpc.DiffStub)
        parent = ""
        for layer, diff_id, chain in zip(layers, diff_ids, chains):
            try:
                await self.call(self.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter,
                                                                                       key=chain))
            except errdefs.NotFound:
                key = f"extract-{uuid.uuid4().hex[:12]} {chain}"
                r = await self.call(self.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent))
                try:
                    applied = await self.call(differ.Apply, diff_pb2.ApplyRequest(
                        diff=descriptor_pb2.Descriptor(media_type=layer["mediaType"], digest=layer["digest"],
                                                       size=int(layer["size"])), mounts=r.mounts))
                    if applied.applied.digest != diff_id:
                        raise errdefs.InvalidArgument(f"layer {layer['digest']} unpacks to {applied.applied.digest}, "
                                                      f"the image config says {diff_id}")
                    await self.call(self.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
                        snapshotter=self.snapshotter, name=chain, key=key))
                except errdefs.AlreadyExists:
                    pass  # unpacked meanwhile by someone else
                except BaseException:
                    with contextlib.suppress(errdefs.KetchError):
                        await self.call(self.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                            snapshotter=self.snapshotter, key=key))
                    raise
                await self.label(layer["digest"], {"containerd.io/uncompressed": diff_id})
            parent = chain
        await self.label(config_digest, {f"containerd.io/gc.ref.snapshot.{self.snapshotter}": chains[-1]})
        return chains[-1]


# -- the operations of AsyncClient -------------------------------------------------------------


async def _finish(store: Store, name: str, target: Mapping[str, Any], unpack: bool) -> Image:
    from ketch.client._checkpoint import is_checkpoint

    image = await store.put_image(name, target)
    if unpack and not (target["mediaType"] in INDEXES and is_checkpoint(await store.read_json(target["digest"]))):
        manifest = await store.manifest_of(target)
        await store.unpack(manifest, manifest["config"]["digest"])
    return image


async def import_archive(client: AsyncClient, path: str, *, name: str | None = None, unpack: bool = True,
                         snapshotter: str = "overlayfs", progress: Progress | None = None) -> list[Image]:
    """The images of an OCI layout or ``docker save`` tar archive."""
    files = await asyncio.to_thread(_read_tar, path)
    store = Store(client.conn, snapshotter)
    out = []
    async with store.leased():
        if "index.json" in files:
            index = json.loads(files["index.json"])
            for blob, data in files.items():
                if blob.startswith("blobs/"):
                    digest = blob.split("/", 1)[1].replace("/", ":", 1)
                    labels = {}
                    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
                        doc = json.loads(data)
                        if isinstance(doc, dict) and doc.get("mediaType") in (*INDEXES, *MANIFESTS) or (
                                isinstance(doc, dict) and ("manifests" in doc or "layers" in doc)):
                            labels = gc_labels(doc)
                    await store.write(data, digest, labels, progress, blob)
            for desc in index.get("manifests") or []:
                notes = desc.get("annotations") or {}
                image_name = name or notes.get("io.containerd.image.name") or notes.get("org.opencontainers.image.ref.name")
                if not image_name:
                    raise errdefs.InvalidArgument(f"{path}: manifest {desc['digest']} has no name; give one")
                out.append(await _finish(store, image_name, desc, unpack))
        elif "manifest.json" in files:
            for entry in json.loads(files["manifest.json"]):
                config = files[entry["Config"]]
                layers = []
                for layer_path in entry["Layers"]:
                    data = files[layer_path]
                    digest = await store.write(data, None, None, progress, layer_path)
                    layers.append({"mediaType": DOCKER_LAYER_TAR, "digest": digest, "size": len(data)})
                config_digest = await store.write(config, None, None, progress, entry["Config"])
                manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                            "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
                            "layers": layers}
                data = json.dumps(manifest).encode()
                digest = await store.write(data, None, gc_labels(manifest))
                target = {"mediaType": DOCKER_MANIFEST, "digest": digest, "size": len(data)}
                for tag in (entry.get("RepoTags") or [name] if name else entry.get("RepoTags") or []):
                    out.append(await _finish(store, str(reference.parse(tag)), target, unpack))
        else:
            raise errdefs.InvalidArgument(f"{path}: neither an OCI layout (index.json) nor a docker save archive")
    return out


def _read_tar(path: str) -> dict[str, bytes]:
    try:
        with tarfile.open(path) as tar:
            out = {}
            for m in tar:
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    out[os.path.normpath(m.name)] = f.read()
            return out
    except FileNotFoundError:
        raise errdefs.NotFound(f"archive {path}") from None
    except tarfile.TarError as e:
        raise errdefs.InvalidArgument(f"{path}: not a tar archive ({e})") from None


async def export_archive(client: AsyncClient, names: Sequence[str], path: str) -> None:
    """An OCI layout tar of the images ``names`` (every blob of theirs the daemon has)."""
    store = Store(client.conn)
    files: dict[str, bytes] = {}
    manifests = []

    async def walk(desc: Mapping[str, Any]) -> None:
        key = "blobs/" + desc["digest"].replace(":", "/", 1)
        if key in files:
            return
        try:
            data = await store.read(desc["digest"])
        except errdefs.NotFound:
            if desc["mediaType"] in MANIFESTS:
                return  # another platform's manifest, never pulled
            raise
        files[key] = data
        if desc["mediaType"] in (*INDEXES, *MANIFESTS):
            doc = json.loads(data)
            for child in (*(doc.get("manifests") or []), *([doc["config"]] if "config" in doc else []),
                          *(doc.get("layers") or [])):
                await walk(child)

    for name in names:
        image = await client.image(name)
        desc = {"mediaType": image.media_type, "digest": image.digest, "size": image.size}
        await walk(desc)
        manifests.append({**desc, "annotations": {"io.containerd.image.name": name,
                                                   "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}})
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    await asyncio.to_thread(_write_tar, path, files)


def _write_tar(path: str, files: Mapping[str, bytes]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, path)


async def prepare_image_container(client: AsyncClient, c: containers_pb2.Container, image: str, opts: SpecOptions,
                                  snapshotter: str, spec: Mapping[str, Any] | None) -> Container:
    """The container ``c`` from ``image``: unpacked if need be, a snapshot of its own on top,
    the spec from the image's config and ``opts``."""
    from ketch.client._containers import build_spec, spec_any

    record = await client.image(image)
    store = Store(client.conn, snapshotter)
    async with store.leased():
        manifest = await store.manifest_of({"mediaType": record.media_type, "digest": record.digest})
        config = await store.read_json(manifest["config"]["digest"])
        top = await store.unpack(manifest, manifest["config"]["digest"])
        await store.call(store.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=c.id, parent=top))
        try:
            c.image, c.snapshotter, c.snapshot_key = record.name, snapshotter, c.id
            made = spec if spec is not None else build_spec(client.namespace, c.id, opts,
                                                             image_config=config.get("config") or {})
            c.spec.CopyFrom(spec_any(made))
            return await client._create(c)
        except BaseException:
            with contextlib.suppress(errdefs.KetchError):
                await store.call(store.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=snapshotter, key=c.id))
            raise


async def list_images(client: AsyncClient, filters: Sequence[str]) -> list[Image]:
    r = await client.conn.call(client.conn.stub(images_pb2_grpc.ImagesStub).List,
                               images_pb2.ListImagesRequest(filters=list(filters)))
    return [_image_of(i) for i in r.images]


async def get_image(client: AsyncClient, name: str) -> Image:
    r = await client.conn.call(client.conn.stub(images_pb2_grpc.ImagesStub).Get, images_pb2.GetImageRequest(name=name))
    return _image_of(r.image)


async def remove_image(client: AsyncClient, name: str) -> None:
    await client.conn.call(client.conn.stub(images_pb2_grpc.ImagesStub).Delete,
                           images_pb2.DeleteImageRequest(name=name, sync=True))


async def tag_image(client: AsyncClient, source: str, target: str, *, force: bool = False) -> Image:
    image = await get_image(client, source)
    store = Store(client.conn)
    if not force:
        with contextlib.suppress(errdefs.NotFound):
            await get_image(client, target)
            raise errdefs.AlreadyExists(f"image {target!r}")
    return await store.put_image(target, {"mediaType": image.media_type, "digest": image.digest, "size": image.size})


async def image_size(client: AsyncClient, image: Image) -> int:
    """The bytes of this platform's manifest, config and layers (what a pull fetched); of a
    checkpoint, the bytes of its own blobs (CRIU images, spec, options, rw layer)."""
    from ketch.client._checkpoint import is_checkpoint

    store = Store(client.conn)
    if image.media_type in INDEXES:
        with contextlib.suppress(errdefs.NotFound):
            index = await store.read_json(image.digest)
            if is_checkpoint(index):
                return sum(int(m["size"]) for m in index["manifests"] if m["mediaType"] not in (*INDEXES, *MANIFESTS))
    try:
        manifest = await store.manifest_of({"mediaType": image.media_type, "digest": image.digest})
    except errdefs.NotFound:
        return 0
    return int(manifest["config"]["size"]) + sum(int(x["size"]) for x in manifest.get("layers") or [])


# -- pull ----------------------------------------------------------------------------------

async def pull(client: AsyncClient, ref: str, *, plain_http: bool | None = None, unpack: bool = True,
               snapshotter: str = "overlayfs", progress: Progress | None = None) -> Image:
    """Fetch ``ref`` for this host's platform, store it as the image ``ref`` names (docker's
    short names normalized) and unpack it. ``progress(what, done, total)`` follows each blob.
    The registry is spoken to as :class:`ketch.distribution.registry.Registry` does (anonymous
    tokens where it asks for them; plain HTTP on loopback unless ``plain_http`` says)."""
    parsed = reference.parse(ref)
    registry = Registry(plain_http=plain_http)
    store = Store(client.conn, snapshotter)

    async def fetch(desc: Mapping[str, Any], manifest: bool) -> bytes:
        remote = RemoteDescriptor(str(desc.get("mediaType", "")), str(desc["digest"]), int(desc.get("size", -1)))

        def get() -> bytes:
            with contextlib.closing(registry.fetch(parsed, remote, manifest=manifest)) as got:
                body: bytes = got.body.read()
            return body

        data = await asyncio.to_thread(get)
        if _sha256(data) != remote.digest:
            raise errdefs.DataLoss(f"{ref}: {remote.digest} from the registry does not match its digest")
        return data

    async with store.leased():
        root = await asyncio.to_thread(registry.resolve, parsed)
        top = {"mediaType": root.media_type, "digest": root.digest, "size": root.size}
        data = await fetch(top, True)
        top["size"] = len(data)
        doc = json.loads(data)
        index = None
        if root.media_type in INDEXES or "manifests" in doc:
            index, chosen = (data, doc), select_manifest(doc, ref)
            data = await fetch(chosen, True)
            doc = json.loads(data)
        for blob in (doc["config"], *(doc.get("layers") or [])):
            if not await store.has(blob["digest"]):
                body = await fetch(blob, False)
                await store.write(body, blob["digest"], None, progress, blob["digest"])
            elif progress:
                progress(blob["digest"], int(blob["size"]), int(blob["size"]))
        await store.write(data, None, gc_labels(doc))
        if index is not None:
            await store.write(index[0], None, gc_labels(index[1]))
        image = await store.put_image(str(parsed), top)
        if unpack:
            await store.unpack(doc, doc["config"]["digest"])
        return image
