"""Validation of the names that become paths: container ids, namespaces, topic components.

The rules are containerd's (``identifiers/validate.go``): a non-empty string of at most 76
bytes, made of ASCII letters and digits, where single ``.``, ``_`` or ``-`` may separate runs of
letters and digits. Such a name is safe as one path component: no ``/``, no ``..``, no
leading dot or dash. Call :func:`validate` before any path is built from a name.

This is a leaf module: it imports nothing of ketch but :mod:`ketch.errdefs`.
"""

from __future__ import annotations

import re

from ketch.errdefs import FailedPrecondition, InvalidArgument

__all__ = ["GRPC_NAMESPACE_KEY", "MAX_LENGTH", "PATTERN", "TTRPC_NAMESPACE_KEY", "quote", "validate"]

#: the request metadata key that names the namespace of a call, on gRPC and on ttrpc
GRPC_NAMESPACE_KEY = "containerd-namespace"
TTRPC_NAMESPACE_KEY = "containerd-namespace-ttrpc"

#: longest identifier accepted, in bytes (containerd's limit)
MAX_LENGTH = 76

#: the pattern a valid identifier matches, as containerd prints it in its error messages
PATTERN = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"

# ``$`` in Python also matches before a final newline; fullmatch does not, so "a\n" is refused.
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*")

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
            "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def quote(s: str) -> str:
    """``s`` in double quotes with escapes, as Go's ``%q`` prints it in containerd's messages."""
    out = ['"']
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def validate(s: str) -> None:
    """Raise :class:`~ketch.errdefs.InvalidArgument` unless ``s`` is a valid identifier."""
    if not s:
        raise InvalidArgument("identifier must not be empty")
    if len(s.encode("utf-8", "surrogateescape")) > MAX_LENGTH:
        raise InvalidArgument(f"identifier {quote(s)} greater than maximum length ({MAX_LENGTH} characters)")
    if _IDENTIFIER.fullmatch(s) is None:
        raise InvalidArgument(f"identifier {quote(s)} must match {PATTERN}")


def require_namespace(namespace: str) -> str:
    """containerd's NamespaceRequired: a namespaced call must name a valid namespace.
    FailedPrecondition when there is none, InvalidArgument when it is not an identifier."""
    if not namespace:
        raise FailedPrecondition("namespace is required")
    try:
        validate(namespace)
    except InvalidArgument as exc:
        raise InvalidArgument(f"namespace validation: {exc.message}") from None
    return namespace
