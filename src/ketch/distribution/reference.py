"""Image references as Docker and the kubelet write them, normalized as containerd's CRI does.

``busybox`` is ``docker.io/library/busybox:latest``; ``registry.k8s.io/pause:3.6`` stays as it
is; ``repo@sha256:…`` names a manifest by digest (a tag beside a digest is kept in the name but
the digest wins). The first path component is a registry host when it has a dot or a colon or is
``localhost``; otherwise the registry is Docker Hub, whose one-component names get ``library/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ketch import digests
from ketch.errdefs import InvalidArgument

__all__ = ["DOCKER_HUB", "Reference", "parse"]

DOCKER_HUB = "docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?")


@dataclass(frozen=True)
class Reference:
    """A normalized reference: where the image lives and which of its manifests."""

    domain: str
    """The registry host (``docker.io`` for Docker Hub), with its port if any."""
    path: str
    """The repository within the registry (``library/busybox``)."""
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """``domain/path``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What the registry's manifest endpoint is asked for: the digest, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        s = self.repository
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def with_digest(self, digest: str) -> Reference:
        """``repository@digest`` (the tag dropped): the name by which a pull is recorded."""
        return Reference(self.domain, self.path, "", digest)

    def with_tag(self) -> Reference | None:
        """``repository:tag``, or None for a reference by digest only."""
        return Reference(self.domain, self.path, self.tag) if self.tag else None


def parse(ref: str) -> Reference:
    """Normalize ``ref``; InvalidArgument for what is not a reference (upper case in the
    repository, an empty component, a bad tag or digest)."""
    if not ref or ref != ref.strip():
        raise InvalidArgument(f"invalid reference format: {ref!r}")
    name, _, digest = ref.partition("@")
    if digest:
        try:
            digests.parse(digest)
        except Exception:
            raise InvalidArgument(f"invalid reference format: {ref!r}: bad digest {digest!r}") from None
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid reference format: {ref!r}: bad tag {tag!r}")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise InvalidArgument(f"invalid reference format: {ref!r}: bad registry host {first!r}")
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if any(c.isupper() for c in path):
        raise InvalidArgument(f"invalid reference format: {ref!r}: repository name must be lowercase")
    if not all(_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise InvalidArgument(f"invalid reference format: {ref!r}")
    if not tag and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest)
