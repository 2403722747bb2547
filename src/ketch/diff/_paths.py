"""Names from a layer, turned into paths that cannot leave the directory they are applied to.

Two steps, both refusing to let an entry reach outside ``root``:

1. :func:`clean_name` treats the entry's name lexically: a leading ``/`` is dropped (the name
   is relative to the layer's root, as GNU tar and containerd read it), ``.`` and empty
   components go, and a ``..`` that would climb above the root is an error.
2. :func:`root_path` resolves the cleaned directory part against the tree on disk, following
   symbolic links as if ``root`` were ``/`` (containerd's ``fs.RootPath``): an absolute target
   starts again at ``root``, and ``..`` stops at ``root``. Every component of the result that
   exists is a real directory, never a link, so a later write at ``<result>/<base>`` lands
   inside ``root`` whatever links the layer (or a lower layer) planted.

The last component of an entry is never resolved: the entry replaces whatever is there.
"""

from __future__ import annotations

import os
import stat

from ketch.errdefs import InvalidArgument

__all__ = ["MAX_SYMLINKS", "clean_name", "root_path"]

#: links followed while resolving one path before giving up (Linux's own limit is 40 per
#: lookup; containerd allows 255)
MAX_SYMLINKS = 255


def clean_name(name: str) -> str:
    """``name`` as a clean relative path ("" for the root); InvalidArgument if it escapes."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArgument(f"layer entry {name!r}: path escapes the root")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def root_path(root: str, path: str) -> str:
    """The path under ``root`` that ``path`` reaches when ``root`` is taken as ``/``.

    Components that do not exist are kept as they are (the caller may create them). A chain
    of more than :data:`MAX_SYMLINKS` links is InvalidArgument.
    """
    pending = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise InvalidArgument(f"too many symbolic links resolving {path!r}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
    return os.path.join(root, *resolved)
