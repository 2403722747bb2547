"""Digests: the ``algorithm:encoded`` strings that name content (go-digest's rules).

Every digest ketch parses, validates, splits or builds goes through here:

- :func:`parse` checks any digest as go-digest's ``Parse`` does (a lease's content resource,
  an image target, a ``containerd.io/gc.ref.content`` label) and splits it;
- :func:`check_digest` checks the digest of a blob ketch stores: ``sha256:`` + 64 lowercase
  hex, before it names a row or builds a path;
- :func:`sha256_hex` is the hex part of such a digest (the blob's file name), and
  :func:`from_sha256_hex` the digest of a finished ``hashlib.sha256``.

A malformed digest is InvalidArgument with go-digest's words; a well-formed digest of an
algorithm ketch does not store is Unimplemented. A leaf: nothing of ketch but errdefs (and
the Go ``%q`` quoting of :mod:`ketch.identifiers`, itself a leaf over errdefs).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ketch.errdefs import InvalidArgument, Unimplemented
from ketch.identifiers import quote

__all__ = ["SHA256", "Digest", "check_digest", "from_sha256_hex", "parse", "sha256_hex"]

#: the only algorithm ketch hashes and stores blobs under
SHA256 = "sha256"

# go-digest: the grammar of algorithm names, and the hex length of each one it can verify
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*")
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX = re.compile(r"[a-f0-9]+")


class Digest(NamedTuple):
    """A parsed digest."""

    algorithm: str
    """``sha256``, ``sha384`` or ``sha512``."""
    encoded: str
    """The lowercase hex of the hash."""


def parse(s: str) -> Digest:
    """Split ``algorithm:encoded`` after checking it as go-digest's ``Parse`` does.

    InvalidArgument with go-digest's words: ``invalid checksum digest format`` (no colon,
    a bad algorithm name, not lowercase hex), ``unsupported digest algorithm`` (a
    well-formed name go-digest cannot verify), ``invalid checksum digest length``.
    """
    i = s.find(":")
    if i <= 0 or i + 1 == len(s):
        raise InvalidArgument("invalid checksum digest format")
    algorithm, encoded = s[:i], s[i + 1:]
    length = _HEX_LENGTH.get(algorithm)
    if length is None:
        if _ALGORITHM.fullmatch(algorithm) is None:
            raise InvalidArgument("invalid checksum digest format")
        raise InvalidArgument("unsupported digest algorithm")
    if len(encoded) != length:
        raise InvalidArgument("invalid checksum digest length")
    if _LOWER_HEX.fullmatch(encoded) is None:
        raise InvalidArgument("invalid checksum digest format")
    return Digest(algorithm, encoded)


def check_digest(digest: str) -> str:
    """Check the digest of a blob: ``sha256:`` + 64 lowercase hex; returns it unchanged.

    Malformed: InvalidArgument ``invalid content digest "…": <go-digest's words>``; a
    well-formed digest of another algorithm (``sha512:…``): Unimplemented, since ketch
    hashes and stores sha256 only.
    """
    try:
        algorithm = parse(digest).algorithm
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid content digest {quote(digest)}: {exc.message}") from None
    if algorithm != SHA256:
        raise Unimplemented(
            f"content digest {digest}: digest algorithm {algorithm} is not supported, ketch stores sha256 blobs only"
        )
    return digest


def sha256_hex(digest: str) -> str:
    """The hex part of a blob digest, checked by :func:`check_digest` first (so that it is
    safe as a file name)."""
    return check_digest(digest)[len(SHA256) + 1:]


def from_sha256_hex(hexdigest: str) -> str:
    """The digest string of a sha256 given as hex (``hashlib.sha256().hexdigest()``)."""
    return f"{SHA256}:{hexdigest}"
