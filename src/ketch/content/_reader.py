"""Reading blobs: the Read rules, in one place, and :class:`BlobReader`.

The rules of containerd's ``Content/Read`` (``contentserver.go`` in 1.6, unchanged since),
which :func:`read_span` applies for every way of reading a blob — the Read service,
:meth:`ContentStore.read`, :meth:`BlobReader.read_at` and :meth:`BlobReader.chunks`:

- a negative offset reads from 0;
- an offset past the end is OutOfRange ``read past object length N bytes``; an offset
  equal to the length reads nothing;
- a size of 0 or less reads to the end, and so does a size reaching past it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ketch.errdefs import InvalidArgument, OutOfRange

__all__ = ["BlobReader", "read_span"]


def read_span(offset: int, size: int, length: int) -> tuple[int, int]:
    """The ``(offset, size)`` to read when ``offset`` and ``size`` are asked of a blob of
    ``length`` bytes, by the Read rules above; OutOfRange for an offset past the end."""
    offset = max(offset, 0)
    if offset > length:
        raise OutOfRange(f"read past object length {length} bytes")
    if size <= 0 or size > length - offset:
        size = length - offset
    return offset, size


class BlobReader:
    """An open blob: random access with :meth:`read_at` and :meth:`chunks`, or sequential
    :meth:`read` (a file object for tar and gzip readers).

    Made by :meth:`ContentStore.reader`. It reads the file it opened, even if garbage
    collection removes the blob meanwhile. Close it (or use ``with``).
    """

    def __init__(self, fd: int, digest: str, size: int) -> None:
        self._fd = fd
        self._pos = 0
        #: the blob's digest
        self.digest = digest
        #: the blob's size in bytes
        self.size = size

    def read_at(self, offset: int, size: int) -> bytes:
        """The bytes :func:`read_span` names, in one piece (so ``size <= 0`` is all the rest)."""
        offset, size = read_span(offset, size, self.size)
        return self._pread(offset, size)

    def chunks(self, offset: int = 0, size: int = 0, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
        """``(offset, data)`` pieces of at most ``chunk_size`` bytes covering what
        :func:`read_span` names. The rules are applied by this call, before the first piece."""
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk size {chunk_size} must be positive")
        offset, size = read_span(offset, size, self.size)
        return self._chunks(offset, offset + size, chunk_size)

    def _chunks(self, offset: int, end: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
        while offset < end:
            data = self._pread(offset, min(chunk_size, end - offset))
            if not data:
                return
            yield offset, data
            offset += len(data)

    def _pread(self, offset: int, size: int) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def read(self, size: int = -1) -> bytes:
        """Read sequentially from the current position (all the rest when ``size < 0``)."""
        if size < 0:
            size = self.size - self._pos
        data = self._pread(self._pos, min(size, self.size - self._pos))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position of :meth:`read`."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise InvalidArgument(f"seek to negative position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        """The open file descriptor (for ``os.sendfile`` and friends)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
