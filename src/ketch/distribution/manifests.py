"""Manifests and indexes: their media types, the manifest an index holds for this machine,
layer chain ids, and the labels by which containerd's garbage collection follows an image from
its index to its manifests, config and layers."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from ketch import errdefs

__all__ = ["CHECKPOINT_CONFIG", "CHECKPOINT_CRIU", "CHECKPOINT_OPTIONS", "CHECKPOINT_RUNTIME_OPTIONS",
           "OCI_LAYER_GZIP", "DOCKER_LIST", "DOCKER_MANIFEST", "INDEX_TYPES", "MANIFEST_TYPES", "OCI_INDEX", "OCI_MANIFEST",
           "chain_ids", "gc_labels", "host_platform", "select_manifest"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
#: an index (a manifest per platform), OCI or Docker
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
#: a single-platform manifest, OCI or Docker
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
#: what a containerd checkpoint image's index holds: the CRIU image (a tar), the container's spec,
#: the checkpoint's and the runtime's options (protobuf), its rw layer's diff
CHECKPOINT_CRIU = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
CHECKPOINT_OPTIONS = "application/vnd.containerd.container.checkpoint.options.v1+proto"
CHECKPOINT_RUNTIME_OPTIONS = "application/vnd.containerd.container.checkpoint.runtime.options+proto"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_GC_REF = "containerd.io/gc.ref.content"


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI's words, for choosing a manifest from an index."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(machine, machine)
    return "linux", arch


def select_manifest(index: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The descriptor (as in the index) of its manifest for this machine's platform; NotFound
    naming ``where`` and the platforms it has when there is none. Entries that are not
    manifests or indexes (a checkpoint's blobs, say) are no candidates, whatever their platform."""
    want_os, want_arch = host_platform()
    manifests: Sequence[Mapping[str, Any]] = [m for m in index.get("manifests") or []
                                              if m.get("mediaType", OCI_MANIFEST) in (*MANIFEST_TYPES, *INDEX_TYPES)]
    for m in manifests:
        plat = m.get("platform") or {}
        if plat.get("os", "linux") == want_os and plat.get("architecture") == want_arch:
            return m
    have = sorted({f"{(m.get('platform') or {}).get('os', '?')}/{(m.get('platform') or {}).get('architecture', '?')}"
                   for m in manifests})
    raise errdefs.NotFound(f"{where}: no manifest for {want_os}/{want_arch} in its index (it has {', '.join(have)})")


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of each layer: the first is its diff id, then sha256 of
    ``<chain below> <diff id>``."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def gc_labels(doc: Mapping[str, Any]) -> dict[str, str]:
    """The labels that make a stored manifest or index keep what it refers to: its config and
    layers, or its manifests."""
    labels: dict[str, str] = {}
    if (doc.get("config") or {}).get("digest"):
        labels[f"{_GC_REF}.config"] = doc["config"]["digest"]
    for i, layer in enumerate(doc.get("layers") or []):
        labels[f"{_GC_REF}.l.{i}"] = layer["digest"]
    for i, m in enumerate(doc.get("manifests") or []):
        labels[f"{_GC_REF}.m.{i}"] = m["digest"]
    return labels
