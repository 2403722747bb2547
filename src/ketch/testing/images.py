"""Small OCI images made locally (no registry is reachable here): an OCI image layout archive
built from a root filesystem directory, as ``ctr images import`` and ``docker load`` read it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ketch import digests

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return digests.from_sha256_hex(hashlib.sha256(self.data).hexdigest())

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


@dataclass(frozen=True)
class Image:
    """One single-platform image: its manifest, config and layers as blobs."""

    name: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.manifest, self.config, *self.layers)


def layer_from_dir(root: str | os.PathLike[str]) -> tuple[Blob, str]:
    """A gzip'd tar layer of ``root`` (deterministic: sorted, mtime 0, root-owned) and its diff id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        base = Path(root)
        for path in sorted(base.rglob("*"), key=lambda p: str(p.relative_to(base))):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(base)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = raw.getvalue()
    diff_id = digests.from_sha256_hex(hashlib.sha256(data).hexdigest())
    return Blob(LAYER, gzip.compress(data, mtime=0)), diff_id


def image_from_dir(root: str | os.PathLike[str], name: str, *, arch: str = "amd64",
                   cmd: tuple[str, ...] = ("sh",)) -> Image:
    layer, diff_id = layer_from_dir(root)
    config = Blob(CONFIG, json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }, sort_keys=True).encode())
    manifest = Blob(MANIFEST, json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": config.descriptor(), "layers": [layer.descriptor()],
    }, sort_keys=True).encode())
    return Image(name, manifest, config, (layer,), (diff_id,))


def write_oci_archive(image: Image, out: str | os.PathLike[str]) -> None:
    """An OCI image layout as a tar, named so that ``ctr images import`` keeps ``image.name``."""
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [image.manifest.descriptor(
        annotations={"io.containerd.image.name": image.name,
                     "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[-1]},
        platform={"architecture": json.loads(image.config.data)["architecture"], "os": "linux"})]},
        sort_keys=True).encode()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    for blob in image.blobs:
        files["blobs/sha256/" + digests.sha256_hex(blob.digest)] = blob.data
    with tarfile.open(out, "w") as tar:
        for dirname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def write_docker_archive(image: Image, out: str | os.PathLike[str], tag: str) -> None:
    """The same image as ``docker save`` writes it: manifest.json, the config, and each layer
    as an uncompressed tar in its own directory."""
    config_name = digests.sha256_hex(image.config.digest) + ".json"
    files: dict[str, bytes] = {config_name: image.config.data}
    layer_names = []
    for layer, diff_id in zip(image.layers, image.diff_ids):
        name = f"{diff_id.split(':', 1)[1]}/layer.tar"
        files[name] = gzip.decompress(layer.data)
        layer_names.append(name)
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]).encode()
    repo, _, version = tag.rpartition(":")
    files["repositories"] = json.dumps({repo: {version: layer_names[-1].split("/")[0]}}).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            if "/" in name:
                info = tarfile.TarInfo(name.split("/")[0])
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
