"""Namespaces and containers as their services see them: the records plus containerd's rules
and events (as containerd's ``services/namespaces/local.go`` and ``services/containers/local.go``).

``store.namespaces`` and ``store.containers`` keep the records; these add what a client of
the core (a gRPC servicer, the CRI layer, an in-process client) must get the same way
everywhere: /namespaces/* and /containers/* events, a container's spec checked to be a JSON
OCI spec before it is recorded, no container deleted under a live task, and ``get`` of a
namespace nobody has used yet answering as an empty one (dockerd relies on it at start).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ketch import errdefs, identifiers
from ketch.metadata.types import Container, Namespace
from ketch.topics import Publish

if TYPE_CHECKING:
    from ketch.metadata.store import Store

__all__ = ["ContainerService", "NamespaceService"]


class NamespaceService:
    def __init__(self, store: Store, publish: Publish) -> None:
        self._store = store
        self._publish = publish

    def get(self, name: str) -> Namespace:
        """The namespace; one that holds nothing yet is there, without labels."""
        try:
            return self._store.namespaces.get(name)
        except errdefs.NotFound:
            identifiers.validate(name)
            return Namespace(name)

    def list(self) -> builtins.list[Namespace]:
        return self._store.namespaces.list()

    def create(self, name: str, labels: dict[str, str]) -> Namespace:
        from ketch.api.containerd.events import namespace_pb2

        ns = self._store.namespaces.create(name, labels)
        self._publish(ns.name, namespace_pb2.NamespaceCreate(name=ns.name, labels=ns.labels))
        return ns

    def update(self, name: str, labels: dict[str, str], fieldpaths: Sequence[str] = ()) -> Namespace:
        from ketch.api.containerd.events import namespace_pb2

        ns = self._store.namespaces.update(name, labels, fieldpaths)
        self._publish(ns.name, namespace_pb2.NamespaceUpdate(name=ns.name, labels=ns.labels))
        return ns

    def delete(self, name: str) -> None:
        from ketch.api.containerd.events import namespace_pb2

        self._store.namespaces.delete(name)
        self._publish(name, namespace_pb2.NamespaceDelete(name=name))


def _check_spec(c: Container) -> None:
    """A container's spec must be an OCI runtime spec in JSON, as every containerd client
    stores it: refuse anything else before it is recorded."""
    if c.spec is None:
        return  # the store reports a missing spec in containerd's words
    try:
        spec = json.loads(c.spec.value)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"container.Spec of {c.id!r} is not a JSON OCI spec: {e}") from None
    if not isinstance(spec, dict):
        raise errdefs.InvalidArgument(f"container.Spec of {c.id!r} is not a JSON object")


class ContainerService:
    """``has_task(namespace, id)`` tells whether the runtime holds a task for a container."""

    def __init__(self, store: Store, publish: Publish, has_task: Callable[[str, str], bool]) -> None:
        self._store = store
        self._publish = publish
        self._has_task = has_task

    def get(self, namespace: str, id: str) -> Container:
        return self._store.containers.get(namespace, id)

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Container]:
        return self._store.containers.list(namespace, filters)

    def create(self, namespace: str, container: Container) -> Container:
        from ketch.api.containerd.events import container_pb2

        _check_spec(container)
        c = self._store.containers.create(namespace, container)
        event = container_pb2.ContainerCreate(id=c.id, image=c.image)
        event.runtime.name = c.runtime.name
        if c.runtime.options is not None:
            event.runtime.options.type_url, event.runtime.options.value = c.runtime.options.type_url, \
                c.runtime.options.value
        self._publish(namespace, event)
        return c

    def update(self, namespace: str, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        from ketch.api.containerd.events import container_pb2

        if "spec" in fieldpaths or not fieldpaths:
            _check_spec(container)
        c = self._store.containers.update(namespace, container, fieldpaths)
        self._publish(namespace, container_pb2.ContainerUpdate(id=c.id, image=c.image, labels=c.labels,
                                                               snapshot_key=c.snapshot_key))
        return c

    def delete(self, namespace: str, id: str) -> None:
        """FailedPrecondition while the container has a task (NotFound first, as containerd)."""
        from ketch.api.containerd.events import container_pb2

        if self._has_task(namespace, id):
            self._store.containers.get(namespace, id)
            raise errdefs.FailedPrecondition(f"container {id!r} still has a task: delete the task first")
        self._store.containers.delete(namespace, id)
        self._publish(namespace, container_pb2.ContainerDelete(id=id))
