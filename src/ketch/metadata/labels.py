"""Label rules shared by every record that carries labels (containerd ``labels/validate.go``)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ketch.errdefs import InvalidArgument

__all__ = [
    "GC_EXPIRE",
    "GC_FLAT",
    "GC_REF_CONTENT",
    "GC_REF_SNAPSHOT",
    "GC_ROOT",
    "MAX_SIZE",
    "clean",
    "dumps",
    "loads",
    "validate",
]

#: most bytes a label's key and value may take together
MAX_SIZE = 4096

# The labels garbage collection reads (containerd ``metadata/gc.go``); see :mod:`ketch.gc`.

#: on content or a snapshot: keep it whatever refers to it (any value)
GC_ROOT = "containerd.io/gc.root"
#: ``containerd.io/gc.ref.content`` alone or followed by ``.<name>`` or ``/<name>``: the
#: value is a digest this object keeps
GC_REF_CONTENT = "containerd.io/gc.ref.content"
#: ``containerd.io/gc.ref.snapshot.<snapshotter>`` optionally followed by ``/<name>``: the
#: value is a snapshot key in that snapshotter this object keeps
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
#: on a lease: an RFC 3339 time after which the lease no longer keeps anything
GC_EXPIRE = "containerd.io/gc.expire"
#: on a lease: keep only the resources named, not what they refer to
GC_FLAT = "containerd.io/gc.flat"


def validate(key: str, value: str) -> None:
    """Raise InvalidArgument when ``key`` and ``value`` together exceed :data:`MAX_SIZE` bytes."""
    if len(key.encode()) + len(value.encode()) > MAX_SIZE:
        raise InvalidArgument(
            f"label key and value greater than maximum size ({MAX_SIZE} bytes), key: {key[:10]}"
        )


def clean(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A copy without empty values: containerd stores none (an empty value means "remove")."""
    return {k: v for k, v in (labels or {}).items() if v != ""}


def dumps(labels: Mapping[str, str]) -> str:
    """The JSON text stored in a ``labels`` column."""
    return json.dumps(dict(sorted(labels.items())), ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> dict[str, str]:
    """Labels read back from a ``labels`` column."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("labels column does not hold a JSON object")
    return {str(k): str(v) for k, v in value.items()}
