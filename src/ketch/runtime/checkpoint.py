"""Checkpoints in the content store, as containerd's task service makes and reads them.

A checkpoint (Tasks.Checkpoint) is CRIU's image of the task, dumped by its shim into a
directory of the task's work dir, then written to the content store as two blobs, under the
caller's lease (``ctr`` makes one, and builds its checkpoint image, an OCI index, on them):

- the directory as a plain tar: :data:`MEDIA_TYPE_CHECKPOINT`;
- the container's spec (its ``google.protobuf.Any``, marshalled): :data:`MEDIA_TYPE_CONFIG`.

The directory is removed whatever happens (one left by a ketchd killed mid-checkpoint goes
when the task is reloaded or deleted), so nothing outlives the call but blobs held by the
lease. A checkpoint whose options name an ``image_path`` is dumped there and not stored, as
containerd does.

A restore (Tasks.Create with a checkpoint descriptor) unpacks the tar, with the layer code that
keeps every entry inside its directory, into the task's work dir, where the shim's Create
(runc's shim: its Start) reads it; :meth:`Task.start` removes it. Runtime options naming a
``criu_image_path`` restore from that directory instead.

Both need criu: the one the container's runtime options name (``criu_path``), else ``criu``
on ketchd's PATH, which its shims inherit. ``criu check`` must pass first, or the call is
FailedPrecondition saying what it said, before anything is dumped or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from ketch import digests, errdefs
from ketch.api.containerd.events import task_pb2 as events
from ketch.distribution import manifests
from ketch.runtime.bundle import DUMP_PREFIX
from ketch.topics import Publish

if TYPE_CHECKING:
    from ketch.content import ContentStore
    from ketch.metadata import Container
    from ketch.runtime.task import Task

log = logging.getLogger(__name__)

__all__ = ["MEDIA_TYPE_CHECKPOINT", "MEDIA_TYPE_CONFIG", "Checkpoints", "Descriptor", "Unpack"]

MEDIA_TYPE_CHECKPOINT = manifests.CHECKPOINT_CRIU
MEDIA_TYPE_CONFIG = manifests.CHECKPOINT_CONFIG

#: writes a checkpoint's CRIU image into the directory it is given
Unpack = Callable[[str], Awaitable[None]]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


def _options_field(options: tuple[str, bytes] | None, field: str) -> str:
    """A string field of runc runtime, create or checkpoint options (containerd.runc.v1 or the
    v1 runtime's containerd.linux.runc), "" when they are not those or lack it."""
    if options is None:
        return ""
    from ketch.api.containerd.linux.runctypes import runc_pb2
    from ketch.api.containerd.runc.options import oci_pb2

    types: dict[str, type[Message]] = {
        "containerd.runc.v1.Options": oci_pb2.Options,
        "containerd.runc.v1.CheckpointOptions": oci_pb2.CheckpointOptions,
        "containerd.linux.runc.RuncOptions": runc_pb2.RuncOptions,
        "containerd.linux.runc.CreateOptions": runc_pb2.CreateOptions,
        "containerd.linux.runc.CheckpointOptions": runc_pb2.CheckpointOptions,
    }
    kind = types.get(options[0].rsplit("/", 1)[-1])
    if kind is None or field not in kind.DESCRIPTOR.fields_by_name:
        return ""
    try:
        return str(getattr(kind.FromString(options[1]), field))
    except DecodeError as e:
        raise errdefs.InvalidArgument(f"undecodable {options[0]}: {e}") from None


async def check_criu(runtime_options: tuple[str, bytes] | None) -> str:
    """The criu a checkpoint or restore will use (see the module doc), once ``criu check``
    passed; FailedPrecondition naming it and quoting what it said otherwise (the ketch shim
    checks as much, in the same words; runc's shim does not, and runc's own error says less)."""
    from ketch.oci import criu

    binary = criu.find(_options_field(runtime_options, "criu_path"))
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "check", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        raise errdefs.FailedPrecondition(f"criu {binary} does not run: {e}") from None
    try:
        async with asyncio.timeout(criu.CHECK_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise errdefs.FailedPrecondition(
            f"criu check ({binary}) did not finish within {criu.CHECK_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        raise criu.check_failed(binary, proc.returncode or 0, out)
    return binary


class Checkpoints:
    """Tasks' checkpoints to and from the content store (see the module doc). ``content`` is
    the store, or what waits for it: ketchd serves tasks before its content store is loaded,
    and only a call that reads or writes a blob waits for it."""

    def __init__(self, content: ContentStore | Callable[[], Awaitable[ContentStore]], publish: Publish) -> None:
        self._content = content
        self.publish = publish

    async def content(self) -> ContentStore:
        return self._content if not callable(self._content) else await self._content()

    async def checkpoint(self, namespace: str, container: Container, task: Task,
                         options: tuple[str, bytes] | None, *, lease: str | None) -> list[Descriptor]:
        """Dump ``task`` with its shim (``options``: containerd's CheckpointOptions, passed on)
        and store the dump and the container's spec; their descriptors (none when the
        options' image_path says where the dump goes instead)."""
        await check_criu(_runtime_options(container))
        image_path = _options_field(options, "image_path")
        if image_path:
            await task.checkpoint(image_path, options)
            self.publish(namespace, events.TaskCheckpointed(container_id=task.id, checkpoint=image_path))
            return []
        if container.spec is None:
            raise errdefs.FailedPrecondition(f"container {container.id!r} has no spec")
        spec = any_pb2.Any(type_url=container.spec.type_url, value=container.spec.value).SerializeToString()
        content = await self.content()
        async with _scratch(task.bundle.work, DUMP_PREFIX) as dump:
            await task.checkpoint(dump, options)
            image = await asyncio.to_thread(_store_tree, content, namespace, dump, f"checkpoint-{task.id}", lease)
        config = await asyncio.to_thread(_store_bytes, content, namespace, spec, MEDIA_TYPE_CONFIG,
                                         f"checkpoint-{task.id}-spec", lease)
        self.publish(namespace, events.TaskCheckpointed(container_id=task.id, checkpoint=image.digest))
        log.info("checkpointed task %s/%s as %s (%d bytes)", namespace, task.id, image.digest, image.size)
        return [image, config]

    async def restore_source(self, namespace: str, container: Container, checkpoint: Descriptor | None,
                             options: tuple[str, bytes] | None) -> tuple[str, Unpack | None]:
        """What a create restores from: ``(directory, None)`` when the task options name a
        criu_image_path, ``("", unpack)`` for a checkpoint blob, ``("", None)`` for a fresh
        task. InvalidArgument for a descriptor that is not a CRIU checkpoint, NotFound for a
        blob the namespace does not have, FailedPrecondition without a working criu."""
        path = _options_field(options, "criu_image_path")
        if not path and checkpoint is None:
            return "", None
        if not path and checkpoint is not None and checkpoint.media_type != MEDIA_TYPE_CHECKPOINT:
            raise errdefs.InvalidArgument(
                f"unsupported checkpoint type {checkpoint.media_type!r}: a task restores from "
                f"{MEDIA_TYPE_CHECKPOINT}")
        await check_criu(options if options is not None else _runtime_options(container))
        if path:
            return path, None
        assert checkpoint is not None
        digests.check_digest(checkpoint.digest)
        content = await self.content()
        await asyncio.to_thread(content.info, namespace, checkpoint.digest)  # NotFound now, not later

        async def unpack(directory: str) -> None:
            await asyncio.to_thread(_unpack, content, namespace, checkpoint.digest, directory)

        return "", unpack


# -- blocking parts, in a thread ----------------------------------------------------------------

def _unpack(content: ContentStore, namespace: str, digest: str, directory: str) -> None:
    from ketch.diff import MEDIA_TYPE_LAYER, apply_layer

    Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    with content.reader(namespace, digest) as reader:
        apply_layer(reader, directory, MEDIA_TYPE_LAYER)


def _store_tree(content: ContentStore, namespace: str, directory: str, ref: str, lease: str | None) -> Descriptor:
    """The directory as a plain tar blob; a failed write leaves no ingest behind."""
    from ketch.diff import create_layer

    ref = _unique(ref)
    with contextlib.closing(content.writer(namespace, ref, lease=lease)) as w:
        try:
            digest, size = create_layer(None, directory, w, compress=False)
        except BaseException:
            with contextlib.suppress(errdefs.KetchError):
                content.abort(namespace, ref, lease=lease)
            raise
        with contextlib.suppress(errdefs.AlreadyExists):  # the same dump again: the blob is there
            w.commit(size, digest)
    return Descriptor(MEDIA_TYPE_CHECKPOINT, digest, size)


def _store_bytes(content: ContentStore, namespace: str, data: bytes, media_type: str, ref: str,
                 lease: str | None) -> Descriptor:
    digest = digests.from_sha256_hex(hashlib.sha256(data).hexdigest())
    try:
        with contextlib.closing(content.writer(namespace, _unique(ref), len(data), digest, lease=lease)) as w:
            for off in range(0, len(data), _CHUNK):
                w.write(data[off:off + _CHUNK])
            w.commit(len(data), digest)
    except errdefs.AlreadyExists:
        pass  # held already (the lease, if any, holds it now too)
    return Descriptor(media_type, digest, len(data))


def _runtime_options(container: Container) -> tuple[str, bytes] | None:
    o = container.runtime.options
    return (o.type_url, o.value) if o is not None else None


def _unique(ref: str) -> str:
    return f"{ref}-{secrets.token_hex(6)}"


@contextlib.asynccontextmanager
async def _scratch(parent: Path, prefix: str) -> AsyncIterator[str]:
    """A fresh directory in ``parent`` for the length of the block, removed after."""
    parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)
