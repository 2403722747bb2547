"""Images: the records with their events (:class:`ImageService`); later, import/export of
OCI and Docker archives, unpacking and registry pulls. Nothing here imports grpc."""

from __future__ import annotations

from ketch.images.store import ImageService, Publish
from ketch.metadata import Descriptor, Image

__all__ = ["Descriptor", "Image", "ImageService", "Publish"]
