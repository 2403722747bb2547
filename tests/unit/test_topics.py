"""The topic table covers every event message ketch can publish, with containerd's topics."""

from __future__ import annotations

import pytest

from ketch import timestamps, topics
from ketch.api.containerd.events import container_pb2, content_pb2, image_pb2, namespace_pb2, snapshot_pb2, task_pb2
from ketch.api.containerd.services.images.v1 import images_pb2

MODULES = (container_pb2, content_pb2, image_pb2, namespace_pb2, snapshot_pb2, task_pb2)
#: messages of those files that are parts of events, not events
PARTS = {"containerd.events.TaskIO", "containerd.events.ContainerCreate.Runtime"}


def _event_types() -> list[str]:
    names = {d.full_name for m in MODULES for d in m.DESCRIPTOR.message_types_by_name.values()}
    return sorted(names - PARTS)


@pytest.mark.parametrize("full_name", _event_types())
def test_every_event_type_has_a_topic(full_name: str) -> None:
    topic = topics.TOPICS[full_name]
    assert topic.startswith("/") and topic.count("/") == 2


def test_topic_of_a_message() -> None:
    assert topics.of(task_pb2.TaskExit()) == "/tasks/exit"
    assert topics.of(task_pb2.TaskExecAdded()) == "/tasks/exec-added"
    assert topics.of(image_pb2.ImageCreate()) == "/images/create"
    with pytest.raises(KeyError):
        topics.of(images_pb2.Image())


@pytest.mark.parametrize("t", [0.0, 1.5, 1700000000.123456, -1.25, 1700000000.999999999])
def test_timestamps_round_trip(t: float) -> None:
    ts = timestamps.timestamp(t)
    assert 0 <= ts.nanos < 1_000_000_000
    assert timestamps.seconds(ts) == pytest.approx(t, abs=1e-6)
