"""identifiers.validate: the names that become paths."""

from __future__ import annotations

import pytest

from ketch import errdefs, identifiers

VALID = [
    "default",
    "Default",
    "k8s.io",
    "moby",
    "a",
    "0",
    "a.b",
    "a_b",
    "a-b",
    "foo.0",
    "foo-bar_baz.qux",
    "io.containerd.runc.v2",
    "0ad6d8f1c3a2b4e5",
    "a" * 76,
    "A-1.b_2",
]

INVALID = [
    "",
    "../x",
    "..",
    ".",
    "a/b",
    "/a",
    "foo/..",
    "a" * 77,
    "-a",
    "a-",
    ".a",
    "a.",
    "_a",
    "a__b",
    "a..b",
    "a.-b",
    "a b",
    " a",
    "a\n",
    "a\x00",
    "ä",
    "a:b",
    "a@b",
    "foo\\bar",
]


@pytest.mark.parametrize("name", VALID)
def test_valid(name: str) -> None:
    identifiers.validate(name)


@pytest.mark.parametrize("name", INVALID)
def test_invalid(name: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        identifiers.validate(name)


def test_messages_read_like_containerd() -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        identifiers.validate("../x")
    assert str(info.value) == (
        'identifier "../x" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: invalid argument'
    )
    with pytest.raises(errdefs.InvalidArgument) as info:
        identifiers.validate("a" * 77)
    assert str(info.value) == f'identifier "{"a" * 77}" greater than maximum length (76 characters): invalid argument'
    with pytest.raises(errdefs.InvalidArgument) as info:
        identifiers.validate("")
    assert str(info.value) == "identifier must not be empty: invalid argument"


def test_length_counts_bytes() -> None:
    # 40 characters but 80 bytes: over the limit, as in Go where len() counts bytes
    with pytest.raises(errdefs.InvalidArgument, match="greater than maximum length"):
        identifiers.validate("é" * 40)


def test_quote_escapes_like_go() -> None:
    assert identifiers.quote('a"b\\c\n\x01é') == '"a\\"b\\\\c\\n\\x01é"'
