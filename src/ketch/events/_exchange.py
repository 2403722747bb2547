"""The daemon's event exchange: publish, forward, and subscribe with containerd filters.

Behaviour follows containerd 1.6 ``events/exchange/exchange.go``: topics and namespaces are
validated the same way and with the same words, a subscription sees the events published
after it was made, in order, that match any of its filters, with the fields ``namespace``,
``topic`` and ``event.<field>``.

One deliberate difference: containerd gives each subscriber an unbounded queue. Here a
subscriber holds at most ``queue_size`` undelivered events; when it falls further behind it is
dropped, it receives what was queued, and then its iteration raises
:class:`~ketch.errdefs.ResourceExhausted`. Publishers never wait for a subscriber.

Everything runs on the event loop's thread: :meth:`Exchange.publish` and
:meth:`Exchange.forward` are plain (non-blocking) methods to call from that thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ketch import filters as _filters
from ketch import identifiers
from ketch.errdefs import FailedPrecondition, InvalidArgument, KetchError, ResourceExhausted
from ketch.identifiers import quote

__all__ = ["DEFAULT_QUEUE_SIZE", "Decoder", "Envelope", "Exchange", "Subscription", "envelope_adaptor", "validate_topic"]

log = logging.getLogger(__name__)

#: undelivered events a subscriber may hold before it is dropped
DEFAULT_QUEUE_SIZE = 1024

#: (type_url, value) → the event's fields by proto field name, or None when it cannot be decoded
Decoder = Callable[[str, bytes], Mapping[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as it travels: when, where, what, and the serialized payload (an Any)."""

    timestamp: float
    """Seconds since the epoch, UTC; set by the first publisher. 0 means unset."""
    namespace: str
    """The namespace the event belongs to."""
    topic: str
    """``/``-separated identifiers, e.g. ``/tasks/exit``."""
    type_url: str
    """The payload's message name, e.g. ``containerd.events.TaskExit``."""
    value: bytes
    """The serialized payload."""


def validate_topic(topic: str) -> None:
    """Raise InvalidArgument unless ``topic`` is ``/`` followed by ``/``-separated identifiers."""
    try:
        if topic == "":
            raise InvalidArgument("must not be empty")
        if topic[0] != "/":
            raise InvalidArgument("must start with '/'")
        if len(topic) == 1:
            raise InvalidArgument("must have at least one component")
        for component in topic[1:].split("/"):
            try:
                identifiers.validate(component)
            except InvalidArgument as exc:
                raise InvalidArgument(f"failed validation on component {quote(component)}: {exc.message}") from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"envelope topic {quote(topic)}: {exc.message}") from None


def envelope_adaptor(envelope: Envelope, decoder: Decoder | None = None) -> _filters.Adaptor:
    """The filter fields of an envelope: ``namespace``, ``topic``, and ``event.<field>`` when a
    decoder is given (decoded at most once, and only if a filter asks)."""

    def decode() -> Mapping[str, Any] | None:
        if decoder is None:
            return None
        try:
            return decoder(envelope.type_url, envelope.value)
        except Exception:  # an undecodable payload has no fields, as in containerd
            return None

    return _filters.adaptor_for({"namespace": envelope.namespace, "topic": envelope.topic, "event": decode})


class Subscription:
    """A stream of envelopes: ``async for envelope in subscription``. Made by :meth:`Exchange.subscribe`.

    It receives every matching event published after it was made. :meth:`close` (or leaving an
    ``async with`` block) ends it; if the exchange drops it for falling behind, iteration
    yields what was queued and then raises ResourceExhausted.
    """

    def __init__(self, exchange: Exchange, filter: _filters.Filter, limit: int) -> None:
        self._exchange = exchange
        self._filter = filter
        self._limit = limit
        self._queue: collections.deque[Envelope] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: KetchError | None = None

    @property
    def closed(self) -> bool:
        """True once the subscription takes no more events."""
        return self._closed

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _offer(self, envelope: Envelope, adaptor: _filters.Adaptor) -> bool:
        """Queue ``envelope`` if it matches; False when this subscriber must be dropped."""
        if not self._filter.match(adaptor):
            return True
        if len(self._queue) >= self._limit:
            self._closed = True
            self._error = ResourceExhausted(
                f"event subscriber fell behind: more than {self._limit} events undelivered"
            )
            self._wake()
            return False
        self._queue.append(envelope)
        self._wake()
        return True

    def close(self) -> None:
        """End the subscription now; undelivered events are discarded. Idempotent."""
        self._exchange._remove(self)
        self._closed = True
        self._queue.clear()
        self._error = None
        self._wake()

    async def aclose(self) -> None:
        """Same as :meth:`close`, for ``contextlib.aclosing`` and friends."""
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Envelope:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Exchange:
    """Broadcasts envelopes to subscribers; see the module docstring."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, decoder: Decoder | None = None) -> None:
        """``queue_size`` bounds each subscriber's backlog; ``decoder`` enables ``event.*`` filters."""
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue_size = queue_size
        self._decoder = decoder
        self._subscribers: list[Subscription] = []
        #: envelopes published while held (see :meth:`hold`), in order; None when open
        self._held: list[Envelope] | None = None
        #: asked of every forwarded envelope: False drops it (a duplicate of one already
        #: broadcast, say); exceptions refuse the forward
        self.accept: Callable[[Envelope], bool] | None = None
        #: events published or forwarded, by topic (for ketchd's metrics)
        self.published: collections.Counter[str] = collections.Counter()
        #: events not delivered, by why: "duplicate" (a forwarded event already published),
        #: "subscriber_behind" (the one that overflowed a subscriber's queue, which is dropped)
        self.dropped: collections.Counter[str] = collections.Counter()

    def hold(self) -> None:
        """Keep what is published from now on until :meth:`release`. The daemon holds its
        exchange while it starts: events that shims forward (or that reloading produces)
        then, reach the clients that resubscribe once the API serves again."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Broadcast everything held, in order, and stop holding."""
        held, self._held = self._held, None
        for envelope in held or ():
            self._broadcast(envelope)

    @property
    def subscribers(self) -> int:
        """How many subscriptions are live."""
        return len(self._subscribers)

    def publish(self, namespace: str, topic: str, type_url: str, value: bytes) -> Envelope:
        """Stamp and broadcast a new event as its first publisher; returns the envelope."""
        if not namespace:
            raise FailedPrecondition("failed publishing event: namespace is required")
        try:
            identifiers.validate(namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"failed publishing event: namespace validation: {exc.message}") from None
        validate_topic(topic)
        envelope = Envelope(time.time(), namespace, topic, type_url, value)
        self.published[topic] += 1
        self._broadcast(envelope)
        return envelope

    def forward(self, envelope: Envelope) -> None:
        """Broadcast an envelope made elsewhere (a shim's event), keeping its timestamp."""
        try:
            identifiers.validate(envelope.namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"event envelope has invalid namespace: {exc.message}") from None
        validate_topic(envelope.topic)
        if envelope.timestamp <= 0:
            raise InvalidArgument("timestamp must be set on forwarded event")
        if self.accept is not None and not self.accept(envelope):
            log.info("dropped a forwarded event already published", extra={"topic": envelope.topic,
                                                                          "namespace": envelope.namespace})
            self.dropped["duplicate"] += 1
            return
        self.published[envelope.topic] += 1
        self._broadcast(envelope)

    def subscribe(self, filters: Sequence[str] = ()) -> Subscription:
        """A new subscription to events matching any of ``filters`` (all events if none).

        It is registered before this returns, so nothing published afterwards is missed.
        Bad filters raise InvalidArgument.
        """
        try:
            parsed = _filters.parse(list(filters))
        except InvalidArgument as exc:
            raise InvalidArgument(f"failed parsing subscription filters: {exc.message}") from None
        subscription = Subscription(self, parsed, self._queue_size)
        self._subscribers.append(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        try:
            self._subscribers.remove(subscription)
        except ValueError:
            pass

    def _broadcast(self, envelope: Envelope) -> None:
        if self._held is not None:
            self._held.append(envelope)
            return
        adaptor = envelope_adaptor(envelope, self._decoder)
        for subscription in tuple(self._subscribers):
            if not subscription._offer(envelope, adaptor):
                self._remove(subscription)
                self.dropped["subscriber_behind"] += 1
                log.warning(
                    "dropped an event subscriber that fell behind",
                    extra={"topic": envelope.topic, "namespace": envelope.namespace, "limit": self._queue_size},
                )
