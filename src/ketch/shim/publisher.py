"""Task events from the shim to the daemon: Events.Forward over ttrpc at TTRPC_ADDRESS.

One worker sends events in the order they were queued. While the daemon cannot be reached
(restarting, or down for any length of time) the event at the head is retried with a growing
pause (up to RETRY_MAX) over a fresh connection, and nothing behind it is lost or reordered:
a /tasks/exit that happened during a daemon outage is delivered when the daemon is back. An
event the daemon answers with an error is dropped with a log line (resending cannot help). A
resend after an answer lost in a daemon crash is dropped by the daemon (see
``TaskManager.first_publication``). ``flush`` waits for the queue to empty, so the shim can
exit without losing /tasks/delete.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import empty_pb2
from google.protobuf import message as _message

from ketch import errdefs, identifiers, timestamps, topics, ttrpc
from ketch.api.containerd.services.ttrpc.events.v1 import events_pb2

log = logging.getLogger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
CALL_TIMEOUT = 5.0
#: the longest pause between two tries to reach the daemon
RETRY_MAX = 1.0
#: how often a daemon outage is logged again
LOG_EVERY = 30.0
QUEUE_MAX = 2048



class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.ForwardRequest] = asyncio.Queue(QUEUE_MAX)
        self._client: ttrpc.Client | None = None
        self._worker: asyncio.Task[None] | None = None

    def publish(self, event: _message.Message) -> None:
        """Queue ``event`` (a containerd.events message); never blocks, never raises."""
        req = events_pb2.ForwardRequest()
        env = req.envelope
        timestamps.stamp(env.timestamp, time.time())
        env.namespace = self.namespace
        env.topic = topics.of(event)
        env.event.type_url = event.DESCRIPTOR.full_name
        env.event.value = event.SerializeToString()
        if not self.address:
            log.debug("no TTRPC_ADDRESS; dropping %s", env.topic)
            return
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            log.error("event queue full; dropping %s", env.topic)
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            try:
                await self._send(req)
            finally:
                self._queue.task_done()

    async def _send(self, req: events_pb2.ForwardRequest) -> None:
        pause, logged = 0.05, 0.0
        while True:
            try:
                if self._client is None or self._client.closed:
                    self._client = await ttrpc.connect(self.address, timeout=CALL_TIMEOUT)
                await self._client.call(
                    SERVICE, "Forward", req, empty_pb2.Empty, timeout=CALL_TIMEOUT,
                    metadata={identifiers.TTRPC_NAMESPACE_KEY: self.namespace},
                )
                if logged:
                    log.info("the daemon is back: forwarded %s", req.envelope.topic)
                return
            except (errdefs.Unavailable, errdefs.DeadlineExceeded) as e:
                # no daemon, or no answer: keep the event
                now = time.monotonic()
                if now - logged >= LOG_EVERY:
                    log.warning("cannot forward %s yet, retrying: %s", req.envelope.topic, e)
                    logged = now
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
            except errdefs.KetchError as e:
                log.error("the daemon refused event %s: %s", req.envelope.topic, e)
                return

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued event was sent or given up."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.error("%d events not delivered before exit", self._queue.qsize())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self._client is not None:
            await self._client.close()

