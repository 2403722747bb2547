"""Small file helpers of the content store: OS errors to typed errors, the times written in
ingest directories."""

from __future__ import annotations

import errno
from datetime import datetime, timezone

from ketch.errdefs import KetchError, ResourceExhausted, Unknown

#: how much is read or copied at a time
CHUNK = 1 << 20

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def os_error(exc: OSError, doing: str) -> KetchError:
    """The one place an OS error becomes a typed error: disk full → ResourceExhausted."""
    words = _DISK_FULL.get(exc.errno or 0)
    if words is not None:
        return ResourceExhausted(f"{words} {doing}")
    return Unknown(f"{doing}: {exc.strerror or exc}")


def format_time(t: float) -> str:
    """RFC 3339 in UTC, as containerd writes ``startedat``/``updatedat``."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.strip()).timestamp()


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
