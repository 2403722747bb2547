"""The CRI's ImageService over ketch's images, content and puller, as containerd's CRI keeps
images: in the ``k8s.io`` namespace, one image per config digest (its CRI id), recorded under
every name it is known by — ``repo:tag``, ``repo@sha256:<manifest>`` and the id itself — each
record labelled ``io.cri-containerd.image=managed``. ctr and the containerd API see the same
records.

An image asked for by the kubelet may be named by id (``sha256:<hex>``), by any of those names,
or by a reference that normalizes to one (``busybox`` → ``docker.io/library/busybox:latest``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ketch import errdefs
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.content import ContentStore
from ketch.images import ImageService
from ketch.distribution.manifests import INDEX_TYPES, chain_ids, select_manifest
from ketch.distribution.reference import parse
from ketch.distribution.registry import Credentials
from ketch.images.pull import Puller
from ketch.metadata import Descriptor, Image

__all__ = ["MANAGED_LABEL", "NAMESPACE", "CriImages", "ImageInfo"]

#: the namespace the CRI keeps its images, pods and containers in (containerd's)
NAMESPACE = "k8s.io"
MANAGED_LABEL = "io.cri-containerd.image"


@dataclass
class ImageInfo:
    """One CRI image: the records that name it, and what its config says."""

    id: str
    target: Descriptor
    config: dict[str, Any]
    size: int
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)

    def message(self) -> cri.Image:
        img = cri.Image(id=self.id, repo_tags=sorted(self.repo_tags), repo_digests=sorted(self.repo_digests),
                        size=self.size)
        user = (self.config.get("config") or {}).get("User") or ""
        name = user.split(":", 1)[0]
        if name.isdigit():
            img.uid.value = int(name)
        elif name:
            img.username = name
        return img

    def verbose(self) -> dict[str, str]:
        return {"info": json.dumps({"imageSpec": self.config, "target": {
            "mediaType": self.target.media_type, "digest": self.target.digest, "size": self.target.size}})}


def credentials_of(auth: cri.AuthConfig) -> Credentials | None:
    """The credentials a PullImageRequest carries, for any host (the kubelet picked them for
    this image's registry)."""
    user, password = auth.username, auth.password
    if auth.auth and not user:
        try:
            user, _, password = base64.b64decode(auth.auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise errdefs.InvalidArgument("auth: not base64 of user:password") from None
    if auth.identity_token or auth.registry_token:
        raise errdefs.Unimplemented("auth: identity and registry tokens are not supported; use username and password")
    if not user:
        return None
    pair = (user, password)
    return lambda host: pair


class CriImages:
    def __init__(self, images: ImageService, content: ContentStore, puller: Puller, *, snapshotter: str,
                 fs_root: str, collect: Callable[[], object]) -> None:
        self._images = images
        self._content = content
        self._puller = puller
        self._snapshotter = snapshotter
        self._fs_root = fs_root
        self._collect = collect

    async def pull(self, ref: str, auth: cri.AuthConfig | None = None) -> str:
        """Pull ``ref`` and record it under its names; its id."""
        creds = credentials_of(auth) if auth is not None else None
        labels = {MANAGED_LABEL: "managed"}
        pulled = await self._puller.pull(NAMESPACE, ref, credentials=creds, snapshotter=self._snapshotter,
                                         labels=labels)
        parsed = parse(ref)
        image_id = pulled.config.digest
        target = pulled.image.target
        for name in (str(parsed.with_digest(target.digest)), image_id):
            record = Image(name, dict(labels), target)
            try:
                self._images.create(NAMESPACE, record)
            except errdefs.AlreadyExists:
                self._images.update(NAMESPACE, record, ["target", "labels"])
        return image_id

    def list(self) -> list[ImageInfo]:
        return list(self._by_id().values())

    def find(self, ref: str) -> ImageInfo | None:
        """The image ``ref`` names (id, name or a reference normalizing to one), or None."""
        wanted = self._name_of(ref)
        if wanted is None:
            return None
        for info in self._by_id().values():
            if wanted == info.id or wanted in info.repo_tags or wanted in info.repo_digests:
                return info
        return None

    @staticmethod
    def chain_id(info: ImageInfo) -> str:
        """The snapshot the image unpacks to (its top layer's chain id)."""
        chains = chain_ids((info.config.get("rootfs") or {}).get("diff_ids") or [])
        if not chains:
            raise errdefs.InvalidArgument(f"image {info.id} has no layers")
        return chains[-1]

    async def remove(self, ref: str) -> None:
        """Remove every record of the image ``ref`` names; nothing when there is none."""
        info = self.find(ref)
        if info is None:
            return
        for name in (*info.repo_tags, *info.repo_digests, info.id):
            try:
                self._images.delete(NAMESPACE, name)
            except errdefs.NotFound:
                pass
        self._collect()

    async def fs_info(self) -> cri.FilesystemUsage:
        def usage() -> tuple[int, int]:
            used = inodes = 0
            for dirpath, dirnames, filenames in os.walk(self._fs_root):
                for name in (*dirnames, *filenames):
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    used += st.st_blocks * 512
                    inodes += 1
            return used, inodes

        used, inodes = await asyncio.to_thread(usage)
        out = cri.FilesystemUsage(timestamp=time.time_ns(), fs_id=cri.FilesystemIdentifier(mountpoint=self._fs_root))
        out.used_bytes.value = used
        out.inodes_used.value = inodes
        return out

    # -- records → images -----------------------------------------------------------------

    @staticmethod
    def _name_of(ref: str) -> str | None:
        if ref.startswith("sha256:"):
            return ref
        if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
            return f"sha256:{ref}"
        try:
            return str(parse(ref))
        except errdefs.InvalidArgument:
            return None

    def _by_id(self) -> dict[str, ImageInfo]:
        out: dict[str, ImageInfo] = {}
        for record in self._images.list(NAMESPACE):
            try:
                config_desc, size = self._config_of(record.target)
                config = json.loads(self._read(config_desc.digest))
            except (errdefs.KetchError, ValueError, KeyError):
                continue  # not (or no longer) complete: not an image the CRI can use
            info = out.setdefault(config_desc.digest, ImageInfo(config_desc.digest, record.target, config, size))
            if record.name == info.id:
                continue
            if "@" in record.name:
                info.repo_digests.append(record.name)
            else:
                info.repo_tags.append(record.name)
        return out

    def _read(self, digest: str) -> bytes:
        with self._content.reader(NAMESPACE, digest) as r:
            return r.read()

    def _config_of(self, target: Descriptor) -> tuple[Descriptor, int]:
        """The config descriptor of the image ``target`` points at, and the image's size."""
        manifest_desc = target
        if target.media_type in INDEX_TYPES:
            m = select_manifest(json.loads(self._read(target.digest)), target.digest)
            manifest_desc = Descriptor(str(m.get("mediaType", "")), str(m["digest"]), int(m["size"]))
        manifest = json.loads(self._read(manifest_desc.digest))
        config = manifest["config"]
        size = manifest_desc.size + int(config["size"]) + sum(int(layer["size"]) for layer in manifest.get("layers") or [])
        return Descriptor(config.get("mediaType", ""), config["digest"], int(config["size"])), size
