"""ketch.client end to end: the same test code against a private ketchd (with the ketch shim)
and a private containerd 1.6 (with its own runc shim)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from ketch import AsyncClient, Client
from ketch.client import (
    AlreadyExists,
    Capture,
    Event,
    FailedPrecondition,
    InvalidArgument,
    LogURI,
    NotFound,
    Stdio,
    Unavailable,
)
from ketch.distribution.manifests import host_platform
from ketch.testing import registry as registries
from ketch.testing import images
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME

from .conftest import Env, running

DAEMONS = [
    pytest.param(("containerd", RUNC_RUNTIME), id="containerd"),
    pytest.param(("ketchd", KETCH_RUNTIME), id="ketchd"),
]
SLEEPER = ["sleep", "1000"]


@pytest.fixture(params=DAEMONS)
def denv(request: pytest.FixtureRequest, rootfs: Path) -> Iterator[Env]:
    daemon, runtime = request.param
    with running(daemon, runtime, rootfs) as e:
        yield e


def client_of(env: Env, ns: str) -> AsyncClient:
    return AsyncClient(env.cd.address, ns, fifo_dir=str(env.cd.base / "fifo"))


def run(env: Env, body: Callable[[AsyncClient], Awaitable[None]]) -> None:
    """``body(client)`` in a fresh namespace of ``env``'s daemon."""
    ns = env.ns()

    async def main() -> None:
        async with client_of(env, ns) as c:
            await body(c)

    asyncio.run(main())


async def _cleanup(task) -> None:  # type: ignore[no-untyped-def]
    await task.delete(force=True)


def test_a_task_runs_and_its_exit_is_waited_for_before_start(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("quick", rootfs=denv.rootfs, runtime=denv.runtime, labels={"app": "q"},
                                      args=["sh", "-c", "echo out; echo err >&2; exit 7"])
        with pytest.raises(AlreadyExists):
            await c.create_container("quick", rootfs=denv.rootfs, runtime=denv.runtime, args=["true"])
        out, err = Capture(), Capture()
        task = await ct.new_task(Stdio(stdout=out, stderr=err))
        assert (await task.status()).status == "created"
        waiter = task.wait()
        await task.start()
        status = await waiter
        assert status.code == 7 and status.exited_at is not None
        assert (await task.status()).status == "stopped"
        assert (await task.delete()).code == 7
        assert bytes(out) == b"out\n" and bytes(err) == b"err\n"
        assert [x.id for x in await c.containers("labels.app==q")] == ["quick"]
        assert await c.containers("labels.app==other") == []
        assert (await ct.update_labels({"app": None, "tier": "x"})) == {"tier": "x"}
        await ct.delete()
        with pytest.raises(NotFound):
            await c.container("quick")

    run(denv, body)


def test_delete_of_a_running_task_is_refused_unless_forced(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("busy", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER)
        task = await ct.new_task()
        with pytest.raises(FailedPrecondition):
            await task.delete()  # created, not stopped
        await task.start()
        assert [t.container_id for t in await c.tasks()] == ["busy"]
        with pytest.raises(FailedPrecondition, match="must be stopped"):
            await task.delete()
        with pytest.raises(FailedPrecondition):
            await ct.delete()
        assert (await task.status()).status == "running"
        assert (await task.delete(force=True)).code == 137
        with pytest.raises(NotFound):
            await ct.task()
        await ct.delete()

    run(denv, body)


def test_exec_pids_pause_resume_metrics_update(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("box", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER,
                                      env={"GREETING": "hello"}, memory=64 << 20)
        task = await ct.new_task()
        await task.start()
        try:
            out = Capture()
            proc = await task.exec("e1", ["sh", "-c", "echo $GREETING; sleep 1000"], io=Stdio(stdout=out))
            waiter = proc.wait()
            await proc.start()
            infos = await task.pids()
            assert {p.pid for p in infos} >= {task.pid, proc.pid}
            with pytest.raises(AlreadyExists):
                await task.exec("e1", ["true"])
            await task.pause()
            assert (await task.status()).status == "paused"
            await task.resume()
            assert (await task.status()).status == "running"
            m = await task.metrics()
            assert m.cgroup in (1, 2) and m.pids >= 2 and m.memory_bytes > 0 and m.cpu_ns > 0
            assert m.memory_limit == 64 << 20
            await task.update(memory=96 << 20)
            assert (await task.metrics()).memory_limit == 96 << 20
            with pytest.raises(FailedPrecondition):
                await proc.delete()
            await proc.kill(signal.SIGKILL)
            assert (await waiter).code == 137
            assert b"hello\n" == bytes(out)
            await proc.delete()
            with pytest.raises(NotFound):
                await proc.status()
        finally:
            await task.delete(force=True)
            await ct.delete()

    run(denv, body)


def test_stdin_is_copied_and_closed_and_a_terminal_resizes(denv: Env, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("cat", rootfs=denv.rootfs, runtime=denv.runtime, args=["cat"])
        out = Capture()
        src = tmp_path / "in"
        src.write_bytes(b"line one\n" * 1000)
        with open(src, "rb") as f:
            task = await ct.new_task(Stdio(stdin=f, stdout=out))
            waiter = task.wait()
            await task.start()
            assert (await waiter).code == 0  # cat saw EOF: stdin was closed
        await task.delete()
        assert bytes(out) == src.read_bytes()
        await ct.delete()

        ct = await c.create_container("tty", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER)
        task = await ct.new_task()
        await task.start()
        try:
            out = Capture()
            proc = await task.exec("t", ["sh", "-c", "sleep 0.5; stty size"], io=Stdio(stdout=out, terminal=True))
            waiter = proc.wait()
            await proc.start()
            await proc.resize(123, 45)
            assert (await waiter).code == 0
            await proc.io.wait(5)
            assert b"45 123" in bytes(out)
            await proc.delete()
        finally:
            await task.delete(force=True)
            await ct.delete()

    run(denv, body)


def test_file_log_destination(denv: Env) -> None:
    log = denv.cd.base / "logs" / "c.log"
    log.parent.mkdir()

    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("logged", rootfs=denv.rootfs, runtime=denv.runtime,
                                      args=["sh", "-c", "echo to-out; echo to-err >&2"])
        task = await ct.new_task(LogURI(f"file://{log}"))
        waiter = task.wait()
        await task.start()
        assert (await waiter).code == 0
        await task.delete()
        await ct.delete()
        with pytest.raises(InvalidArgument):
            LogURI("http://example/x")

    run(denv, body)
    # containerd's runc shim may answer Wait before its copy to the file is done: give it a moment
    deadline = time.monotonic() + 5
    while sorted(log.read_text().split()) != ["to-err", "to-out"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(log.read_text().split()) == ["to-err", "to-out"]


def test_a_thousand_quick_execs_never_hang_wait(denv: Env) -> None:
    """Each exec exits at once; its wait, asked before start, ends every time."""
    total, batch = 1000, 8  # containerd's runc shim slows down sharply past ~10 concurrent execs

    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("host", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER)
        task = await ct.new_task()
        await task.start()

        async def one(i: int) -> int:
            proc = await task.exec(f"x{i}", ["true"] if i % 2 else ["sh", "-c", f"exit {i % 7}"])
            waiter = proc.wait()
            await proc.start()
            status = await asyncio.wait_for(waiter, 60)
            await proc.delete()
            return status.code

        try:
            t0 = time.monotonic()
            codes = []
            for start in range(0, total, batch):
                codes += await asyncio.gather(*(one(i) for i in range(start, start + batch)))
            elapsed = time.monotonic() - t0
            print(f"\n{total} execs against {denv.cd.name}: {elapsed:.1f} s")
            assert codes == [0 if i % 2 else i % 7 for i in range(total)]
            assert [p.pid for p in await task.pids()] == [task.pid]
        finally:
            await task.delete(force=True)
            await ct.delete()

    run(denv, body)


def test_exec_sync_kills_at_its_timeout_and_caps_output(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("sync", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER)
        task = await ct.new_task()
        await task.start()
        try:
            r = await task.exec_sync(["sh", "-c", "echo a; echo b >&2; exit 4"], timeout=30)
            assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (4, b"a\n", b"b\n", False)
            r = await task.exec_sync(["cat"], stdin=b"fed\n")
            assert r.stdout == b"fed\n"
            t0 = time.monotonic()
            r = await task.exec_sync(["sh", "-c", "echo started; exec sleep 1000"], timeout=1)
            assert r.timed_out and r.exit_code == 137 and r.stdout == b"started\n"
            assert time.monotonic() - t0 < 15
            assert [p.pid for p in await task.pids()] == [task.pid]  # the sleep is gone
            r = await task.exec_sync(["sh", "-c", "yes | head -c 100000"], max_output=1000)
            assert r.exit_code == 0 and r.truncated and r.stdout == b"y\n" * 500
        finally:
            await task.delete(force=True)
            await ct.delete()

    run(denv, body)


def test_stop_escalates_to_sigkill_and_returns_137(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        ct = await c.create_container("stubborn", rootfs=denv.rootfs, runtime=denv.runtime,
                                      args=["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
        task = await ct.new_task()
        await task.start()
        t0 = time.monotonic()
        assert (await task.stop(timeout=1)).code == 137
        assert 1 <= time.monotonic() - t0 < 15
        await task.delete()
        await ct.delete()

        ct = await c.create_container("polite", rootfs=denv.rootfs, runtime=denv.runtime,
                                      args=["sh", "-c", "trap 'exit 3' TERM; while true; do sleep 0.1; done"])
        task = await ct.new_task()
        await task.start()
        await asyncio.sleep(0.3)  # the trap is set
        assert (await task.stop(timeout=30)).code == 3
        assert (await task.stop(timeout=1)).code == 3  # already stopped: its status
        await task.delete()
        await ct.delete()

    run(denv, body)


def test_a_restarted_client_attaches_to_a_running_task(denv: Env) -> None:
    ns = denv.ns()
    r, w = os.pipe()  # the first client's stdin: never written, never at its end

    async def first() -> None:
        async with client_of(denv, ns) as c:
            ct = await c.create_container("cat", rootfs=denv.rootfs, runtime=denv.runtime, args=["cat"])
            task = await ct.new_task(Stdio(stdin=r, stdout=Capture()))
            await task.start()

    async def second() -> None:
        async with client_of(denv, ns) as c:
            ct = await c.container("cat")
            out = Capture()
            task = await ct.task(Stdio(stdin=b"after the restart\n", stdout=out))
            assert (await task.wait()).code == 0  # our stdin's end reached cat
            await task.io.wait(5)
            assert bytes(out) == b"after the restart\n"
            await task.delete()
            await ct.delete()

    try:
        asyncio.run(first())
        asyncio.run(second())
    finally:
        os.close(r)
        os.close(w)


def test_the_blocking_client_has_the_same_shape(denv: Env) -> None:
    ns = denv.ns()
    with Client(denv.cd.address, ns, fifo_dir=str(denv.cd.base / "fifo")) as c:
        assert c.version().version
        ct = c.create_container("s", rootfs=denv.rootfs, runtime=denv.runtime, args=SLEEPER)
        assert ct.id == "s" and ct.runtime == denv.runtime
        task = ct.new_task()
        waiter = task.wait()
        task.start()
        r = task.exec_sync(["echo", "hi"], timeout=30)
        assert (r.exit_code, r.stdout) == (0, b"hi\n")
        assert not waiter.done()
        assert task.stop(timeout=1).code == 137
        assert waiter.result(timeout=10).code == 137
        task.delete()
        ct.delete()
        with pytest.raises(NotFound):
            c.container("s")


def test_errors_are_typed(denv: Env, tmp_path: Path) -> None:
    async def body(c: AsyncClient) -> None:
        with pytest.raises(InvalidArgument):
            await c.create_container("../x", rootfs=denv.rootfs, args=["true"])
        with pytest.raises(NotFound):
            await c.create_container("nofs", rootfs=str(tmp_path / "absent"), args=["true"])
        with pytest.raises(InvalidArgument):
            await c.create_container("noargs", rootfs=denv.rootfs)

    run(denv, body)
    with Client(str(tmp_path / "nobody.sock"), "x") as c:
        with pytest.raises(Unavailable, match=str(tmp_path / "nobody.sock")):
            c.version()
        with pytest.raises(Unavailable):  # a subscription that never reached the daemon ends
            next(iter(c.events()))


def test_events_with_filters(denv: Env) -> None:
    async def body(c: AsyncClient) -> None:
        seen: list[Event] = []

        async def collect(filters: list[str], n: int) -> None:
            async for e in c.events(*filters):
                seen.append(e)
                if len([x for x in seen if x.topic == "/tasks/exit"]) >= n:
                    return

        collector = asyncio.ensure_future(collect([f'namespace=={c.namespace},topic~="^/tasks/"'], 2))
        by_field = asyncio.ensure_future(anext(aiter(c.events(f"namespace=={c.namespace},event.container_id==second"))))
        await asyncio.sleep(0.5)  # subscribed
        for name, code in (("first", 3), ("second", 4)):
            ct = await c.create_container(name, rootfs=denv.rootfs, runtime=denv.runtime, args=["sh", "-c", f"exit {code}"])
            task = await ct.new_task()
            await task.start()
            await task.wait()
            await task.delete()
            await ct.delete()
        await asyncio.wait_for(collector, 30)
        exits = [(e.event.container_id, e.event.exit_status) for e in seen if e.topic == "/tasks/exit"]
        assert exits == [("first", 3), ("second", 4)]
        assert {e.topic for e in seen} >= {"/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"}
        assert all(e.namespace == c.namespace and not e.reconciled for e in seen)
        assert seen[0].as_dict()["event"]["container_id"] == "first"
        first_of_second = await asyncio.wait_for(by_field, 30)
        assert first_of_second.event.container_id == "second"

    run(denv, body)


def test_a_subscriber_rides_a_kill_9_of_the_daemon_and_gets_the_exit_of_the_outage(denv: Env) -> None:
    """The daemon is killed while a client subscribes; a task exits while it is down; the
    restarted daemon's subscriber gets that exit once, with its true status, and goes on."""

    async def body(c: AsyncClient) -> None:
        ns = c.namespace
        for name, args in (("quitter", ["sh", "-c", "sleep 2; exit 7"]), ("stayer", SLEEPER)):
            ct = await c.create_container(name, rootfs=denv.rootfs, runtime=denv.runtime, args=args)
            await (await ct.new_task()).start()
        exits: list[Event] = []

        async def collect() -> None:
            async for e in c.events(f'namespace=={ns},topic=="/tasks/exit"'):
                exits.append(e)

        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(denv.cd.kill, signal.SIGKILL)
        await asyncio.sleep(4)  # quitter exits 2 s in, while nobody answers
        assert exits == []
        await asyncio.to_thread(denv.cd.start)
        deadline = time.monotonic() + 20
        while not exits and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # room for a second copy (the daemon's own, or a reconcile's)
        assert [(e.event.container_id, e.event.exit_status) for e in exits] == [("quitter", 7)]
        stayer = await (await c.container("stayer")).task()
        await stayer.kill(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(exits) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [(e.event.container_id, e.event.exit_status) for e in exits] == [("quitter", 7), ("stayer", 137)]
        print(f"\nthe outage's exit came {'by reconciling' if exits[0].reconciled else 'from the daemon'}")
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)

    run(denv, body)


# -- images ------------------------------------------------------------------------------------

IMAGE = "docker.io/library/busybox:client"


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> images.Image:
    rootfs = support.make_busybox_rootfs(tmp_path_factory.mktemp("img") / "rootfs")
    return images.image_from_dir(rootfs, IMAGE)


@pytest.fixture(scope="module")
def oci_archive(busybox_image: images.Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "busybox.tar"
    images.write_oci_archive(busybox_image, out)
    return out


def test_images_import_run_export_tag_remove(denv: Env, oci_archive: Path, busybox_image: images.Image,
                                             tmp_path: Path) -> None:
    progress: list[tuple[str, int, int]] = []

    async def body(c: AsyncClient) -> None:
        [imported] = await c.import_image(str(oci_archive), progress=lambda *a: progress.append(a))
        assert (imported.name, imported.digest) == (IMAGE, busybox_image.manifest.digest)
        assert progress and all(done <= total for _, done, total in progress)
        assert [i.name for i in await c.images()] == [IMAGE]
        assert await c.image_size(imported) == sum(len(b.data) for b in (busybox_image.config, *busybox_image.layers))

        ct = await c.create_container("fromimage", image=IMAGE, runtime=denv.runtime, args=["sh", "-c", "echo $PATH; ls /bin/busybox"])
        assert (ct.image, ct.snapshot_key) == (IMAGE, "fromimage")
        out = Capture()
        task = await ct.new_task(Stdio(stdout=out, stderr=out))
        waiter = task.wait()
        await task.start()
        assert (await waiter).code == 0
        await task.delete()
        assert bytes(out) == b"/usr/bin:/bin\n/bin/busybox\n"
        await ct.delete()  # and its snapshot
        ct = await c.create_container("fromimage", image=IMAGE, runtime=denv.runtime)  # the snapshot key is free again
        await ct.delete()

        tagged = await c.tag_image(IMAGE, "example.com/mine:1")
        assert tagged.digest == imported.digest
        with pytest.raises(AlreadyExists):
            await c.tag_image(IMAGE, "example.com/mine:1")
        exported = tmp_path / "out.tar"
        await c.export_images(str(exported), "example.com/mine:1")
        await c.remove_image("example.com/mine:1")
        await c.remove_image(IMAGE)
        assert await c.images() == []
        with pytest.raises(NotFound):
            await c.image(IMAGE)
        with pytest.raises(NotFound):
            await c.create_container("nope", image=IMAGE, runtime=denv.runtime)
        [again] = await c.import_image(str(exported))
        assert (again.name, again.digest) == ("example.com/mine:1", imported.digest)
        r = await c.create_container("again", image=again.name, runtime=denv.runtime, args=["true"])
        await r.delete()

    run(denv, body)


def test_a_docker_save_archive_imports_and_runs(denv: Env, busybox_image: images.Image, tmp_path: Path) -> None:
    archive = tmp_path / "docker.tar"
    images.write_docker_archive(busybox_image, archive, "busybox:saved")

    async def body(c: AsyncClient) -> None:
        [image] = await c.import_image(str(archive))
        assert image.name == "docker.io/library/busybox:saved"
        ct = await c.create_container("saved", image=image.name, runtime=denv.runtime, args=["true"])
        task = await ct.new_task()
        waiter = task.wait()
        await task.start()
        assert (await waiter).code == 0
        await task.delete()
        await ct.delete()
        with pytest.raises(InvalidArgument):
            await c.import_image(__file__)  # not a tar

    run(denv, body)


def test_pull_from_a_local_registry_with_progress(denv: Env, registry: registries.Registry, busybox_image: images.Image) -> None:
    img = busybox_image
    registry.push("ketch/client", "v1", [img.config, *img.layers], img.manifest)
    index = images.Blob(images.INDEX, json.dumps({"schemaVersion": 2, "mediaType": images.INDEX, "manifests": [
        img.manifest.descriptor(platform={"architecture": host_platform()[1], "os": "linux"})]}).encode())
    registry.push("ketch/client", "multi", [], index)
    seen: list[tuple[str, int, int]] = []

    async def body(c: AsyncClient) -> None:
        pulled = await c.pull(f"{registry.address}/ketch/client:multi", progress=lambda *a: seen.append(a))
        assert (pulled.name, pulled.digest) == (f"{registry.address}/ketch/client:multi", index.digest)
        assert {w for w, _, _ in seen} == {img.config.digest, *(layer.digest for layer in img.layers)}
        ct = await c.create_container("pulled", image=pulled.name, runtime=denv.runtime, args=["true"])
        await ct.delete()
        single = await c.pull(f"{registry.address}/ketch/client:v1")
        assert single.digest == img.manifest.digest
        with pytest.raises(NotFound):
            await c.pull(f"{registry.address}/ketch/client:absent")

    run(denv, body)
