"""Images as the Images service sees them: the metadata records plus containerd's events.

:class:`ImageService` is what the gRPC servicer (and any other client of the core) calls:
``store.images`` does the records, this adds ``/images/create``, ``/images/update`` and
``/images/delete`` (package ``containerd.services.images.v1``, as containerd's
``services/images/local.go``).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ketch.metadata import Image
from ketch.topics import Publish

if TYPE_CHECKING:
    from ketch.metadata import Store

__all__ = ["ImageService", "Publish"]



class ImageService:
    """Image records with events. Garbage collection after a delete is the caller's
    (:meth:`ketch.gc.Collector.after_delete`, which honours the request's ``sync``)."""

    def __init__(self, store: Store, *, publish: Publish | None = None) -> None:
        self._store = store
        self._publish = publish

    def create(self, namespace: str, image: Image) -> Image:
        """Store a new image (AlreadyExists ``image "x"``) and publish ``/images/create``."""
        created = self._store.images.create(namespace, image)
        self._event(namespace, "ImageCreate", name=created.name, labels=created.labels)
        return created

    def get(self, namespace: str, name: str) -> Image:
        """The image ``name``; NotFound ``image "x"``."""
        return self._store.images.get(namespace, name)

    def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        """Images matching any filter (``name``, ``target.digest``, ``target.mediatype``,
        ``labels.<key>``, ``annotations.<key>``), by name."""
        return self._store.images.list(namespace, filters)

    def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Apply the field mask (NotFound ``image "x"`` when absent) and publish ``/images/update``."""
        updated = self._store.images.update(namespace, image, fieldpaths)
        self._event(namespace, "ImageUpdate", name=updated.name, labels=updated.labels)
        return updated

    def delete(self, namespace: str, name: str) -> None:
        """Remove the image and publish ``/images/delete``."""
        self._store.images.delete(namespace, name)
        self._event(namespace, "ImageDelete", name=name)

    def _event(self, namespace: str, kind: str, **fields: Any) -> None:
        if self._publish is None:
            return
        from ketch.api.containerd.events import image_pb2

        self._publish(namespace, getattr(image_pb2, kind)(**fields))
