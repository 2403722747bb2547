"""Label rules shared by every record that carries labels (containerd ``labels/validate.go``)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ketch.errdefs import InvalidArgument

__all__ = ["MAX_SIZE", "clean", "dumps", "loads", "validate"]

#: most bytes a label's key and value may take together
MAX_SIZE = 4096


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
