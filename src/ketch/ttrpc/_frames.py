"""The ttrpc frame: every number of the wire format, named once.

A ttrpc connection is a sequence of frames in both directions. Each frame is a fixed
10-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       4     length     payload bytes after the header (big-endian u32)
    4       4     stream id  pairs a response with its request (big-endian u32)
    8       1     type       see FrameType
    9       1     flags      reserved in ttrpc v1.1 (streaming bits from v1.2)

The payload of a request frame is a protobuf ``ttrpc.Request``; of a response frame, a
``ttrpc.Response``. Clients number their streams 1, 3, 5, ...; the answer to a request
reuses its stream id. A receiver refuses any payload longer than MESSAGE_LENGTH_MAX.

containerd 1.6 pins ttrpc v1.1.1, which knows only unary calls (types 1 and 2, flags 0).
The data type and the flags of v1.2 are named here so that nothing else has to spell them
out, but this package never sends them.

Everything in this module is pure: no state, no IO.
"""

from __future__ import annotations

import enum
import struct

from ._errors import LocalProtocolError

#: bytes in a frame header
HEADER_LENGTH = 10
#: largest payload a peer accepts (ttrpc's ``messageLengthMax``, 4 MiB)
MESSAGE_LENGTH_MAX = 4 << 20
#: largest stream id the 32-bit header field holds
STREAM_ID_MAX = 0xFFFF_FFFF


class FrameType(enum.IntEnum):
    REQUEST = 1  #: a ttrpc.Request, client to server
    RESPONSE = 2  #: a ttrpc.Response, server to client
    DATA = 3  #: a stream data frame (ttrpc v1.2+; ignored by v1.1 peers)


#: flag bits of ttrpc v1.2 streams; v1.1 sends 0 and ignores them
FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4

_HEADER = struct.Struct(">IIBB")
assert _HEADER.size == HEADER_LENGTH


def encode_header(length: int, stream_id: int, frame_type: int, flags: int = 0) -> bytes:
    """The 10 header bytes for a frame; raises LocalProtocolError if a field is out of range."""
    try:
        return _HEADER.pack(length, stream_id, frame_type, flags)
    except struct.error as exc:
        raise LocalProtocolError(
            f"cannot encode frame header (length={length}, stream={stream_id}, "
            f"type={frame_type}, flags={flags}): {exc}"
        ) from None


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """``(length, stream_id, frame_type, flags)`` from the 10 bytes at ``offset`` of ``data``.

    The type is returned as a plain int, since a peer may send types this module does not
    know. Raises LocalProtocolError if fewer than 10 bytes are there.
    """
    try:
        length, stream_id, frame_type, flags = _HEADER.unpack_from(data, offset)
    except struct.error:
        raise LocalProtocolError(
            f"a frame header needs {HEADER_LENGTH} bytes, got {max(len(data) - offset, 0)}"
        ) from None
    return length, stream_id, frame_type, flags


def encode_frame(stream_id: int, frame_type: int, payload: bytes) -> bytes:
    """Header and payload of one frame, ready to write."""
    return encode_header(len(payload), stream_id, frame_type) + payload
