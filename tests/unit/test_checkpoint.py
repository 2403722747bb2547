"""Checkpoints through the Tasks servicer (grpc.aio in-process) over the real runtime, a real
content store and shims served in memory (their "CRIU dump" one file): what is stored, under
which lease, what a restore hands its shim, and what bad input and a missing criu get."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from ketch import errdefs
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.tasks.v1 import tasks_pb2 as api
from ketch.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2
from ketch.content import ContentStore
from ketch.metadata import Container, Store
from ketch.metadata.types import Runtime, TypedValue
from ketch.runtime import TaskManager
from ketch.runtime.checkpoint import MEDIA_TYPE_CHECKPOINT, MEDIA_TYPE_CONFIG, Checkpoints
from ketch.services.tasks import Tasks
from ketch.testing.channel import channel_for
from ketch.testing.fakeshim import FakeLauncher

SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion": "1.0.2"}')
NS = "ns1"


@dataclass
class H:
    tasks: tasks_pb2_grpc.TasksStub
    manager: TaskManager
    launcher: FakeLauncher
    content: ContentStore
    store: Store
    events: list[Any]
    root: Path

    def md(self, lease: str = "") -> list[tuple[str, str]]:
        return [("containerd-namespace", NS)] + ([("containerd-lease", lease)] if lease else [])

    def restored(self, id: str) -> dict[str, bytes]:
        return next(s.restored[id] for s in self.launcher.shims.values() if id in s.restored)

    def blob(self, digest: str) -> bytes:
        with self.content.reader(NS, digest) as r:
            return r.read()

    async def running(self, id: str) -> None:
        await self.tasks.Create(api.CreateTaskRequest(container_id=id), metadata=self.md())
        await self.tasks.Start(api.StartRequest(container_id=id), metadata=self.md())


def run(tmp_path: Path, criu: str, body: Callable[[H], Awaitable[None]],
        loaded: asyncio.Event | None = None) -> None:
    """``criu``: the criu_path of every container's runtime options; ``loaded``: the content
    store is there once it is set (as in ketchd, which serves tasks before it loads it)."""
    options = TypedValue("containerd.runc.v1.Options", oci_pb2.Options(criu_path=criu).SerializeToString())
    containers = {(NS, c): Container(c, runtime=Runtime("io.containerd.ketch.v2", options), spec=SPEC)
                  for c in ("web", "db", "copy")}

    def lookup(ns: str, id: str) -> Container:
        if (ns, id) not in containers:
            raise errdefs.NotFound(f"container {id!r}")
        return containers[(ns, id)]

    async def main() -> None:
        seen: list[Any] = []
        launcher = FakeLauncher()
        manager = TaskManager(state=str(tmp_path / "s"), root=str(tmp_path / "r"), launcher=launcher,
                              publish=lambda ns, e: seen.append(e))
        with Store(tmp_path / "meta.db") as store:
            content = ContentStore(tmp_path / "content", store)

            async def later() -> ContentStore:
                assert loaded is not None
                await loaded.wait()
                return content

            checkpoints = Checkpoints(content if loaded is None else later, manager.publish)
            try:
                async with asyncio.timeout(10), channel_for(lambda server: tasks_pb2_grpc.add_TasksServicer_to_server(
                        Tasks(manager, lookup, checkpoints), server)) as ch:
                    await body(H(tasks_pb2_grpc.TasksStub(ch), manager, launcher, content, store, seen, tmp_path))
            finally:
                await manager.close()

    asyncio.run(main())


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_checkpoint_stores_dump_and_spec_under_the_lease_and_restores(tmp_path: Path) -> None:
    criu = script(tmp_path, "criu", 'test "$1" = check && echo "Looks good."')

    async def body(h: H) -> None:
        h.store.leases.create(NS, "ctr-lease")
        await h.running("web")
        resp = await h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=h.md("ctr-lease"))
        image, config = resp.descriptors
        assert (image.media_type, config.media_type) == (MEDIA_TYPE_CHECKPOINT, MEDIA_TYPE_CONFIG)
        with tarfile.open(fileobj=io.BytesIO(h.blob(image.digest))) as tar:
            assert [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()] == \
                [("fake.img", b"dump of web")]  # type: ignore[union-attr]
        assert any_pb2.Any.FromString(h.blob(config.digest)) == any_pb2.Any(type_url=SPEC.type_url, value=SPEC.value)
        assert h.content.info(NS, image.digest).size == image.size
        held = {r.id for r in h.store.leases.list_resources(NS, "ctr-lease")}
        assert held == {image.digest, config.digest}, "the lease holds both blobs, and nothing else"
        assert h.events[-1] == events.TaskCheckpointed(container_id="web", checkpoint=image.digest)
        work = h.root / "r" / "runtime" / "v2" / NS / "web"
        assert sorted(p.name for p in work.iterdir()) == [], "the dump directory is gone"

        # a second checkpoint of the same task: the spec blob is the same; the lease holds it again
        h.store.leases.create(NS, "again")
        again = await h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=h.md("again"))
        assert again.descriptors[1] == config
        assert {r.id for r in h.store.leases.list_resources(NS, "again")} == {image.digest, config.digest}

        # restore: the shim's Create gets the dump, unpacked in the task's work dir until it starts
        await h.tasks.Create(api.CreateTaskRequest(container_id="db", checkpoint=image), metadata=h.md())
        assert h.restored("db") == {"fake.img": b"dump of web"}
        restore = h.root / "r" / "runtime" / "v2" / NS / "db" / "restore"
        assert restore.is_dir()
        await h.tasks.Start(api.StartRequest(container_id="db"), metadata=h.md())
        assert not restore.exists()

    run(tmp_path, criu, body)


def test_checkpoint_options_image_path_dumps_there_and_stores_nothing(tmp_path: Path) -> None:
    async def body(h: H) -> None:
        await h.running("web")
        there = tmp_path / "there"
        there.mkdir()
        opts = oci_pb2.CheckpointOptions(image_path=str(there), exit=True)
        resp = await h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web", options=any_pb2.Any(
            type_url="containerd.runc.v1.CheckpointOptions", value=opts.SerializeToString())), metadata=h.md())
        assert list(resp.descriptors) == []
        assert (there / "fake.img").read_bytes() == b"dump of web"
        assert h.content.list(NS) == []
        sent = [req for shim in h.launcher.shims.values() for name, req in shim.calls if name == "Checkpoint"]
        assert oci_pb2.CheckpointOptions.FromString(sent[0].options.value).exit, "options go to the shim"

        # and a create whose runtime options name a criu_image_path restores from that directory
        create = oci_pb2.Options(criu_path="/bin/true", criu_image_path=str(there))
        await h.tasks.Create(api.CreateTaskRequest(container_id="db", options=any_pb2.Any(
            type_url="containerd.runc.v1.Options", value=create.SerializeToString())), metadata=h.md())
        assert h.restored("db") == {"fake.img": b"dump of web"}

    run(tmp_path, "/bin/true", body)


def test_without_a_working_criu_nothing_is_dumped_or_stored(tmp_path: Path) -> None:
    failing = script(tmp_path, "criu", 'echo "Error (criu/cr-check.c:1230): UFFD is not supported" >&2; exit 1')

    async def body(h: H) -> None:
        await h.running("web")
        err = await failure(h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=h.md()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"criu check failed ({failing})" in (err.details() or "")
        assert "UFFD is not supported" in (err.details() or "")
        assert all(name != "Checkpoint" for s in h.launcher.shims.values() for name, _ in s.calls)
        assert h.content.list(NS) == [] and h.content.list_statuses(NS) == []
        assert not [e for e in h.events if isinstance(e, events.TaskCheckpointed)]

    run(tmp_path, failing, body)

    async def missing(h: H) -> None:
        await h.running("web")
        err = await failure(h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=h.md()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "criu_path '/nonexistent/criu' is not an executable file" in (err.details() or "")
        # a restore needs criu as much
        d = descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_CHECKPOINT, digest="sha256:" + "a" * 64, size=1)
        err = await failure(h.tasks.Create(api.CreateTaskRequest(container_id="db", checkpoint=d), metadata=h.md()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    (tmp_path / "2").mkdir()
    run(tmp_path / "2", "/nonexistent/criu", missing)


def test_restore_refuses_bad_checkpoints_and_leaves_no_task(tmp_path: Path) -> None:
    async def body(h: H) -> None:
        def blob(data: bytes) -> descriptor_pb2.Descriptor:
            import hashlib

            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            with h.content.writer(NS, f"t-{digest}") as w:
                w.write(data)
                w.commit(len(data), digest)
            return descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_CHECKPOINT, digest=digest, size=len(data))

        async def create(d: descriptor_pb2.Descriptor) -> grpc.aio.AioRpcError:
            return await failure(h.tasks.Create(api.CreateTaskRequest(container_id="db", checkpoint=d),
                                                metadata=h.md()))

        good = blob(b"\0" * 1024)  # an empty tar
        wrong = descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_CONFIG, digest=good.digest, size=good.size)
        err = await create(wrong)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and MEDIA_TYPE_CONFIG in (err.details() or "")
        absent = descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_CHECKPOINT, digest="sha256:" + "b" * 64, size=3)
        assert (await create(absent)).code() == grpc.StatusCode.NOT_FOUND

        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo("../../escaped")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        err = await create(blob(raw.getvalue()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "escaped" in (err.details() or "")
        assert not list((h.root / "r" / "runtime" / "v2" / NS).glob("**/escaped"))
        assert not list(h.root.glob("**/escaped"))
        # nothing of the failed creates is left: no task, no bundle
        assert not (h.root / "s" / "runtime" / "v2" / NS / "db").exists()
        assert not (h.root / "r" / "runtime" / "v2" / NS / "db").exists()
        await h.tasks.Create(api.CreateTaskRequest(container_id="db"), metadata=h.md())

    run(tmp_path, "/bin/true", body)


def test_only_blobs_wait_for_the_content_store(tmp_path: Path) -> None:
    """ketchd serves tasks before its content store is loaded: a create, even with runtime
    options, goes on; a checkpoint waits for the store, then stores its blobs there."""
    loaded = asyncio.Event()

    async def body(h: H) -> None:
        options = oci_pb2.Options(criu_path="/bin/true", binary_name="runc")
        await h.tasks.Create(api.CreateTaskRequest(container_id="web", options=any_pb2.Any(
            type_url="containerd.runc.v1.Options", value=options.SerializeToString())), metadata=h.md())
        await h.tasks.Start(api.StartRequest(container_id="web"), metadata=h.md())
        checkpoint = asyncio.ensure_future(h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"),
                                                              metadata=h.md()))
        await asyncio.sleep(0.3)
        assert not checkpoint.done()
        loaded.set()
        image, _ = (await checkpoint).descriptors
        assert h.content.info(NS, image.digest).size == image.size

    run(tmp_path, "/bin/true", body, loaded)


def test_a_failed_dump_leaves_no_directory_and_stores_nothing(tmp_path: Path) -> None:
    async def body(h: H) -> None:
        await h.running("web")
        shim = next(iter(h.launcher.shims.values()))
        shim.fail["Checkpoint"] = errdefs.FailedPrecondition("criu dump failed: Connected TCP socket")
        h.store.leases.create(NS, "l")
        err = await failure(h.tasks.Checkpoint(api.CheckpointTaskRequest(container_id="web"), metadata=h.md("l")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "Connected TCP socket" in (err.details() or "")
        work = h.root / "r" / "runtime" / "v2" / NS / "web"
        assert list(work.iterdir()) == []
        assert h.content.list(NS) == [] and h.content.list_statuses(NS) == []
        assert h.store.leases.list_resources(NS, "l") == []
        assert not [e for e in h.events if isinstance(e, events.TaskCheckpointed)]

    run(tmp_path, "/bin/true", body)
