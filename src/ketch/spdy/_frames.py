"""SPDY/3.1 frames (https://www.chromium.org/spdy/spdy-protocol/spdy-protocol-draft3-1/): their
encoding and decoding, and the zlib-compressed header blocks.

A frame is 8 bytes of header then its payload. A control frame's header: 1 bit set, 15 bits
of version (3), 16 bits of type, 8 bits of flags, 24 bits of length. A data frame's: 1 bit
clear, 31 bits of stream id, 8 bits of flags, 24 bits of length.

Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are ``count, (name length, name, value
length, value)*`` with 32-bit big-endian numbers, compressed with one zlib stream per
direction for the whole connection, primed with SPDY/3's dictionary (:data:`DICTIONARY`) and
flushed with Z_SYNC_FLUSH at each block's end. Several values of one name are joined by NUL.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Union

__all__ = ["VERSION", "DICTIONARY", "FLAG_FIN", "FLAG_UNIDIRECTIONAL", "DataFrame", "SynStream", "SynReply",
           "RstStream", "Settings", "Ping", "GoAway", "Headers", "WindowUpdate", "Frame", "FrameError",
           "HeaderCompressor", "HeaderDecompressor", "encode", "parse", "HEADER_SIZE", "MAX_LENGTH",
           "RST_PROTOCOL_ERROR", "RST_INVALID_STREAM", "RST_REFUSED_STREAM", "RST_CANCEL", "RST_INTERNAL_ERROR",
           "RST_FLOW_CONTROL_ERROR", "RST_STREAM_IN_USE", "RST_STREAM_ALREADY_CLOSED", "GOAWAY_OK",
           "GOAWAY_PROTOCOL_ERROR", "SETTINGS_INITIAL_WINDOW_SIZE"]

VERSION = 3
HEADER_SIZE = 8
MAX_LENGTH = 0xFFFFFF

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9

RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6
RST_FLOW_CONTROL_ERROR = 7
RST_STREAM_IN_USE = 8
RST_STREAM_ALREADY_CLOSED = 9

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

SETTINGS_INITIAL_WINDOW_SIZE = 7

# SPDY/3's header dictionary (draft 3, section 2.6.10.1): length-prefixed words, then a run of
# status codes, reason phrases, dates and media types as one string.
_WORDS = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
          "accept-ranges age allow authorization cache-control connection content-base content-encoding "
          "content-language content-length content-location content-md5 content-range content-type date "
          "etag expect expires from host if-match if-modified-since if-none-match if-range "
          "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
          "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
          "user-agent vary via warning www-authenticate method get status 200 OK version HTTP/1.1 url "
          "public set-cookie keep-alive origin")
_TAIL = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
         "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
         "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
         "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
         "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
         "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")


def _dictionary() -> bytes:
    words = _WORDS.replace("200 OK", "200\x00OK").split(" ")
    out = b"".join(struct.pack(">I", len(w)) + w.replace("\x00", " ").encode() for w in words)
    return out + _TAIL.encode()


DICTIONARY = _dictionary()


class FrameError(Exception):
    """The peer sent something that is not SPDY/3.1; the connection cannot go on."""


@dataclass
class DataFrame:
    stream_id: int
    data: bytes = b""
    flags: int = 0


@dataclass
class SynStream:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0
    associated_id: int = 0
    priority: int = 0
    slot: int = 0


@dataclass
class SynReply:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0


@dataclass
class RstStream:
    stream_id: int
    status: int
    flags: int = 0


@dataclass
class Settings:
    entries: list[tuple[int, int, int]] = field(default_factory=list)
    """(flags, id, value) of each setting."""
    flags: int = 0


@dataclass
class Ping:
    id: int
    flags: int = 0


@dataclass
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK
    flags: int = 0


@dataclass
class Headers:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0


@dataclass
class WindowUpdate:
    stream_id: int
    delta: int
    flags: int = 0


Frame = Union[DataFrame, SynStream, SynReply, RstStream, Settings, Ping, GoAway, Headers, WindowUpdate]


class HeaderCompressor:
    """One direction's header compression (one zlib stream for the connection's life)."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, zlib.MAX_WBITS, zdict=DICTIONARY)

    def compress(self, headers: dict[str, str]) -> bytes:
        block = [struct.pack(">I", len(headers))]
        for name, value in headers.items():
            n, v = name.lower().encode(), value.encode()
            block += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
        return self._z.compress(b"".join(block)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self) -> None:
        self._z = zlib.decompressobj(zlib.MAX_WBITS, zdict=DICTIONARY)

    def decompress(self, data: bytes) -> dict[str, str]:
        try:
            raw = self._z.decompress(data)
        except zlib.error as e:
            raise FrameError(f"header block: {e}") from None
        try:
            (count,), pos = struct.unpack_from(">I", raw), 4
            headers: dict[str, str] = {}
            for _ in range(count):
                (n,) = struct.unpack_from(">I", raw, pos)
                name = raw[pos + 4:pos + 4 + n].decode()
                pos += 4 + n
                (v,) = struct.unpack_from(">I", raw, pos)
                value = raw[pos + 4:pos + 4 + v].decode()
                pos += 4 + v
                if pos > len(raw):
                    raise FrameError("header block truncated")
                name = name.lower()
                headers[name] = f"{headers[name]}\x00{value}" if name in headers else value
        except (struct.error, UnicodeDecodeError) as e:
            raise FrameError(f"header block: {e}") from None
        return headers


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError("frame too long")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload


def encode(frame: Frame, compressor: HeaderCompressor) -> bytes:
    """The bytes of ``frame``; header blocks go through ``compressor`` (whose state moves on)."""
    if isinstance(frame, DataFrame):
        if len(frame.data) > MAX_LENGTH:
            raise ValueError("frame too long")
        return struct.pack(">II", frame.stream_id & 0x7FFFFFFF, frame.flags << 24 | len(frame.data)) + frame.data
    if isinstance(frame, SynStream):
        return _control(SYN_STREAM, frame.flags, struct.pack(">IIBB", frame.stream_id, frame.associated_id,
                                                             (frame.priority & 7) << 5, frame.slot)
                        + compressor.compress(frame.headers))
    if isinstance(frame, SynReply):
        return _control(SYN_REPLY, frame.flags, struct.pack(">I", frame.stream_id) + compressor.compress(frame.headers))
    if isinstance(frame, Headers):
        return _control(HEADERS, frame.flags, struct.pack(">I", frame.stream_id) + compressor.compress(frame.headers))
    if isinstance(frame, RstStream):
        return _control(RST_STREAM, frame.flags, struct.pack(">II", frame.stream_id, frame.status))
    if isinstance(frame, Settings):
        body = struct.pack(">I", len(frame.entries)) + b"".join(
            struct.pack(">II", flags << 24 | id, value) for flags, id, value in frame.entries)
        return _control(SETTINGS, frame.flags, body)
    if isinstance(frame, Ping):
        return _control(PING, frame.flags, struct.pack(">I", frame.id))
    if isinstance(frame, GoAway):
        return _control(GOAWAY, frame.flags, struct.pack(">II", frame.last_good_stream_id, frame.status))
    return _control(WINDOW_UPDATE, frame.flags, struct.pack(">II", frame.stream_id, frame.delta))


def parse(buf: bytes | bytearray, decompressor: HeaderDecompressor) -> tuple[Frame | None, int]:
    """The first frame in ``buf`` and how many bytes it took; (None, 0) when ``buf`` holds
    less than one frame. A control frame of a type SPDY/3 does not define is skipped:
    (None, its size)."""
    if len(buf) < HEADER_SIZE:
        return None, 0
    first, second = struct.unpack_from(">II", buf)
    flags, length = second >> 24, second & MAX_LENGTH
    if len(buf) < HEADER_SIZE + length:
        return None, 0
    body = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
    size = HEADER_SIZE + length
    if not first & 0x80000000:
        return DataFrame(first & 0x7FFFFFFF, body, flags), size
    version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
    if version != VERSION:
        raise FrameError(f"SPDY version {version} is not spoken here (only {VERSION})")
    try:
        if kind == SYN_STREAM:
            sid, assoc, prio, slot = struct.unpack_from(">IIBB", body)
            return SynStream(sid & 0x7FFFFFFF, decompressor.decompress(body[10:]), flags, assoc & 0x7FFFFFFF,
                             prio >> 5, slot), size
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from(">I", body)
            cls = SynReply if kind == SYN_REPLY else Headers
            return cls(sid & 0x7FFFFFFF, decompressor.decompress(body[4:]), flags), size
        if kind == RST_STREAM:
            sid, status = struct.unpack_from(">II", body)
            return RstStream(sid & 0x7FFFFFFF, status, flags), size
        if kind == SETTINGS:
            (count,) = struct.unpack_from(">I", body)
            entries = []
            for i in range(count):
                head, value = struct.unpack_from(">II", body, 4 + 8 * i)
                entries.append((head >> 24, head & 0xFFFFFF, value))
            return Settings(entries, flags), size
        if kind == PING:
            return Ping(struct.unpack_from(">I", body)[0], flags), size
        if kind == GOAWAY:
            last, status = struct.unpack_from(">II", body) if len(body) >= 8 else (*struct.unpack_from(">I", body), 0)
            return GoAway(last & 0x7FFFFFFF, status, flags), size
        if kind == WINDOW_UPDATE:
            sid, delta = struct.unpack_from(">II", body)
            return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF, flags), size
    except struct.error as e:
        raise FrameError(f"control frame of type {kind} too short: {e}") from None
    return None, size
