"""The shim template's wire format (see ``ketch.shim.template``), a leaf: the shim's light
``start`` path and ketchd's runtime (which may not import the shim) both speak it.

One message per connection each way::

    "KTP1" | length u32 big-endian | fields: UTF-8 strings joined by NUL (none may contain NUL)
"""

from __future__ import annotations

import struct

MAGIC = b"KTP1"
HEADER = struct.Struct(">4sI")
MESSAGE_MAX = 1 << 20
#: how long a client waits for a template before it does without
TIMEOUT = 1.0


class TemplateError(Exception):
    """The template refused, or could not be reached or understood."""


class Refused(TemplateError):
    """The template answered, with an error."""


def encode(fields: list[str]) -> bytes:
    for f in fields:
        if "\0" in f:
            raise ValueError(f"field {f[:40]!r} contains NUL")
    body = "\0".join(fields).encode("utf-8", "surrogateescape")
    if len(body) > MESSAGE_MAX:
        raise ValueError(f"message of {len(body)} bytes is over {MESSAGE_MAX}")
    return HEADER.pack(MAGIC, len(body)) + body


def decode_header(header: bytes) -> int:
    """The body length announced by a message's first 8 bytes."""
    magic, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise TemplateError(f"not a template message (magic {magic!r})")
    if length > MESSAGE_MAX:
        raise TemplateError(f"message of {length} bytes is over {MESSAGE_MAX}")
    return int(length)


def decode_body(body: bytes) -> list[str]:
    return body.decode("utf-8", "surrogateescape").split("\0") if body else []


def call_fields(cwd: str, umask: int, args: list[str], env: dict[str, str]) -> list[str]:
    """What a process to make needs: cwd, umask, arguments and environment, as fields."""
    return [cwd, f"{umask:o}", str(len(args)), *args, *(f"{k}={v}" for k, v in env.items())]


def parse_call(fields: list[str]) -> tuple[str, int, list[str], dict[str, str]]:
    """(cwd, umask, args, env) from the fields :func:`call_fields` made."""
    try:
        cwd, umask, argc = fields[0], int(fields[1], 8), int(fields[2])
    except (IndexError, ValueError):
        raise TemplateError("malformed request") from None
    if argc < 0 or 3 + argc > len(fields) or not cwd:
        raise TemplateError("malformed request")
    args = fields[3:3 + argc]
    env: dict[str, str] = {}
    for entry in fields[3 + argc:]:
        key, eq, value = entry.partition("=")
        if not eq or not key:
            raise TemplateError(f"malformed environment entry {entry[:40]!r}")
        env[key] = value
    return cwd, umask, args, env


def start_request(argv: list[str], env: dict[str, str], cwd: str, umask: int, options: bytes) -> list[str]:
    """Run the shim's ``start`` (``argv``: its flags and ``start``) as if exec'd in ``cwd`` with
    ``env`` and ``options`` on stdin; the answer is ``ok ADDRESS``."""
    return ["start", options.hex(), *call_fields(cwd, umask, argv, env)]


def answer(fields: list[str]) -> str:
    """The value of an ``ok VALUE`` answer; raises Refused for anything else."""
    if len(fields) == 2 and fields[0] == "ok" and fields[1]:
        return fields[1]
    raise Refused(" ".join(fields[1:]) or "no answer")
