"""Layer media types, decompression, and the small readers and writers that count and digest.

A layer's digest in an image config (its *diff id*) is the sha256 of the **uncompressed** tar
stream; the blob's own digest is of the compressed bytes. The readers here decompress and
digest in one pass, without seeking, so a layer streams from the content store to the disk.
"""

from __future__ import annotations

import gzip
import hashlib
from typing import BinaryIO, Protocol, cast

from ketch import digests
from ketch.errdefs import Unimplemented

__all__ = [
    "MEDIA_TYPE_DOCKER_LAYER",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_LAYER",
    "MEDIA_TYPE_LAYER_GZIP",
    "MEDIA_TYPE_LAYER_ZSTD",
    "DigestingReader",
    "DigestingWriter",
    "compression_of",
    "gzip_writer",
    "open_uncompressed",
]

MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = MEDIA_TYPE_LAYER + "+gzip"
MEDIA_TYPE_LAYER_ZSTD = MEDIA_TYPE_LAYER + "+zstd"
MEDIA_TYPE_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


def compression_of(media_type: str) -> str:
    """The compression a layer media type declares: "", "gzip", "zstd" or "unknown" (Docker's
    plain type, which may in fact be compressed). Unimplemented for other media types, with
    containerd's words. The stream itself is checked by its magic number in any case."""
    base, _, ext = media_type.partition("+")
    exts = sorted(ext.split("+")) if ext else []
    if "encrypted" in exts:
        raise Unimplemented(f"encrypted layers are not supported: {media_type}")
    if base in (MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_FOREIGN):
        return "" if exts else "unknown"
    if base in (MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_FOREIGN_GZIP):
        return "" if exts else "gzip"
    if base in (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_NONDISTRIBUTABLE):
        if exts and exts[-1] in ("gzip", "zstd"):
            return exts[-1]
        return ""
    raise Unimplemented(f"unrecognised mediatype {media_type}")


class _Prefixed:
    """``prefix`` followed by the rest of ``src``: a reader after a peek."""

    def __init__(self, prefix: bytes, src: Readable) -> None:
        self._prefix = prefix
        self._src = src

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size < 0:
                data, self._prefix = self._prefix + self._src.read(), b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._src.read(size)


def open_uncompressed(fileobj: Readable, media_type: str) -> Readable:
    """A reader of the uncompressed tar stream in ``fileobj`` (gzip found by its magic)."""
    compression_of(media_type)
    head = b""
    while len(head) < 4:
        more = fileobj.read(4 - len(head))
        if not more:
            break
        head += more
    stream = _Prefixed(head, fileobj)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=cast(BinaryIO, stream), mode="rb")
    if head.startswith(_ZSTD_MAGIC):
        raise Unimplemented("zstd-compressed layers are not supported")
    return stream


class DigestingReader:
    """Reads through to ``src``, keeping the sha256 and the count of what passed."""

    def __init__(self, src: Readable) -> None:
        self._src = src
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (a tar's trailing padding counts in its digest)."""
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return digests.from_sha256_hex(self._hash.hexdigest())


class DigestingWriter:
    """Writes through to ``dst``, keeping the sha256 and the count of what passed."""

    def __init__(self, dst: Writable) -> None:
        self._dst = dst
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._dst.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return digests.from_sha256_hex(self._hash.hexdigest())


def gzip_writer(dst: Writable) -> gzip.GzipFile:
    """A gzip stream onto ``dst`` without a name or a timestamp, so that equal trees give
    equal blobs."""
    return gzip.GzipFile(filename="", mode="wb", fileobj=cast(BinaryIO, dst), compresslevel=6, mtime=0)

