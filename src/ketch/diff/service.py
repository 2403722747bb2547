"""The diff service over the content store (containerd's walking differ as a service).

``apply`` unpacks a layer blob onto mounts and tells its diff id; ``diff`` writes the changes
between two sets of mounts as a layer blob (gzip unless an uncompressed media type is asked
for), labelled ``containerd.io/uncompressed`` with its diff id, held by ``lease``; the same
diff twice gives the same descriptor (the blob being there already is success). The disk work
runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ketch.diff._mounts import apply_to_mounts, compare_mounts
from ketch.errdefs import AlreadyExists
from ketch.diff._streams import MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP
from ketch.mount import Mount

if TYPE_CHECKING:
    from ketch.content import ContentStore

__all__ = ["Applied", "DiffService"]

_COPY_CHUNK = 1 << 20

#: (media type, digest, size) of a blob
Applied = tuple[str, str, int]


class DiffService:
    def __init__(self, content: ContentStore) -> None:
        self._content = content

    async def apply(self, namespace: str, digest: str, media_type: str, mounts: Sequence[Mount]) -> Applied:
        """Unpack the layer blob onto ``mounts``; the uncompressed layer's descriptor."""
        reader = self._content.reader(namespace, digest)
        try:
            diff_id, size = await asyncio.to_thread(apply_to_mounts, reader, mounts, media_type)
        finally:
            reader.close()
        return MEDIA_TYPE_LAYER, diff_id, size

    async def diff(self, namespace: str, lower: Sequence[Mount], upper: Sequence[Mount], *, media_type: str = "",
                   ref: str = "", labels: dict[str, str] | None = None, lease: str | None = None) -> Applied:
        """Write the changes from ``lower`` to ``upper`` as a blob; its descriptor."""
        media_type = media_type or MEDIA_TYPE_LAYER_GZIP
        ref = ref or f"diff-{time.time_ns()}-{secrets.token_hex(6)}"  # unique, as containerd's

        def make() -> tuple[str, int]:
            with tempfile.TemporaryFile() as out:
                diff_id, size = compare_mounts(lower, upper, out, compress=media_type.endswith("gzip"))
                out.seek(0)
                with contextlib.closing(self._content.writer(namespace, ref, lease=lease)) as w:
                    while chunk := out.read(_COPY_CHUNK):
                        w.write(chunk)
                    blob_labels = dict(labels or {})
                    blob_labels.setdefault("containerd.io/uncompressed", diff_id)
                    digest = w.digest()
                    try:
                        w.commit(size, "", blob_labels)
                    except AlreadyExists:
                        pass  # the same diff again: the blob is there, and this is its descriptor
                return digest, size

        digest, size = await asyncio.to_thread(make)
        return media_type, digest, size
