"""ketch.events: the exchange, on a real event loop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pytest

from ketch import errdefs
from ketch.events import Envelope, Exchange, Subscription, validate_topic

T = TypeVar("T")
EXIT = "containerd.events.TaskExit"


def run(test: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body on a fresh loop, with a safety timeout."""

    async def main() -> T:
        async with asyncio.timeout(5):
            return await test()

    return asyncio.run(main())


async def take(sub: Subscription, n: int) -> list[Envelope]:
    return [await anext(sub) for _ in range(n)]


def json_decoder(type_url: str, value: bytes) -> Mapping[str, Any] | None:
    return json.loads(value) if type_url.startswith("test.") else None


def test_order_is_preserved() -> None:
    async def body() -> None:
        ex = Exchange()
        sub = ex.subscribe()
        for i in range(100):
            ex.publish("default", "/tasks/exit", EXIT, bytes([i]))
        got = await take(sub, 100)
        assert [e.value[0] for e in got] == list(range(100))
        assert all(e.namespace == "default" and e.topic == "/tasks/exit" and e.type_url == EXIT for e in got)
        assert [e.timestamp for e in got] == sorted(e.timestamp for e in got)

    run(body)


def test_a_waiting_subscriber_is_woken() -> None:
    async def body() -> None:
        ex = Exchange()
        sub = ex.subscribe()
        reader = asyncio.create_task(anext(sub))
        await asyncio.sleep(0)
        assert not reader.done()
        envelope = ex.publish("default", "/containers/create", "containerd.events.ContainerCreate", b"")
        assert await reader == envelope

    run(body)


def test_events_before_subscribing_are_not_seen() -> None:
    async def body() -> None:
        ex = Exchange()
        ex.publish("default", "/tasks/start", "t", b"early")
        sub = ex.subscribe()
        ex.publish("default", "/tasks/start", "t", b"late")
        assert (await anext(sub)).value == b"late"

    run(body)


def test_filters_by_namespace_and_topic() -> None:
    async def body() -> None:
        ex = Exchange()
        docker = ex.subscribe(["namespace==moby,topic~=|^/tasks/|"])
        two = ex.subscribe(['topic=="/containers/delete"', "namespace==k8s.io"])
        every = ex.subscribe()
        published = [
            ex.publish("moby", "/tasks/exit", EXIT, b"1"),
            ex.publish("moby", "/containers/delete", "d", b"2"),
            ex.publish("default", "/tasks/exit", EXIT, b"3"),
            ex.publish("k8s.io", "/tasks/oom", "o", b"4"),
            ex.publish("moby", "/tasks/exec-started", "s", b"5"),
        ]
        assert [e.value for e in await take(docker, 2)] == [b"1", b"5"]
        assert [e.value for e in await take(two, 2)] == [b"2", b"4"]
        assert await take(every, 5) == published
        for sub in (docker, two, every):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(sub), 0.01)

    run(body)


def test_filters_on_event_fields_with_a_decoder() -> None:
    async def body() -> None:
        ex = Exchange(decoder=json_decoder)
        sub = ex.subscribe(["event.container_id==web", "event.labels.a.b==c"])
        ex.publish("default", "/tasks/exit", "test.TaskExit", b'{"container_id": "db"}')
        ex.publish("default", "/tasks/exit", "test.TaskExit", b'{"container_id": "web", "pid": 7}')
        ex.publish("default", "/tasks/exit", "other.Type", b"not json")
        ex.publish("default", "/tasks/exit", "test.TaskExit", b"{broken")
        ex.publish("default", "/images/update", "test.ImageUpdate", b'{"labels": {"a.b": "c"}}')
        got = await take(sub, 2)
        assert [e.type_url for e in got] == ["test.TaskExit", "test.ImageUpdate"]
        # without a decoder, event fields are simply absent
        plain = Exchange()
        sub = plain.subscribe(["event.container_id"])
        plain.publish("default", "/tasks/exit", "test.TaskExit", b'{"container_id": "web"}')
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(sub), 0.01)

    run(body)


def test_several_subscribers_and_unsubscribe() -> None:
    async def body() -> None:
        ex = Exchange()
        a, b = ex.subscribe(), ex.subscribe()
        assert ex.subscribers == 2
        ex.publish("default", "/tasks/start", "t", b"1")
        a.close()
        a.close()  # idempotent
        assert ex.subscribers == 1
        ex.publish("default", "/tasks/start", "t", b"2")
        with pytest.raises(StopAsyncIteration):
            await anext(a)
        assert [e.value for e in await take(b, 2)] == [b"1", b"2"]
        async with ex.subscribe() as c:
            assert ex.subscribers == 2
        assert c.closed and ex.subscribers == 1

    run(body)


def test_close_wakes_a_waiting_reader() -> None:
    async def body() -> None:
        ex = Exchange()
        sub = ex.subscribe()

        async def drain() -> list[Envelope]:
            return [e async for e in sub]

        reader = asyncio.create_task(drain())
        ex.publish("default", "/tasks/start", "t", b"1")
        await asyncio.sleep(0.01)
        await sub.aclose()
        assert [e.value for e in await reader] == [b"1"]

    run(body)


def test_a_cancelled_reader_leaves_the_subscription_usable() -> None:
    async def body() -> None:
        ex = Exchange()
        sub = ex.subscribe()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(sub), 0.01)
        ex.publish("default", "/tasks/start", "t", b"after")
        assert (await anext(sub)).value == b"after"

    run(body)


def test_a_slow_subscriber_is_dropped_without_blocking_others() -> None:
    async def body() -> None:
        ex = Exchange(queue_size=3)
        slow = ex.subscribe()
        fast = ex.subscribe()
        received: list[bytes] = []

        for i in range(5):
            ex.publish("default", "/tasks/exit", EXIT, bytes([i]))  # never waits
            received.append((await anext(fast)).value)
        assert received == [bytes([i]) for i in range(5)]
        assert ex.subscribers == 1
        # counted for ketchd's metrics: every event published, the one the slow one missed first
        assert ex.published == {"/tasks/exit": 5} and ex.dropped == {"subscriber_behind": 1}
        # the dropped one gets its queued events, then the error, then the end
        assert [e.value for e in await take(slow, 3)] == [b"\x00", b"\x01", b"\x02"]
        with pytest.raises(errdefs.ResourceExhausted, match="fell behind"):
            await anext(slow)
        with pytest.raises(StopAsyncIteration):
            await anext(slow)
        assert slow.closed

    run(body)


def test_overflow_wakes_a_waiting_reader_with_the_error() -> None:
    async def body() -> None:
        ex = Exchange(queue_size=1)
        sub = ex.subscribe(['topic=="/tasks/exit"'])
        ex.publish("default", "/tasks/exit", EXIT, b"1")
        ex.publish("default", "/tasks/start", "t", b"filtered out: does not count")
        assert ex.subscribers == 1
        ex.publish("default", "/tasks/exit", EXIT, b"2")
        assert ex.subscribers == 0
        with pytest.raises(errdefs.ResourceExhausted):
            async for envelope in sub:
                assert envelope.value == b"1"

    run(body)


def test_forward_keeps_the_envelope() -> None:
    async def body() -> None:
        ex = Exchange()
        sub = ex.subscribe(["namespace==k8s.io"])
        envelope = Envelope(1700000000.5, "k8s.io", "/tasks/create", "containerd.events.TaskCreate", b"\x0a\x01x")
        ex.forward(envelope)
        assert await anext(sub) is envelope

    run(body)


@pytest.mark.parametrize(
    ("envelope", "error", "message"),
    [
        (Envelope(1.0, "", "/a", "t", b""), errdefs.InvalidArgument,
         "event envelope has invalid namespace: identifier must not be empty"),
        (Envelope(1.0, "a/b", "/a", "t", b""), errdefs.InvalidArgument,
         'event envelope has invalid namespace: identifier "a/b" must match'),
        (Envelope(1.0, "ns", "tasks", "t", b""), errdefs.InvalidArgument,
         "envelope topic \"tasks\": must start with '/'"),
        (Envelope(0.0, "ns", "/tasks/exit", "t", b""), errdefs.InvalidArgument,
         "timestamp must be set on forwarded event"),
    ],
)
def test_forward_validates(envelope: Envelope, error: type[errdefs.KetchError], message: str) -> None:
    ex = Exchange()
    with pytest.raises(error) as info:
        ex.forward(envelope)
    assert info.value.message.startswith(message)


def test_publish_validates() -> None:
    ex = Exchange()
    with pytest.raises(errdefs.FailedPrecondition) as info:
        ex.publish("", "/tasks/exit", EXIT, b"")
    assert str(info.value) == "failed publishing event: namespace is required: failed precondition"
    with pytest.raises(errdefs.InvalidArgument, match="^failed publishing event: namespace validation: identifier"):
        ex.publish("../x", "/tasks/exit", EXIT, b"")
    with pytest.raises(errdefs.InvalidArgument):
        ex.publish("default", "/tasks//exit", EXIT, b"")


@pytest.mark.parametrize("topic", ["/tasks/exit", "/tasks/exec-added", "/namespaces/create", "/a", "/snapshot/prepare"])
def test_valid_topics(topic: str) -> None:
    validate_topic(topic)


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("", 'envelope topic "": must not be empty'),
        ("tasks/exit", "envelope topic \"tasks/exit\": must start with '/'"),
        ("/", 'envelope topic "/": must have at least one component'),
        ("/tasks/", 'envelope topic "/tasks/": failed validation on component "": identifier must not be empty'),
        ("/tasks/../x", 'envelope topic "/tasks/../x": failed validation on component "..": identifier ".." must match'),
        ("/tasks exit", 'envelope topic "/tasks exit": failed validation on component "tasks exit"'),
    ],
)
def test_invalid_topics(topic: str, message: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate_topic(topic)
    assert info.value.message.startswith(message)


def test_bad_filters_are_refused_at_subscribe() -> None:
    ex = Exchange()
    with pytest.raises(errdefs.InvalidArgument) as info:
        ex.subscribe(["topic=="])
    assert info.value.message == "failed parsing subscription filters: filters: parse error: [topic==]: expected value or quoted"
    assert ex.subscribers == 0
    # as in containerd, a value starting with "/" opens a /quoted/ literal, allowed after ~= only
    with pytest.raises(errdefs.InvalidArgument, match="invalid quote encountered"):
        ex.subscribe(["topic==/tasks/exit/"])


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Exchange(queue_size=0)


def test_events_imports_no_grpc() -> None:
    code = "import sys, ketch.events; print(any(m.split('.')[0] == 'grpc' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_a_held_exchange_keeps_events_until_released_in_order() -> None:
    async def body() -> None:
        ex = Exchange()
        ex.hold()
        ex.publish("default", "/tasks/exit", EXIT, b"1")
        ex.forward(Envelope(1.0, "default", "/tasks/exit", EXIT, b"2"))
        late = ex.subscribe()  # a client resubscribing after the restart
        ex.release()
        assert [e.value for e in await take(late, 2)] == [b"1", b"2"]
        ex.publish("default", "/tasks/exit", EXIT, b"3")
        assert [e.value for e in await take(late, 1)] == [b"3"]

    run(body)


def test_forwarded_events_the_accept_hook_refuses_are_dropped() -> None:
    async def body() -> None:
        ex = Exchange()
        seen: set[bytes] = set()

        def first(e: Envelope) -> bool:
            new = e.value not in seen
            seen.add(e.value)
            return new

        ex.accept = first
        sub = ex.subscribe()
        for value in (b"a", b"a", b"b"):
            ex.forward(Envelope(1.0, "default", "/tasks/exit", EXIT, value))
        assert [e.value for e in await take(sub, 2)] == [b"a", b"b"]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await take(sub, 1)  # the duplicate never arrives
        assert ex.published == {"/tasks/exit": 2} and ex.dropped == {"duplicate": 1}

    run(body)


def test_event_field_filters_see_the_protobuf_payload() -> None:
    from ketch.api.containerd.events import task_pb2
    from ketch.events import decode_protobuf

    async def body() -> None:
        ex = Exchange(decoder=decode_protobuf)
        web = ex.subscribe(["event.container_id==web"])
        db = ex.subscribe(['topic=="/tasks/exit",event.id==db'])
        for cid, status in (("db", 0), ("web", 7)):
            ex.publish("default", "/tasks/exit", EXIT, task_pb2.TaskExit(container_id=cid, id=cid, exit_status=status)
                       .SerializeToString())
        assert [task_pb2.TaskExit.FromString(e.value).container_id for e in await take(web, 1)] == ["web"]
        assert [task_pb2.TaskExit.FromString(e.value).exit_status for e in await take(db, 1)] == [0]
        assert decode_protobuf("no.such.Type", b"") is None

    run(body)
