"""Event topics: containerd's topic for every event type ketch publishes, in one table.

Publishers hand over the event message only; the topic comes from its type here, so a topic
string is written once. A leaf: it imports nothing (the shim's publisher uses it too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["TOPICS", "Publish", "of"]

#: protobuf full name of the event → containerd's topic (image events live in the images
#: service's package, as in containerd's protos)
TOPICS: dict[str, str] = {
    "containerd.events.TaskCreate": "/tasks/create",
    "containerd.events.TaskStart": "/tasks/start",
    "containerd.events.TaskDelete": "/tasks/delete",
    "containerd.events.TaskExit": "/tasks/exit",
    "containerd.events.TaskOOM": "/tasks/oom",
    "containerd.events.TaskExecAdded": "/tasks/exec-added",
    "containerd.events.TaskExecStarted": "/tasks/exec-started",
    "containerd.events.TaskPaused": "/tasks/paused",
    "containerd.events.TaskResumed": "/tasks/resumed",
    "containerd.events.TaskCheckpointed": "/tasks/checkpointed",
    "containerd.events.ContainerCreate": "/containers/create",
    "containerd.events.ContainerUpdate": "/containers/update",
    "containerd.events.ContainerDelete": "/containers/delete",
    "containerd.events.NamespaceCreate": "/namespaces/create",
    "containerd.events.NamespaceUpdate": "/namespaces/update",
    "containerd.events.NamespaceDelete": "/namespaces/delete",
    "containerd.services.images.v1.ImageCreate": "/images/create",
    "containerd.services.images.v1.ImageUpdate": "/images/update",
    "containerd.services.images.v1.ImageDelete": "/images/delete",
    "containerd.events.ContentDelete": "/content/delete",
    "containerd.events.SnapshotPrepare": "/snapshot/prepare",
    "containerd.events.SnapshotCommit": "/snapshot/commit",
    "containerd.events.SnapshotRemove": "/snapshot/remove",
}


#: how the core hands an event to the daemon's exchange: ``publish(namespace, event message)``
Publish = Callable[[str, Any], None]


class _Descriptor(Protocol):
    @property
    def full_name(self) -> str: ...


class _Event(Protocol):
    @property
    def DESCRIPTOR(self) -> _Descriptor: ...  # noqa: N802 (protobuf's name)


def of(event: _Event) -> str:
    """The topic containerd publishes ``event`` under; KeyError for a type it never publishes."""
    return TOPICS[event.DESCRIPTOR.full_name]
