"""Checkpoint and restore through ketch.client and the ``ketch`` CLI, against a private
containerd 1.6 and a private ketchd, each with containerd's runc shim and with the ketch shim
(criu 4.1 from ../shared/criu): a
container counting in memory is checkpointed, removed, restored, and goes on counting from
where it was; the checkpoint is containerd's format both ways (``ctr containers
checkpoint|restore``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from ketch import AsyncClient
from ketch.api.containerd.runc.options import oci_pb2
from ketch.client import AlreadyExists, FailedPrecondition, InvalidArgument, KetchError, NotFound, Task
from ketch.client._checkpoint import CHECKPOINT_LABEL, CONFIG, CRIU_TAR, OPTIONS, RUNTIME_OPTIONS, RW_LAYER
from ketch.client._images import Store
from ketch.testing import criu as criu_kit
from ketch.testing import images
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME

from .conftest import Env, running

DAEMONS = [
    pytest.param(("containerd", RUNC_RUNTIME), id="containerd"),
    pytest.param(("containerd", KETCH_RUNTIME), id="containerd-ketchshim"),
    pytest.param(("ketchd", RUNC_RUNTIME), id="ketchd-runcshim"),
    pytest.param(("ketchd", KETCH_RUNTIME), id="ketchd-ketchshim"),
]
IMAGE = "docker.io/library/busybox:ck"
#: counts in memory; the count goes to a file for the test to read (renamed into place: never
#: read half-written), and a file written once before shows the rw layer came along
COUNTER = ["sh", "-c", "echo before > /written; i=0; "
           "while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done"]
KETCH = os.path.join(support.VENV_BIN, "ketch")


@pytest.fixture(scope="module")
def criu() -> str:
    """The criu that works on this kernel (Debian 12's 3.17 does not), handed to the runtime
    as its option criu_path; fails, never skips, when it cannot be set up."""
    return criu_kit.setup()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rootfs = support.make_busybox_rootfs(tmp_path_factory.mktemp("img") / "rootfs")
    out = tmp_path_factory.mktemp("archive") / "busybox.tar"
    images.write_oci_archive(images.image_from_dir(rootfs, IMAGE), out)
    return out


@pytest.fixture(params=DAEMONS)
def denv(request: pytest.FixtureRequest, rootfs: Path) -> Iterator[Env]:
    daemon, runtime = request.param
    with running(daemon, runtime, rootfs) as e:
        yield e


def run(env: Env, ns: str, body: Callable[[AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with AsyncClient(env.cd.address, ns, fifo_dir=str(env.cd.base / "fifo")) as c:
            await body(c)

    asyncio.run(main())


async def counting(c: AsyncClient, env: Env, archive: Path, criu: str, id: str = "counter") -> Task:
    """A counter container from the image, running, its count past 10."""
    if not await c.images():
        await c.import_image(str(archive))
    ct = await c.create_container(id, image=IMAGE, runtime=env.runtime, args=COUNTER,
                                  runtime_options=oci_pb2.Options(criu_path=criu))
    task = await ct.new_task()
    await task.start()
    await until(task, lambda n: n >= 10)
    return task


async def count(task: Task) -> int:
    """The count the container wrote last (0 before its first)."""
    r = await task.exec_sync(["sh", "-c", "cat /tmp/n 2>/dev/null || echo 0"], 10)
    assert r.exit_code == 0, r.stderr
    return int(r.stdout)


async def until(task: Task, ok: Callable[[int], bool], timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = await count(task)
        if ok(n) or time.monotonic() > deadline:
            assert ok(n), f"the count stayed at {n}"
            return n
        await asyncio.sleep(0.1)


async def goes_on_from(task: Task, checkpointed: int) -> None:
    """The restored counter resumed at its checkpointed count (a fresh start would count
    from 1) and counts on; the file written before the checkpoint is there."""
    first = await count(task)
    assert first >= checkpointed, f"restored at {first}, checkpointed at {checkpointed}: not the same process"
    await until(task, lambda n: n > first)
    assert (await task.exec_sync(["cat", "/written"], 10)).stdout == b"before\n"


async def remove(c: AsyncClient, id: str) -> None:
    ct = await c.container(id)
    with pytest.raises(FailedPrecondition):
        await ct.delete()
    await (await ct.task()).delete(force=True)
    await ct.delete()


def test_checkpoint_removed_restored_goes_on_counting(denv: Env, archive: Path, criu: str) -> None:
    ns = denv.ns()

    async def body(c: AsyncClient) -> None:
        task = await counting(c, denv, archive, criu)
        before = await count(task)
        image = await (await c.container("counter")).checkpoint("ck:1", rw=True)
        assert image.name == "ck:1" and image.labels == {CHECKPOINT_LABEL: "true"}
        # left running: it counts on, and is checkpointed again (containerd's Tasks.Checkpoint
        # then answers AlreadyExists for the spec it stored the first time)
        assert (await task.status()).status == "running"
        at = await until(task, lambda n: n > before + 30)
        again = await (await c.container("counter")).checkpoint("ck:2", rw=True)
        store = Store(c.conn)
        index = await store.read_json(image.digest)
        kinds = [m["mediaType"] for m in index["manifests"]]
        assert kinds == [RUNTIME_OPTIONS, images.MANIFEST, RW_LAYER, CRIU_TAR, CONFIG, OPTIONS]
        second = await store.read_json(again.digest)
        assert [m["mediaType"] for m in second["manifests"]] == kinds
        assert second["manifests"][4] == index["manifests"][4]  # the same spec
        assert second["manifests"][3] != index["manifests"][3]  # another moment
        assert index["annotations"] == {"org.opencontainers.image.ref.name": IMAGE,
                                        "io.containerd.checkpoint.runtime": denv.runtime,
                                        "io.containerd.checkpoint.snapshotter": "overlayfs"}
        with pytest.raises(AlreadyExists):
            await (await c.container("counter")).checkpoint("ck:1")
        await remove(c, "counter")

        restored = await c.restore("counter", "ck:1")
        assert await count(restored) < at  # the first checkpoint's moment, not the second's
        await goes_on_from(restored, before)
        await remove(c, "counter")
        restored = await c.restore("counter", "ck:2")
        await goes_on_from(restored, at)
        with pytest.raises(AlreadyExists):
            await c.restore("counter", "ck:1")
        with pytest.raises(InvalidArgument, match="not a checkpoint"):
            await c.restore("other", IMAGE)
        with pytest.raises(NotFound):
            await c.restore("other", "ck:absent")
        # without the task: the spec, image and rw layer; restored, it starts anew on the rw layer
        assert (await restored.exec_sync(["sh", "-c", "echo extra > /extra"], 10)).exit_code == 0
        await (await c.container("counter")).checkpoint("ck:files", task=False, rw=True)
        await remove(c, "counter")
        with pytest.raises(InvalidArgument, match="no task in it"):
            await c.restore("counter", "ck:files")
        fresh = await c.restore("counter", "ck:files", live=False)
        assert (await fresh.exec_sync(["cat", "/extra"], 10)).stdout == b"extra\n"
        await until(fresh, lambda n: n < 30)  # counting from 1 again: /tmp/n was rewritten
        await remove(c, "counter")
        plain = await c.create_container("plain", rootfs=denv.rootfs, runtime=denv.runtime, args=["true"])
        with pytest.raises(FailedPrecondition, match="not made from an image"):
            await plain.checkpoint("ck:plain")
        await plain.delete()
        for name in ("ck:1", "ck:2", "ck:files"):
            await c.remove_image(name)
        assert await c.images() == [await c.image(IMAGE)]

    run(denv, ns, body)


async def blobs(c: AsyncClient) -> set[str]:
    """The digests in the daemon's content store once its GC has run (a lease removed with
    ``sync`` runs it)."""
    from ketch.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
    from ketch.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc

    leases = c.conn.stub(leases_pb2_grpc.LeasesStub)
    await c.conn.call(leases.Create, leases_pb2.CreateRequest(id="gc-now"))
    await c.conn.call(leases.Delete, leases_pb2.DeleteRequest(id="gc-now", sync=True))
    content = c.conn.stub(content_pb2_grpc.ContentStub)
    return {i.digest async for r in c.conn.stream(content.List, content_pb2.ListContentRequest()) for i in r.info}


def test_a_failed_checkpoint_leaves_the_task_running_and_nothing_stored(denv: Env, archive: Path) -> None:
    ns = denv.ns()

    async def body(c: AsyncClient) -> None:
        task = await counting(c, denv, archive, "/nonexistent/criu")
        stored = await blobs(c)
        with pytest.raises(KetchError, match="criu"):  # containerd: Unknown; ketchd: FailedPrecondition
            await (await c.container("counter")).checkpoint("ck:fail", rw=True)
        assert (await task.status()).status == "running"  # resumed
        n = await count(task)
        await until(task, lambda m: m > n)
        assert [i.name for i in await c.images()] == [IMAGE]
        assert await blobs(c) == stored  # the rw layer and runtime options written went with the lease
        await remove(c, "counter")

    run(denv, ns, body)


def test_checkpoint_with_exit_then_restore_with_the_blocking_client(denv: Env, archive: Path, criu: str) -> None:
    ns = denv.ns()

    async def setup(c: AsyncClient) -> None:
        await counting(c, denv, archive, criu)

    run(denv, ns, setup)
    from ketch import Client

    with Client(denv.cd.address, ns, fifo_dir=str(denv.cd.base / "fifo")) as c:
        task = c.container("counter").task()
        before = int(task.exec_sync(["cat", "/tmp/n"], 10).stdout)
        image = task.checkpoint("ck:exit", exit=True)
        task.wait().result(10)
        assert task.status().status == "stopped"
        task.delete()
        c.container("counter").delete()
        restored = c.restore("counter", image.name)
        assert restored.status().status == "running"

    async def check(c: AsyncClient) -> None:
        await goes_on_from(await (await c.container("counter")).task(), before)
        await remove(c, "counter")

    run(denv, ns, check)


def test_a_checkpoint_exported_restores_in_another_daemon(denv: Env, rootfs: Path, archive: Path, criu: str,
                                                        tmp_path: Path) -> None:
    ns = denv.ns()
    moved = tmp_path / "checkpoint.tar"
    before = 0

    async def there(c: AsyncClient) -> None:
        nonlocal before
        before = await count(await counting(c, denv, archive, criu))
        await (await c.container("counter")).checkpoint("ck:moved", rw=True, exit=True)
        await c.export_images(str(moved), "ck:moved")
        await remove(c, "counter")

    run(denv, ns, there)
    with running(denv.cd.name, denv.runtime, rootfs) as other:
        ns2 = other.ns()

        async def here(c: AsyncClient) -> None:
            [image] = await c.import_image(str(moved))
            assert image.name == "ck:moved" and await c.image_size(image) > 0
            assert [i.name for i in await c.images()] == ["ck:moved"]  # the image comes with, as blobs
            await goes_on_from(await c.restore("counter", "ck:moved"), before)
            assert sorted(i.name for i in await c.images()) == ["ck:moved", IMAGE]
            await remove(c, "counter")

        run(other, ns2, here)


def test_the_cli_checkpoints_and_restores(denv: Env, archive: Path, criu: str) -> None:
    ns = denv.ns()
    environ = dict(os.environ, KETCH_ADDRESS=denv.cd.address, KETCH_NAMESPACE=ns,
                   KETCH_FIFO_DIR=str(denv.cd.base / "fifo"), KETCH_LOG_DIR=str(denv.cd.base / "logs"))

    def ketch(*args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([KETCH, *args], capture_output=True, text=True, env=environ, timeout=60)
        assert r.returncode == rc, f"ketch {' '.join(args)}: {r.returncode} {r.stdout!r} {r.stderr!r}"
        return r

    before = 0

    async def setup(c: AsyncClient) -> None:
        nonlocal before
        before = await count(await counting(c, denv, archive, criu))

    run(denv, ns, setup)
    assert ketch("checkpoint", "--exit", "--rw", "counter", "ck:cli").stdout == "ck:cli\n"
    # checkpoints are images, labelled as such
    assert ketch("images", "ls", "-q").stdout.split() == ["ck:cli", IMAGE]
    assert ketch("images", "ls", "-q", 'labels."containerd.io/checkpoint"==true').stdout == "ck:cli\n"
    assert "ck:cli" in ketch("images", "ls").stdout  # sized as a checkpoint
    assert "exists" in ketch("checkpoint", "counter", "ck:cli", rc=1).stderr
    ketch("rm", "counter")
    assert ketch("restore", "--live", "--rw", "counter", "ck:cli").stdout == "counter\n"

    async def check(c: AsyncClient) -> None:
        await goes_on_from(await (await c.container("counter")).task(), before)

    run(denv, ns, check)
    assert ketch("checkpoint", "counter", "ck:norw").stdout == "ck:norw\n"  # left running
    err = ketch("restore", "--rw", "again", "ck:norw", rc=1).stderr
    assert err.count("\n") == 1 and "restore it without rw" in err
    assert "not found" in ketch("restore", "again", "ck:absent", rc=1).stderr
    ketch("rm", "-f", "counter")
    ketch("images", "rm", "ck:cli", "ck:norw")


def test_ctr_restores_the_clients_checkpoint_and_the_client_ctrs(denv: Env, archive: Path, criu: str) -> None:
    ns = denv.ns()
    before = 0

    async def setup(c: AsyncClient) -> None:
        nonlocal before
        before = await count(await counting(c, denv, archive, criu))
        await (await c.container("counter")).checkpoint("ck:client", rw=True, exit=True)
        await (await (await c.container("counter")).task()).delete()
        await (await c.container("counter")).delete()

    run(denv, ns, setup)
    denv.ctr(ns, "containers", "restore", "--live", "--rw", "counter", "ck:client")

    async def by_ctr(c: AsyncClient) -> None:
        nonlocal before
        task = await (await c.container("counter")).task()
        await goes_on_from(task, before)
        before = await count(task)

    run(denv, ns, by_ctr)
    # ctr's checkpoint would silently leave the task out while the spec is stored (containerd's
    # client ignores the AlreadyExists of its Tasks.Checkpoint): drop the first checkpoint
    run(denv, ns, lambda c: c.remove_image("ck:client"))
    denv.ctr(ns, "containers", "checkpoint", "--task", "--rw", "counter", "ck:ctr")
    denv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "counter")
    for _ in range(100):
        if "STOPPED" in denv.ctr(ns, "tasks", "ls").stdout:
            break
        time.sleep(0.1)
    denv.ctr(ns, "tasks", "rm", "counter")
    denv.ctr(ns, "containers", "rm", "counter")

    async def restore(c: AsyncClient) -> None:
        task = await c.restore("counter", "ck:ctr")
        await goes_on_from(task, before)
        await remove(c, "counter")

    run(denv, ns, restore)
