"""Time on the wire: ketch keeps times as float seconds since the epoch; protobuf carries
``google.protobuf.Timestamp`` (seconds + nanos). The two conversions live here and nowhere else.

A leaf: nothing imported at module level, so the shim's light paths may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from google.protobuf import timestamp_pb2

__all__ = ["seconds", "stamp", "timestamp"]

_NANOS = 1_000_000_000


class _Stamp(Protocol):
    seconds: int
    nanos: int


def stamp(out: _Stamp, t: float) -> None:
    """Set the Timestamp ``out`` to ``t`` (float seconds; nanos always in [0, 1e9))."""
    out.seconds, out.nanos = divmod(round(t * _NANOS), _NANOS)


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    """A new Timestamp for ``t``."""
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    stamp(ts, t)
    return ts


def seconds(ts: _Stamp) -> float:
    """The float seconds a Timestamp holds."""
    return ts.seconds + ts.nanos / _NANOS
