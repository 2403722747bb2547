"""Event subscriptions that outlive a daemon restart.

When the stream breaks because the daemon went away, the subscription waits for the socket to
answer and subscribes again, as dockerd's libcontainerd does. Whatever happened in between is
not in any stream, so on every reconnect the subscriber *reconciles*: every process it knew to
be running (from the tasks listed when it first subscribed, and /tasks/start and
/tasks/exec-started since) is looked up, and one that has stopped meanwhile gets the /tasks/exit
it missed, made from the daemon's record (its true status and time; a process deleted
meanwhile gets 255, as containerd reports a process it lost). A daemon that re-publishes such
exits itself (ketchd does) would deliver them twice: an exit is delivered once per process,
whichever comes first. Reconciled events carry ``reconciled=True`` and pass the
subscription's filters like any other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ketch import errdefs, filters, timestamps, topics
from ketch.api.containerd.events import task_pb2 as task_events
from ketch.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc

if TYPE_CHECKING:
    from ketch.client._conn import Connection

__all__ = ["Event", "subscribe"]

#: stream errors that mean "the daemon went away", after which the subscription reconnects
RECONNECT = (errdefs.Unavailable, errdefs.Unknown, errdefs.Internal, errdefs.Cancelled)
#: a second reconcile this long after a reconnect catches an exit that raced the new stream
SETTLE = 1.0
#: how many delivered exits are remembered to drop a second copy of one
REMEMBER = 10_000


@dataclass(frozen=True)
class Event:
    """One event: when, in which namespace, its topic, and the payload decoded (None for a
    type this client does not know)."""

    timestamp: float
    namespace: str
    topic: str
    type: str
    event: Any
    reconciled: bool = False

    def fields(self) -> dict[str, Any]:
        """The payload's fields, as containerd names them."""
        if self.event is None:
            return {}
        from google.protobuf import json_format

        fields: dict[str, Any] = json_format.MessageToDict(self.event, preserving_proto_field_name=True)
        return fields

    def as_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "namespace": self.namespace, "topic": self.topic, "type": self.type,
                "event": self.fields(), **({"reconciled": True} if self.reconciled else {})}


def _decode(type_url: str, value: bytes) -> tuple[str, Any]:
    from google.protobuf import symbol_database

    # every event message containerd publishes: registered once imported
    from ketch.api.containerd.events import container_pb2, content_pb2, image_pb2, namespace_pb2  # noqa: F401
    from ketch.api.containerd.events import snapshot_pb2  # noqa: F401

    name = type_url.rsplit("/", 1)[-1]
    try:
        return name, symbol_database.Default().GetSymbol(name).FromString(value)
    except KeyError:
        return name, None


def _adaptor(event: Event) -> filters.Adaptor:
    fields: dict[str, Any] = {"namespace": event.namespace, "topic": event.topic}
    if event.event is not None:
        fields["event"] = {k: v if isinstance(v, (dict, str)) else str(v) for k, v in event.fields().items()}
    return filters.adaptor_for(fields)


Key = tuple[str, str, str]  # namespace, container id, exec id ("" for the init process)


class _Tracker:
    """The processes known to run, and the exits already delivered."""

    def __init__(self) -> None:
        self.running: dict[Key, int] = {}
        self.delivered: collections.OrderedDict[Key, int] = collections.OrderedDict()

    def see(self, e: Event) -> bool:
        """Note ``e``; False if it is an exit delivered already."""
        m = e.event
        if e.topic == "/tasks/start":
            self.running[(e.namespace, m.container_id, "")] = m.pid
        elif e.topic == "/tasks/exec-started":
            self.running[(e.namespace, m.container_id, m.exec_id)] = m.pid
        elif e.topic == "/tasks/exit":
            key = (e.namespace, m.container_id, "" if m.id == m.container_id else m.id)
            self.running.pop(key, None)
            if self.delivered.get(key) == m.pid:
                return False
            self.delivered[key] = m.pid
            while len(self.delivered) > REMEMBER:
                self.delivered.popitem(last=False)
        elif e.topic == "/tasks/delete":
            key = (e.namespace, m.container_id, "" if not m.id or m.id == m.container_id else m.id)
            self.running.pop(key, None)
        return True


async def _namespaces(conn: Connection) -> list[str]:
    r = await conn.call(conn.stub(namespace_pb2_grpc.NamespacesStub).List, namespace_pb2.ListNamespacesRequest())
    return [n.name for n in r.namespaces]


async def _learn_running(conn: Connection, tracker: _Tracker) -> None:
    tasks = conn.stub(tasks_pb2_grpc.TasksStub)
    for ns in await _namespaces(conn):
        r = await conn.call(tasks.List, tasks_pb2.ListTasksRequest(), namespace=ns)
        for p in r.tasks:
            if p.status in (2, 4, 5):  # running, paused, pausing
                tracker.running.setdefault((ns, p.container_id or p.id, ""), p.pid)


async def _reconcile(conn: Connection, tracker: _Tracker) -> list[Event]:
    """The /tasks/exit of every process known to run that has stopped."""
    tasks = conn.stub(tasks_pb2_grpc.TasksStub)
    out = []
    for (ns, cid, exec_id), pid in list(tracker.running.items()):
        try:
            r = await conn.call(tasks.Get, tasks_pb2.GetRequest(container_id=cid, exec_id=exec_id), namespace=ns)
        except errdefs.NotFound:
            status, exited = 255, None
        else:
            if r.process.status != 3:  # not stopped
                continue
            status = r.process.exit_status
            exited = r.process.exited_at if r.process.HasField("exited_at") else None
        exit = task_events.TaskExit(container_id=cid, id=exec_id or cid, pid=pid, exit_status=status)
        if exited is not None:
            exit.exited_at.CopyFrom(exited)
        when = timestamps.seconds(exited) if exited is not None else asyncio.get_running_loop().time()
        out.append(Event(when, ns, topics.of(exit), exit.DESCRIPTOR.full_name, exit, reconciled=True))
    return out


async def subscribe(conn: Connection, filter_strings: Sequence[str], *, reconnect: bool = True) -> AsyncIterator[Event]:
    """Events matching ``filter_strings`` (containerd's syntax), until the caller stops.
    Without ``reconnect``, a broken stream ends the iteration with its error."""
    wanted = filters.parse(list(filter_strings)) if filter_strings else filters.ALWAYS
    stub = conn.stub(events_pb2_grpc.EventsStub)
    request = events_pb2.SubscribeRequest(filters=list(filter_strings))
    tracker = _Tracker()
    queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
    helpers: set[asyncio.Task[None]] = set()

    async def reconcile(delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        for e in await _reconcile(conn, tracker):
            queue.put_nowait(e)

    async def reconcile_later() -> None:
        with contextlib.suppress(*RECONNECT):
            await reconcile(SETTLE)  # a second outage is the next reconnect's to handle

    async def pump() -> None:
        first, answered = True, False
        while True:
            stream = conn.stream(stub.Subscribe, request, wait_for_ready=not first)
            try:
                if reconnect and first:
                    await _learn_running(conn, tracker)
                    answered = True
                elif reconnect:
                    await reconcile()
                    helper = asyncio.ensure_future(reconcile_later())
                    helpers.add(helper)
                    helper.add_done_callback(helpers.discard)
                first = False
                async for envelope in stream:
                    name, message = _decode(envelope.event.type_url, envelope.event.value)
                    queue.put_nowait(Event(timestamps.seconds(envelope.timestamp), envelope.namespace,
                                           envelope.topic, name, message))
                if not reconnect:
                    queue.put_nowait(None)
                    return
            except RECONNECT as err:
                if not reconnect or not answered:  # never reached: say so
                    queue.put_nowait(err)
                    return
            except BaseException as err:
                queue.put_nowait(err)
                raise
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)

    pumping = asyncio.ensure_future(pump())
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item.event is None or (tracker.see(item) and (not item.reconciled or wanted.match(_adaptor(item)))):
                yield item
    finally:
        for t in (pumping, *helpers):
            t.cancel()
        await asyncio.gather(pumping, *helpers, return_exceptions=True)
