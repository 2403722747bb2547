"""ketch.digests: go-digest's rules for any digest, sha256 only for blobs."""

from __future__ import annotations

import hashlib

import pytest

from ketch import digests, errdefs

HEX = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("s, algorithm, encoded", [
    (f"sha256:{HEX}", "sha256", HEX),
    ("sha384:" + "a" * 96, "sha384", "a" * 96),
    ("sha512:" + "0" * 128, "sha512", "0" * 128),
])
def test_parse_valid(s: str, algorithm: str, encoded: str) -> None:
    assert digests.parse(s) == digests.Digest(algorithm, encoded)


@pytest.mark.parametrize("s, words", [
    ("", "invalid checksum digest format"),
    ("abc", "invalid checksum digest format"),
    (":" + HEX, "invalid checksum digest format"),
    ("sha256:", "invalid checksum digest format"),
    ("sha256:abc", "invalid checksum digest length"),
    ("sha256:" + "AB" * 32, "invalid checksum digest format"),
    ("sha256:" + "0" * 63 + "/", "invalid checksum digest format"),
    ("md5:" + "a" * 32, "unsupported digest algorithm"),
    ("SHA256:" + HEX, "invalid checksum digest format"),
    ("sha256:../../etc/passwd", "invalid checksum digest length"),
])
def test_parse_invalid(s: str, words: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        digests.parse(s)
    assert info.value.message == words


def test_check_digest_is_sha256_only() -> None:
    d = f"sha256:{HEX}"
    assert digests.check_digest(d) == d
    assert digests.sha256_hex(d) == HEX
    assert digests.from_sha256_hex(HEX) == d
    with pytest.raises(errdefs.InvalidArgument) as info:
        digests.check_digest("sha256:abc\n")
    assert info.value.message == 'invalid content digest "sha256:abc\\n": invalid checksum digest length'
    with pytest.raises(errdefs.Unimplemented, match="sha256 blobs only"):
        digests.check_digest("sha512:" + "ab" * 64)
    with pytest.raises(errdefs.InvalidArgument):
        digests.sha256_hex("sha256:../x")
