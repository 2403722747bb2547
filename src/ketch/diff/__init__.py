"""Layers: applying an OCI layer tar onto a directory, and computing one from two trees.

- :func:`apply_layer` streams a layer (plain tar or gzip; OCI and Docker media types) onto a
  directory and returns its diff id (sha256 of the uncompressed tar) and uncompressed size.
  Nothing an entry says can write outside that directory (see :mod:`ketch.diff._apply`).
- :func:`create_layer` compares a lower and an upper tree and writes the changes as a layer,
  deletions as ``.wh.`` whiteouts (containerd's walking differ).
- :func:`mounted` mounts a snapshot's mounts on a temporary directory for the length of a
  ``with`` block; :func:`apply_to_mounts` and :func:`compare_mounts` are the diff service's
  Apply and Diff on top of it.

Every function here blocks on the disk: from an event loop, call it in a thread.
"""

from __future__ import annotations

from ketch.diff._apply import apply_layer
from ketch.diff._create import create_layer
from ketch.diff._mounts import apply_to_mounts, compare_mounts, mounted, readonly_mounts
from ketch.diff._paths import clean_name, root_path
from ketch.diff._streams import (
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_ZSTD,
    compression_of,
)

__all__ = [
    "MEDIA_TYPE_DOCKER_LAYER",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_LAYER",
    "MEDIA_TYPE_LAYER_GZIP",
    "MEDIA_TYPE_LAYER_ZSTD",
    "apply_layer",
    "apply_to_mounts",
    "clean_name",
    "compare_mounts",
    "compression_of",
    "create_layer",
    "mounted",
    "readonly_mounts",
    "root_path",
]
