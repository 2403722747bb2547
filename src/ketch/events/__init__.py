"""Events: the daemon's exchange (publish, forward, subscribe with containerd filters).

No grpc here: servicers turn :class:`Envelope` into ``containerd.services.events.v1.Envelope``.
"""

from __future__ import annotations

from ketch.events._decode import decode_protobuf
from ketch.events._exchange import (
    DEFAULT_QUEUE_SIZE,
    Decoder,
    Envelope,
    Exchange,
    Subscription,
    envelope_adaptor,
    validate_topic,
)

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "Decoder",
    "Envelope",
    "Exchange",
    "Subscription",
    "decode_protobuf",
    "envelope_adaptor",
    "validate_topic",
]
