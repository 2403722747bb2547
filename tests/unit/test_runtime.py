"""The runtime's tasks and their phases, over shims served in memory (ketch.testing.fakeshim):
the real TaskManager, bundles on disk and ttrpc; only the shim is a fake."""

from __future__ import annotations

import json

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ketch import errdefs, mount, topics
from ketch.metadata import Container
from ketch.metadata.types import Runtime, TypedValue
from ketch.runtime import CreateOptions, Phase, Stdio, Task, TaskManager
from ketch.runtime.bundle import Bundle
from ketch.testing import system
from ketch.testing.fakeshim import FakeLauncher, FakeShim

T = TypeVar("T")
KETCH = "io.containerd.ketch.v2"
RUNC = "io.containerd.runc.v2"
SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}")


class World:
    """A TaskManager over a FakeLauncher, with every event it published."""

    def __init__(self, tmp: Path, launcher: FakeLauncher | None = None, grouping: bool = True) -> None:
        self.tmp = tmp
        self.launcher = launcher or FakeLauncher()
        self.events: list[tuple[str, str, Any]] = []
        self.manager = TaskManager(state=str(tmp / "state"), root=str(tmp / "root"), launcher=self.launcher,
                                   publish=lambda ns, e: self.events.append((ns, topics.of(e), e)),
                                   call_timeout=5.0, grouping=grouping)

    async def create(self, ns: str, id: str, runtime: str = KETCH, **kw: Any) -> Task:
        return await self.manager.create(ns, Container(id, runtime=Runtime(runtime), spec=SPEC), CreateOptions(**kw))

    def shim_of(self, task: Task) -> FakeShim:
        assert task.group is not None
        return self.launcher.shims[task.group.address]

    def topics(self) -> list[str]:
        return [t for _, t, _ in self.events]

    def bundle(self, ns: str, id: str) -> Path:
        return Bundle.at(str(self.tmp / "state"), str(self.tmp / "root"), ns, id).path


def run(tmp_path: Path, body: Callable[[World], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        world = World(tmp_path, **kw)
        try:
            async with asyncio.timeout(10):
                return await body(world)
        finally:
            await world.manager.close()

    return asyncio.run(main())


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


def test_create_start_wait_kill_delete(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        task = await w.create("default", "web", stdio=Stdio(stdout="/out", terminal=True))
        assert task.phase is Phase.LIVE and task.pid > 0
        created = w.shim_of(task).calls[0][1]
        assert (created.id, created.stdout, created.terminal, created.bundle) == (
            "web", "/out", True, str(w.bundle("default", "web")))
        assert await task.start() == task.pid
        waiter = asyncio.ensure_future(task.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done(), "Wait answers only once the process exits"
        with pytest.raises(errdefs.FailedPrecondition, match="must be stopped before deletion: running"):
            await w.manager.delete("default", "web")
        await task.kill(signal.SIGKILL)
        assert (await waiter).status == 137
        shim = w.shim_of(task)
        ended = await w.manager.delete("default", "web")
        assert (ended.pid, ended.status) == (task.pid, 137)
        assert shim.methods()[-3:] == ["State", "Delete", "Shutdown"]
        assert task.phase is Phase.DELETED and not w.bundle("default", "web").exists()
        with pytest.raises(errdefs.NotFound):
            w.manager.get("default", "web")

    run(tmp_path, body)


def test_a_second_task_is_already_exists_and_a_failed_create_leaves_nothing(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.create("default", "one")
        with pytest.raises(errdefs.AlreadyExists, match="task one"):
            await w.create("default", "one")
        # the shim refuses the create: no task, bundle or shim connection stays behind
        shim = w.launcher.shims[next(iter(w.launcher.shims))]
        shim.fail["Create"] = errdefs.InvalidArgument("bad spec")
        with pytest.raises(errdefs.InvalidArgument, match="bad spec"):
            await w.create("default", "two")
        assert not w.manager.exists("default", "two") and not w.bundle("default", "two").exists()
        assert ("default", "two") in w.launcher.deleted
        # no spec: refused before anything is made
        with pytest.raises(errdefs.FailedPrecondition, match="has no spec"):
            await w.manager.create("default", Container("bare", runtime=Runtime(KETCH)), CreateOptions())
        # a checkpoint that will not unpack: its part-unpacked image goes with the bundle
        unpacked: list[str] = []

        async def bad_checkpoint(directory: str) -> None:
            unpacked.append(directory)
            Path(directory).mkdir(parents=True)
            (Path(directory) / "pages.img").write_bytes(b"half")
            raise errdefs.InvalidArgument("invalid layer stream")

        with pytest.raises(errdefs.InvalidArgument, match="invalid layer stream"):
            await w.create("default", "cp", unpack=bad_checkpoint)
        assert unpacked and not Path(unpacked[0]).exists() and not w.bundle("default", "cp").exists()
        assert [t.id for t in w.manager.list("default")] == ["one"]

    run(tmp_path, body)


def test_exists_while_being_created(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        gate = asyncio.Event()
        start = w.launcher.start

        async def slow_start(*args: Any, **kw: Any) -> str:
            await gate.wait()
            return await start(*args, **kw)

        w.launcher.start = slow_start  # type: ignore[method-assign]
        creating = asyncio.ensure_future(w.create("default", "slow"))
        await asyncio.sleep(0.01)
        assert w.manager.exists("default", "slow")
        with pytest.raises(errdefs.NotFound):
            w.manager.get("default", "slow")  # not visible until created
        with pytest.raises(errdefs.AlreadyExists):
            await w.create("default", "slow")
        gate.set()
        assert (await creating).phase is Phase.LIVE

    run(tmp_path, body)


def test_request_runtime_options_win_over_the_container_s(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        own = TypedValue("containerd.runc.v1.Options", b"\x0a\x01a")
        c = Container("a", runtime=Runtime(RUNC, own), spec=SPEC)
        await w.manager.create("default", c, CreateOptions())
        await w.manager.create("default", Container("b", runtime=Runtime(RUNC, own), spec=SPEC),
                               CreateOptions(options=("containerd.runc.v1.Options", b"\x0a\x01b")))
        creates = [req for s in w.launcher.shims.values() for name, req in s.calls if name == "Create"]
        assert [(r.id, r.options.value) for r in creates] == [("a", b"\x0a\x01a"), ("b", b"\x0a\x01b")]
        assert all(opts for opts in w.launcher.start_options), "the shim's start gets the options on stdin"

    run(tmp_path, body)


def test_tasks_of_a_namespace_share_one_ketch_shim(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        a = await w.create("ns1", "a")
        b = await w.create("ns1", "b")
        c = await w.create("ns2", "c")
        r1 = await w.create("ns1", "r1", runtime=RUNC)
        r2 = await w.create("ns1", "r2", runtime=RUNC)
        assert a.group is b.group and a.group is not c.group
        assert r1.group is not r2.group and r1.group is not a.group, "other shims get one process per task"
        assert len(w.launcher.shims) == 4
        assert a.group is not None and (w.bundle("ns1", "b") / "address").read_text() == a.group.address

    run(tmp_path, body)


def _shim_cgroup_options(cgroup: str) -> TypedValue:
    from ketch.api.containerd.runc.options import oci_pb2

    return TypedValue("containerd.runc.v1.Options", oci_pb2.Options(shim_cgroup=cgroup).SerializeToString())


def test_tasks_asking_for_different_shim_cgroups_never_share_a_shim(tmp_path: Path) -> None:
    """A shim group is keyed by the shim_cgroup its tasks ask for too: another cgroup, another
    shim process (ketchd names it another group); the same one (or none), one shared shim,
    across ketchd's restarts as well."""
    launcher = FakeLauncher()

    async def make(w: World, id: str, cgroup: str) -> Task:
        options = _shim_cgroup_options(cgroup) if cgroup else None
        return await w.manager.create("ns", Container(id, runtime=Runtime(KETCH, options), spec=SPEC), CreateOptions())

    async def first(w: World) -> None:
        a1, a2 = await make(w, "a1", "/shims/a"), await make(w, "a2", "/shims/a")
        b = await make(w, "b", "/shims/b")
        n1, n2 = await make(w, "n1", ""), await make(w, "n2", "")
        assert a1.group is a2.group and n1.group is n2.group
        assert len({id(t.group) for t in (a1, b, n1)}) == 3
        assert len({a.split("/", 3)[3].rsplit("/", 1)[0] for a in launcher.shims}) == 3, "three group names"

    run(tmp_path, first, launcher=launcher)

    async def second(w: World) -> None:
        await w.manager.load()
        late = await make(w, "late", "/shims/b")
        assert late.group is w.manager.get("ns", "b").group, "the shim of /shims/b, found again"
        assert late.group is not w.manager.get("ns", "a1").group

    run(tmp_path, second, launcher=launcher)


def test_each_kubernetes_pod_gets_a_shim_of_its_own(tmp_path: Path) -> None:
    """A pod is a shim group: containers whose specs name one pod (the CRI's
    io.kubernetes.cri.sandbox-id annotation) share a shim; another pod gets another one, even
    in the same namespace; across ketchd's restarts as well."""
    launcher = FakeLauncher()

    def spec(pod: str) -> TypedValue:
        return TypedValue(SPEC.type_url, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": pod}}).encode())

    async def make(w: World, id: str, pod: str) -> Task:
        return await w.manager.create("k8s.io", Container(id, runtime=Runtime(KETCH), spec=spec(pod)), CreateOptions())

    async def first(w: World) -> None:
        pause1, app1 = await make(w, "pause1", "pod1"), await make(w, "app1", "pod1")
        pause2 = await make(w, "pause2", "pod2")
        assert pause1.group is app1.group and pause1.group is not pause2.group
        assert len(launcher.shims) == 2

    run(tmp_path, first, launcher=launcher)

    async def second(w: World) -> None:
        await w.manager.load()
        late = await make(w, "app2", "pod2")
        assert late.group is w.manager.get("k8s.io", "pause2").group
        assert late.group is not w.manager.get("k8s.io", "pause1").group

    run(tmp_path, second, launcher=launcher)


def test_grouping_off_gives_every_task_its_own_shim(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        a = await w.create("ns1", "a")
        b = await w.create("ns1", "b")
        assert a.group is not b.group and len(w.launcher.shims) == 2

    run(tmp_path, body, grouping=False)


def test_a_dead_shim_buries_its_tasks_once_with_the_status_its_cleanup_reports(tmp_path: Path) -> None:
    """As containerd: the exit is what ``shim delete`` says (137: it killed what was left)."""
    async def body(w: World) -> None:
        a = await w.create("ns", "a")
        b = await w.create("ns", "b")
        await a.start()
        from google.protobuf import any_pb2

        await b.exec("e1", any_pb2.Any(), Stdio())
        await b.start("e1")
        waiter = asyncio.ensure_future(a.wait())
        exec_waiter = asyncio.ensure_future(b.wait("e1"))
        await asyncio.sleep(0.01)
        await w.shim_of(a).die()
        assert (await waiter).status == 137
        with pytest.raises(errdefs.NotFound):
            await exec_waiter  # no successor: an exec's status died with its shim
        await until(lambda: b.phase is Phase.STOPPED)
        exits = [(e.container_id, e.exit_status) for _, t, e in w.events if t == "/tasks/exit"]
        assert sorted(exits) == [("a", 137), ("b", 137)]
        assert (w.manager.shims_lost, w.manager.takeovers, w.manager.buried) == (1, 0, 2)  # ketchd's metrics
        assert w.manager.shims() == [] and w.manager.all_tasks() == [a, b]
        state = await a.state()
        assert (state.status, state.exit_status) == (3, 137)  # STOPPED
        with pytest.raises(errdefs.NotFound, match="its shim is gone"):
            await a.kill(signal.SIGKILL)
        assert sorted(w.launcher.deleted) == [("ns", "a"), ("ns", "b")]
        assert (await w.manager.delete("ns", "a")).status == 137
        assert w.topics()[-1] == "/tasks/delete" and not w.bundle("ns", "a").exists()
        # the next task of the namespace gets a fresh shim
        c = await w.create("ns", "c")
        assert c.group is not None and c.group.client is not None and not c.group.client.closed

    run(tmp_path, body)


@pytest.mark.parametrize("cleanup", [255, errdefs.Unknown("shim delete for task t failed with status 1")])
def test_an_exit_nobody_knows_is_255(tmp_path: Path, cleanup: int | errdefs.KetchError) -> None:
    """The cleanup cannot tell the status (the process had stopped with its shim gone), or
    fails: 255."""
    async def body(w: World) -> None:
        task = await w.create("ns", "t", runtime=RUNC)
        await task.start()
        waiter = asyncio.ensure_future(task.wait())
        await asyncio.sleep(0.01)
        w.launcher.cleanup = cleanup
        await w.shim_of(task).die()
        assert (await waiter).status == 255
        assert [e.exit_status for _, t, e in w.events if t == "/tasks/exit"] == [255]
        assert (await w.manager.delete("ns", "t")).status == 255

    run(tmp_path, body)


def test_reload_reconnects_live_shims_and_buries_dead_ones(tmp_path: Path) -> None:
    launcher = FakeLauncher()

    async def first(w: World) -> dict[str, int]:
        pids = {}
        for ns, id in (("keep", "k1"), ("keep", "k2"), ("dead", "d1")):
            pids[id] = (await w.create(ns, id)).pid
        await w.manager.delete("keep", "k2")
        return pids

    pids = run(tmp_path, first, launcher=launcher)

    async def second(w: World) -> None:
        dead = next(s for s in launcher.shims.values() if "dead" in s.address)
        await dead.die()
        await w.manager.load()
        k1 = w.manager.get("keep", "k1")
        assert (k1.phase, k1.pid) == (Phase.LIVE, pids["k1"])
        assert await k1.start() == pids["k1"]
        d1 = w.manager.get("dead", "d1")
        assert d1.phase is Phase.LOST and (await d1.state()).status == 0  # UNKNOWN until buried
        await w.manager.bury_dead()
        assert d1.phase is Phase.STOPPED and w.topics() == ["/tasks/exit"]
        with pytest.raises(errdefs.NotFound):
            w.manager.get("keep", "k2")

    run(tmp_path, second, launcher=launcher)

    async def third(w: World) -> None:
        await w.manager.load()  # the tombstone is on disk: no second /tasks/exit
        assert w.manager.get("dead", "d1").phase is Phase.STOPPED and w.events == []
        assert (await w.manager.delete("dead", "d1")).status == 137

    run(tmp_path, third, launcher=launcher)


def test_execs_list_and_metrics_filters(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        web = await w.create("ns", "web")
        db = await w.create("ns", "db", runtime=RUNC)
        await web.start()
        from google.protobuf import any_pb2

        with pytest.raises(errdefs.InvalidArgument, match="exec id cannot be empty"):
            await web.exec("", any_pb2.Any(), Stdio())
        await web.exec("e1", any_pb2.Any(), Stdio())
        with pytest.raises(errdefs.AlreadyExists):
            await web.exec("e1", any_pb2.Any(), Stdio())
        assert (await web.delete_process("e1")).status == 0
        listed = await w.manager.processes("ns", "status==running")
        assert [p.id for p in listed] == ["web"]
        assert sorted(p.id for p in await w.manager.processes("ns")) == ["db", "web"]
        metrics = await w.manager.metrics("ns", [f"runtime=={RUNC}"])
        assert [(m.id, m.data.value) for m in metrics] == [("db", b"db")]
        assert len(await w.manager.metrics("ns")) == 2
        w.shim_of(db).fail["Stats"] = errdefs.NotFound("gone")
        with pytest.raises(errdefs.NotFound):
            await w.manager.metrics("ns", ["id==db"])

    run(tmp_path, body)


@pytest.mark.parametrize(("phase", "op"), [(Phase.NEW, "delete"), (Phase.LIVE, "bury"), (Phase.STOPPED, "lose"),
                                           (Phase.DELETED, "release"), (Phase.RELEASING, "attach")])
def test_illegal_phase_moves_name_the_phase(tmp_path: Path, phase: Phase, op: str) -> None:
    task = Task("ns", "t", KETCH, "/bin/true", Bundle.at(str(tmp_path), str(tmp_path), "ns", "t"), phase=phase)
    with pytest.raises(errdefs.FailedPrecondition, match=f"cannot {op} in {phase.value} phase"):
        task.move(op)
    assert task.phase is phase


def test_reload_drops_unfinished_dumps_and_keeps_a_restore_until_start(tmp_path: Path) -> None:
    """ketchd killed during a checkpoint leaves the shim's dump in the task's work dir: the
    reload removes it. A task created from a checkpoint but not started keeps its image."""
    launcher = FakeLauncher()

    async def restoring(directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "pages.img").write_bytes(b"pages")

    async def first(w: World) -> Path:
        await w.create("ns", "c1", unpack=restoring)
        work = Path(os.readlink(w.bundle("ns", "c1") / "work"))
        (work / "checkpoint-abc").mkdir()
        (work / "checkpoint-abc" / "pages.img").write_bytes(b"half a dump")
        (work / "criu-work").mkdir()  # the shim's own
        return work

    work = run(tmp_path, first, launcher=launcher)

    async def second(w: World) -> None:
        await w.manager.load()
        assert sorted(p.name for p in work.iterdir()) == ["criu-work", "restore"]
        assert await w.manager.get("ns", "c1").start() > 0
        assert sorted(p.name for p in work.iterdir()) == ["criu-work"]

    run(tmp_path, second, launcher=launcher)


def test_a_resent_exit_is_published_once_across_restarts(tmp_path: Path) -> None:
    from ketch.api.containerd.events import task_pb2 as events
    from ketch.events import Envelope
    from ketch.timestamps import timestamp

    launcher = FakeLauncher()
    exit7 = events.TaskExit(container_id="c", id="c", pid=42, exit_status=7, exited_at=timestamp(1700000000.5))
    envelope = Envelope(1.0, "ns", "/tasks/exit", "containerd.events.TaskExit", exit7.SerializeToString())

    async def first(w: World) -> None:
        await w.create("ns", "c")
        assert w.manager.first_publication(envelope)
        assert not w.manager.first_publication(envelope), "the shim resent it: already published"
        other = Envelope(1.0, "ns", "/tasks/start", "containerd.events.TaskStart", b"")
        assert w.manager.first_publication(other) and w.manager.first_publication(other)
        stranger = events.TaskExit(container_id="not-ours", id="x", pid=1)
        assert w.manager.first_publication(Envelope(1.0, "ns", "/tasks/exit", "containerd.events.TaskExit",
                                                    stranger.SerializeToString()))

    run(tmp_path, first, launcher=launcher)

    async def after_restart(w: World) -> None:
        await w.manager.load()
        assert not w.manager.first_publication(envelope)
        exit8 = events.TaskExit(container_id="c", id="e1", pid=43, exit_status=8, exited_at=timestamp(1700000001))
        assert w.manager.first_publication(Envelope(1.0, "ns", "/tasks/exit", "containerd.events.TaskExit",
                                                    exit8.SerializeToString()))

    run(tmp_path, after_restart, launcher=launcher)


def test_a_shim_replaced_by_its_keeper_is_reconnected_without_losing_a_task(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        a = await w.create("ns", "a")
        b = await w.create("ns", "b")
        await a.start()
        await b.start()
        pids = (a.pid, b.pid)
        waiter = asyncio.ensure_future(a.wait())
        await asyncio.sleep(0.01)
        successor = await w.launcher.kill_and_succeed(w.shim_of(a))
        await until(lambda: a.phase is Phase.LIVE and b.phase is Phase.LIVE)
        assert (a.pid, b.pid) == pids and a.group is b.group and w.shim_of(a) is successor
        assert not waiter.done(), "the Wait goes on with the successor"
        assert (w.manager.shims_lost, w.manager.takeovers, w.manager.buried) == (1, 1, 0)  # ketchd's metrics
        assert w.manager.shims() == [a.group]
        await a.kill(signal.SIGTERM)
        assert (await waiter).status == 143
        assert w.topics() == [] and w.launcher.deleted == [], "nothing buried, no 255"
        assert (await w.manager.delete("ns", "a")).status == 143
        assert (await b.state()).status == 2  # RUNNING

    run(tmp_path, body)


def test_the_exits_a_bundle_remembers_are_bounded(tmp_path: Path) -> None:
    from ketch.runtime.bundle import EXITS_KEPT

    bundle = Bundle.at(str(tmp_path), str(tmp_path), "ns", "t")
    bundle.path.mkdir(parents=True)
    for i in range(5 * EXITS_KEPT):
        assert bundle.note_exit(f"e{i} 1 0.0")
        assert not bundle.note_exit(f"e{i} 1 0.0")
    assert len((bundle.path / "exits").read_text().splitlines()) <= 2 * EXITS_KEPT
    assert not bundle.note_exit(f"e{5 * EXITS_KEPT - 1} 1 0.0")


def test_start_gets_creates_time_budget(tmp_path: Path) -> None:
    """An exec's Start is a runc exec: as slow as a create on a loaded host, so it gets the same
    budget, not the ordinary call timeout."""
    async def body(w: World) -> None:
        w.manager.call_timeout = 0.05
        task = await w.create("ns", "slow")
        for client in {t.group.client for t in w.manager.list("ns") if t.group and t.group.client}:
            client.timeout = 0.05
        w.shim_of(task).slow["Start"] = 0.2
        assert await task.start() == task.pid
        w.shim_of(task).slow["State"] = 0.2
        with pytest.raises(errdefs.DeadlineExceeded):
            await task.state()

    run(tmp_path, body)


def test_wait_answers_once_the_output_reached_the_client(tmp_path: Path) -> None:
    """A shim (containerd's runc shim) may answer Wait as soon as it reaped the process, its
    copy into the client's FIFO still running; ctr 1.6 closes the FIFO right after Wait and
    loses what it has not read. The Wait answers once the shim let go of the FIFO and the
    client read everything."""
    import os
    import subprocess

    out = tmp_path / "out"
    os.mkfifo(out)
    client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    # the shim's copy: a process holding the FIFO's write end
    copier = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=os.open(out, os.O_WRONLY | os.O_NONBLOCK))

    async def body(w: World) -> None:
        task = await w.create("ns", "echo", runtime=RUNC, stdio=Stdio(stdout=str(out)))
        w.shim_of(task).pid = copier.pid
        await task.start()
        waiter = asyncio.ensure_future(task.wait())
        assert copier.stdin is not None
        copier.stdin.write(b"the output\n")
        copier.stdin.flush()
        await task.kill(signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert not waiter.done(), "the shim is still copying"
        copier.stdin.close()
        await until(lambda: copier.poll() is not None)
        await asyncio.sleep(0.1)
        assert not waiter.done(), "the output waits in the FIFO"
        assert os.read(client, 100) == b"the output\n"
        assert (await waiter).status == 143

    try:
        run(tmp_path, body)
    finally:
        copier.kill()
        copier.wait()
        os.close(client)


def test_output_nobody_reads_holds_the_wait_a_bounded_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ketch import delivery

    monkeypatch.setattr(delivery, "TIMEOUT", 0.3)
    out = tmp_path / "out"
    os.mkfifo(out)
    client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(out, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"never read")
    os.close(writer)

    async def body(w: World) -> float:
        task = await w.create("ns", "echo", runtime=RUNC, stdio=Stdio(stdout=str(out), stderr=str(tmp_path / "gone")))
        await task.start()
        waiter = asyncio.ensure_future(task.wait())
        await task.kill(signal.SIGKILL)
        began = asyncio.get_running_loop().time()
        assert (await waiter).status == 137
        return asyncio.get_running_loop().time() - began

    try:
        assert 0.25 < run(tmp_path, body) < 2
    finally:
        os.close(client)


# -- a bundle is never removed through a mount ------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")


@contextlib.contextmanager
def image_files(tmp_path: Path) -> Iterator[Path]:
    """A directory standing for a container image's files (a snapshot's layer)."""
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "sh").write_text("the image's shell")
    try:
        yield image
    finally:
        system.unmount_under(str(tmp_path))


def _made_bundle(tmp_path: Path) -> Bundle:
    bundle = Bundle.at(str(tmp_path / "state"), str(tmp_path / "root"), "ns", "t")
    bundle.create(b"{}", {"runtime": KETCH, "binary": "/bin/true"})
    return bundle


@needs_root
def test_a_bundle_is_removed_after_unmounting_everything_in_its_rootfs(tmp_path: Path) -> None:
    """The rootfs is no mount itself but has one below it (umount of the rootfs says "not
    mounted"): that one is unmounted too, and the image's files are untouched."""
    with image_files(tmp_path) as image:
        bundle = _made_bundle(tmp_path)
        (bundle.path / "rootfs" / "data").mkdir()
        mount.mount(mount.Mount("bind", str(image), ("rbind",)), str(bundle.path / "rootfs" / "data"))
        bundle.delete()
        assert not bundle.path.exists() and not bundle.work.exists()
        assert (image / "bin" / "sh").read_text() == "the image's shell"


@needs_root
def test_a_bundle_whose_rootfs_will_not_unmount_is_left_in_place(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """umount fails (here a seam makes it; the mount is real): nothing is removed, and the
    error says what is mounted where."""
    with image_files(tmp_path) as image:
        bundle = _made_bundle(tmp_path)
        rootfs = bundle.path / "rootfs"
        mount.mount(mount.Mount("bind", str(image), ("rbind",)), str(rootfs))

        def refuse(target: str, flags: int = 0) -> bool:
            raise OSError(errno.EPERM, f"unmount {target}: Operation not permitted")

        monkeypatch.setattr(mount, "unmount", refuse)
        with pytest.raises(errdefs.FailedPrecondition, match="left in place.*will not unmount"):
            bundle.delete()
        # the unmount "succeeds" without unmounting: the mount is still seen, nothing goes
        monkeypatch.setattr(mount, "unmount", lambda target, flags=0: False)
        with pytest.raises(errdefs.FailedPrecondition, match=f"still mounted at {rootfs}"):
            bundle.delete()
        assert (rootfs / "bin" / "sh").read_text() == "the image's shell"
        assert (bundle.path / "config.json").exists() and bundle.work.exists()
        monkeypatch.undo()
        bundle.delete()
        assert not bundle.path.exists()
        assert (image / "bin" / "sh").read_text() == "the image's shell"


@needs_root
def test_a_task_whose_bundle_must_stay_stays_stopped_until_a_delete_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        with image_files(tmp_path) as image:
            task = await w.create("ns", "web")
            rootfs = w.bundle("ns", "web") / "rootfs"
            mount.mount(mount.Mount("bind", str(image), ("rbind",)), str(rootfs))
            await task.start()
            await task.kill(signal.SIGKILL)
            await task.wait()
            monkeypatch.setattr(mount, "unmount", lambda target, flags=0: False)
            with pytest.raises(errdefs.FailedPrecondition, match="still mounted"):
                await w.manager.delete("ns", "web")
            assert (rootfs / "bin" / "sh").exists() and w.bundle("ns", "web").exists()
            kept = w.manager.get("ns", "web")
            assert kept.phase is Phase.STOPPED
            assert ((await kept.state()).status, (await kept.state()).exit_status) == (3, 137)
            monkeypatch.undo()
            assert (await w.manager.delete("ns", "web")).status == 137
            assert not w.bundle("ns", "web").exists()
            assert (image / "bin" / "sh").read_text() == "the image's shell"
            with pytest.raises(errdefs.NotFound):
                w.manager.get("ns", "web")

    run(tmp_path, body)
