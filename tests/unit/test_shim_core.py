"""The shim's container core (shim/core.py) without root or runc: a scripted runc, real
child processes for exits, a publisher that records."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.oci.runc import classify
from ketch.shim.core import Container, Core
from ketch.shim.process import KILLED, Process, State
from ketch.shim.reaper import Monitor
from ketch.shim.stdio import Stdio

from .test_reaper import child, run


class _RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[object] = []

    def publish(self, event: object) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


class _ScriptedRunc:
    """Records the commands; a command named in ``errors`` fails with those runc words."""

    def __init__(self, **errors: str) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.errors = errors

    async def _run(self, *call: object) -> None:
        self.calls.append(call)
        if call[0] in self.errors:
            raise classify(f"runc {call[0]} failed: {self.errors[str(call[0])]}", 1)

    async def kill(self, id: str, sig: int, *, all: bool = False) -> None:
        await self._run("kill", id, sig, all)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._run("delete", id, force)

    async def pause(self, id: str) -> None:
        await self._run("pause", id)

    async def exec(self, id: str, process_file: str, *, pid_file: str, console_socket: str | None = None,
                   stdio: tuple[int | None, ...] = (None, None, None)) -> None:
        """Records (uid, gid) of each stdio fd it is handed; on success, starts a real process
        and writes its pid where runc would."""
        owners = [(os.fstat(fd).st_uid, os.fstat(fd).st_gid) if fd is not None else None for fd in stdio]
        await self._run("exec", id, owners)
        with open(pid_file, "w") as f:
            f.write(str(child("raise SystemExit(0)")))


def _core(monitor: Monitor, tmp_path: Path, runc: _ScriptedRunc,
          init: Process) -> tuple[Core, Container, _RecordingPublisher]:
    pub = _RecordingPublisher()
    core = Core(namespace="t", monitor=monitor, publisher=pub, runc_root=str(tmp_path))  # type: ignore[arg-type]
    container = Container("c1", str(tmp_path), runc, init)  # type: ignore[arg-type]
    core.containers["c1"] = container
    return core, container, pub


def test_exec_exits_are_published_before_the_init_exit(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> list[tuple[str, str, int]]:
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=child("raise SystemExit(0)"))
        core, container, pub = _core(monitor, tmp_path, _ScriptedRunc(), init)
        execs = [Process("c1", f"e{i}", Stdio(), state=State.RUNNING,
                         pid=child("import time; time.sleep(60)")) for i in range(3)]
        container.execs = {p.exec_id: p for p in execs}
        for p in [init, *execs]:
            core._spawn(core._on_exit(container, p, monitor.watch(p.pid)))
        await asyncio.wait_for(core.wait("c1", ""), 20)
        return [(type(e).__name__, e.id, e.exit_status) for e in pub.events]  # type: ignore[attr-defined]

    published = run(scenario)
    assert [name for name, _, _ in published] == ["TaskExit"] * 4
    assert [id for _, id, _ in published][-1] == "c1"
    assert sorted(id for _, id, _ in published[:3]) == ["e0", "e1", "e2"]
    assert all(status == 128 + signal.SIGKILL for _, id, status in published if id != "c1")


@pytest.mark.parametrize("words", ["container not running", 'container "c1" does not exist'])
def test_killing_a_finished_init_is_not_found(tmp_path: Path, words: str) -> None:
    async def scenario(monitor: Monitor) -> None:
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=12345)
        core, _, _ = _core(monitor, tmp_path, _ScriptedRunc(kill=words), init)
        with pytest.raises(errdefs.NotFound, match="task c1: process already finished"):
            await core.kill("c1", "", signal.SIGTERM)

    run(scenario)


def test_other_runc_failures_of_kill_pass_through(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> None:
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=12345)
        core, _, _ = _core(monitor, tmp_path, _ScriptedRunc(kill="permission denied"), init)
        with pytest.raises(errdefs.Unknown, match="runc kill failed: permission denied"):
            await core.kill("c1", "", signal.SIGTERM)

    run(scenario)


def test_deleting_a_created_task_reports_it_killed(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> tuple[list[tuple[object, ...]], list[str], int]:
        pid = child("import time; time.sleep(60)")
        init = Process("c1", "", Stdio(), pid=pid)
        runc = _ScriptedRunc()
        core, container, pub = _core(monitor, tmp_path, runc, init)
        core._spawn(core._on_exit(container, init, monitor.watch(pid)))
        proc = await core.delete("c1", "")
        assert proc.exited.is_set()  # a Wait answers at once
        os.kill(pid, signal.SIGKILL)  # what runc delete --force did to the real runc init
        await asyncio.wait_for(asyncio.gather(*core._tasks), 10)  # the exit handler finds it deleted
        assert "c1" not in core.containers
        return runc.calls, pub.names(), proc.exit_status

    calls, names, status = run(scenario)
    assert calls == [("delete", "c1", True)]
    assert names == ["TaskDelete"]  # no TaskExit for a process that never started
    assert status == KILLED


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED])
def test_a_live_task_is_not_deleted_and_runc_is_not_asked(tmp_path: Path, state: State) -> None:
    async def scenario(monitor: Monitor) -> list[tuple[object, ...]]:
        runc = _ScriptedRunc()
        core, _, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=state, pid=12345))
        with pytest.raises(errdefs.FailedPrecondition, match=f"in {state.name.lower()} state"):
            await core.delete("c1", "")
        return runc.calls

    assert run(scenario) == []


def test_an_exec_added_but_not_started(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> list[str]:
        core, container, pub = _core(monitor, tmp_path, _ScriptedRunc(),
                                     Process("c1", "", Stdio(), state=State.RUNNING, pid=12345))
        core.exec("c1", "e1", stdio=Stdio(), spec=b'{"args": ["true"]}')
        with pytest.raises(errdefs.AlreadyExists):
            core.exec("c1", "e1", stdio=Stdio(), spec=b'{"args": ["true"]}')
        with pytest.raises(errdefs.FailedPrecondition, match="not started"):
            await core.kill("c1", "e1", signal.SIGKILL)
        waiter = asyncio.ensure_future(core.wait("c1", "e1"))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        proc = await core.delete("c1", "e1")
        assert (proc.state, proc.exit_status) == (State.DELETED, 0)
        async with asyncio.timeout(1):
            assert (await waiter) is proc, "a Wait on an exec deleted before it ran ends"
        assert "e1" not in container.execs
        return pub.names()

    assert run(scenario) == ["TaskExecAdded"]


def test_pause_asks_runc_then_moves(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> tuple[State, list[str]]:
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=12345)
        core, _, pub = _core(monitor, tmp_path, _ScriptedRunc(), init)
        await core.pause("c1")
        with pytest.raises(errdefs.FailedPrecondition, match="cannot pause task c1 in paused state"):
            await core.pause("c1")
        return init.state, pub.names()

    assert run(scenario) == (State.PAUSED, ["TaskPaused"])


def test_a_failed_pause_moves_nothing(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> State:
        init = Process("c1", "", Stdio(), state=State.RUNNING, pid=12345)
        core, _, _ = _core(monitor, tmp_path, _ScriptedRunc(pause="container not running"), init)
        with pytest.raises(errdefs.NotFound):
            await core.pause("c1")
        return init.state

    assert run(scenario) == State.RUNNING


def test_a_wait_on_an_exec_whose_start_failed_ends(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> None:
        core, container, pub = _core(monitor, tmp_path, _ScriptedRunc(),
                                     Process("c1", "", Stdio(), state=State.RUNNING, pid=12345))
        core.exec("c1", "e1", stdio=Stdio(), spec=b'{"args": ["/no/such/binary"]}')
        waiter = asyncio.ensure_future(core.wait("c1", "e1"))

        async def failing_exec(container: Container, proc: Process) -> None:
            raise errdefs.Unknown("OCI runtime exec failed: exec: no such file")

        core._start_exec = failing_exec  # type: ignore[method-assign]
        with pytest.raises(errdefs.Unknown, match="exec failed"):
            await core.start("c1", "e1")
        async with asyncio.timeout(1):
            proc = await waiter
        assert proc.state == State.CREATED and proc.exit_status == 0
        assert (await core.delete("c1", "e1")).state == State.DELETED

    run(scenario)


def test_a_delete_waits_for_a_start_in_flight(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> None:
        core, container, pub = _core(monitor, tmp_path, _ScriptedRunc(),
                                     Process("c1", "", Stdio(), state=State.RUNNING, pid=12345))
        core.exec("c1", "e1", stdio=Stdio(), spec=b'{"args": ["sleep", "1"]}')
        gate = asyncio.Event()

        async def slow_exec(container: Container, proc: Process) -> None:
            await gate.wait()
            proc.pid = 4242

        core._start_exec = slow_exec  # type: ignore[method-assign]
        starting = asyncio.ensure_future(core.start("c1", "e1"))
        await asyncio.sleep(0.01)
        deleting = asyncio.ensure_future(core.delete("c1", "e1"))
        await asyncio.sleep(0.01)
        assert not deleting.done(), "Delete waits for the Start of the same exec"
        gate.set()
        assert (await starting).state == State.RUNNING
        with pytest.raises(errdefs.FailedPrecondition, match="running"):
            await deleting
        assert "e1" in container.execs

    run(scenario)


@pytest.mark.parametrize("type_url", ["containerd.runc.v1.Options", "containerd.linux.runc.CreateOptions"])
def test_runtime_options_that_do_not_decode_are_invalid_argument(type_url: str) -> None:
    from ketch.shim.options import RuntimeOptions

    with pytest.raises(errdefs.InvalidArgument, match="do not decode"):
        RuntimeOptions.from_any(type_url, b"\xff\xff\xff", "/run/x")
    with pytest.raises(errdefs.InvalidArgument, match="unsupported runtime options type"):
        RuntimeOptions.from_any("example.com/Other", b"", "/run/x")


def _fifos(tmp_path: Path) -> tuple[Stdio, list[int]]:
    """A client's stdio FIFOs, with the client's readers open."""
    paths = {}
    for name in ("stdin", "stdout", "stderr"):
        paths[name] = str(tmp_path / name)
        os.mkfifo(paths[name])
    return Stdio(**paths), [os.open(paths[n], os.O_RDONLY | os.O_NONBLOCK) for n in ("stdout", "stderr")]


def test_an_exec_gets_stdio_owned_by_io_uid_and_io_gid(tmp_path: Path) -> None:
    """The runtime options' io_uid/io_gid own an exec's pipes as they do the init's (a process
    in a user namespace must be able to reopen /proc/self/fd/1), as containerd's runc shim."""
    from ketch.shim.options import RuntimeOptions

    stdio, readers = _fifos(tmp_path)

    async def scenario(monitor: Monitor) -> list[tuple[object, ...]]:
        runc = _ScriptedRunc()
        core, container, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=State.RUNNING, pid=1))
        container.options = RuntimeOptions(io_uid=1234, io_gid=5678)
        core.exec("c1", "e1", stdio=stdio, spec=b'{"args": ["true"]}')
        await core.start("c1", "e1")
        await asyncio.wait_for(core.wait("c1", "e1"), 10)
        await core.delete("c1", "e1")
        return runc.calls

    try:
        calls = run(scenario)
    finally:
        for fd in readers:
            os.close(fd)
    assert calls == [("exec", "c1", [(1234, 5678)] * 3)]


@pytest.mark.parametrize("failure", ["runc exec fails", "start cancelled waiting for its logger"])
def test_a_failed_exec_start_leaves_no_fd(tmp_path: Path, failure: str) -> None:
    """Whatever fails once an exec's stdio exists (runc exec after the pipes were made, a
    Start cancelled while its logging binary gets ready), every fd it opened is closed."""
    stdio, readers = _fifos(tmp_path)
    if failure != "runc exec fails":
        logger = tmp_path / "logger"
        logger.write_text("#!/bin/sh\nexec sleep 60\n")  # never says it is ready
        logger.chmod(0o755)
        stdio = Stdio(stdout=f"binary://{logger}", stderr=f"binary://{logger}")

    async def scenario(monitor: Monitor) -> tuple[set[str], set[str]]:
        runc = _ScriptedRunc(exec="exec failed: no such file")
        core, container, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=State.RUNNING, pid=1))
        core.exec("c1", "e1", stdio=stdio, spec=b'{"args": ["true"]}')
        before = set(os.listdir("/proc/self/fd"))
        starting = asyncio.ensure_future(core.start("c1", "e1"))
        if failure == "runc exec fails":
            with pytest.raises(errdefs.Unknown, match="exec failed"):
                await starting
            assert runc.calls, "runc exec ran, with the pipes made"
        else:
            await asyncio.sleep(0.3)
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
        await asyncio.sleep(0.05)
        return before, set(os.listdir("/proc/self/fd"))

    try:
        before, after = run(scenario)
    finally:
        for fd in readers:
            os.close(fd)
    assert after == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".exec-")]


def test_start_reads_shim_cgroup_from_the_runtime_options_without_protobuf() -> None:
    """``start`` gets the runtime options (a marshalled Any) on stdin and decodes shim_cgroup
    itself (it stays light); only containerd.runc.v1.Options carries it, as containerd's runc
    shim reads it; options that do not decode ask for none (Create then refuses them)."""
    from google.protobuf import any_pb2

    from ketch.api.containerd.linux.runctypes import runc_pb2
    from ketch.api.containerd.runc.options import oci_pb2
    from ketch.shim.common import shim_cgroup

    opts = oci_pb2.Options(no_pivot_root=True, shim_cgroup="/pods/a b", io_uid=100000, io_gid=100000,
                           binary_name="runc", root="/run/x", systemd_cgroup=True, criu_work_path="/w")
    for type_url in ("containerd.runc.v1.Options", "types.googleapis.com/containerd.runc.v1.Options"):
        assert shim_cgroup(any_pb2.Any(type_url=type_url, value=opts.SerializeToString()).SerializeToString()) == \
            "/pods/a b"
    assert shim_cgroup(any_pb2.Any(type_url="containerd.runc.v1.Options",
                                   value=oci_pb2.Options(root="/r").SerializeToString()).SerializeToString()) == ""
    other = runc_pb2.CreateOptions(shim_cgroup="/v1").SerializeToString()
    assert shim_cgroup(any_pb2.Any(type_url="containerd.linux.runc.CreateOptions", value=other).SerializeToString()) == ""
    for bad in (b"", b"\xff", b"\x0a\x05abc", b"\x0a\x1acontainerd.runc.v1.Options\x12\x03\x1a\x09x"):
        assert shim_cgroup(bad) == ""


def test_an_exit_is_reported_once_the_client_read_the_output(tmp_path: Path) -> None:
    """ctr 1.6 closes its FIFOs as soon as Wait answers: what is still in them then is lost.
    Wait and /tasks/exit come once the client has read it (our FIFO buffers are large)."""
    out = tmp_path / "out"
    os.mkfifo(out)
    client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(out, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"left in the fifo")
    os.close(writer)

    async def scenario(monitor: Monitor) -> bytes:
        init = Process("c1", "", Stdio(stdout=str(out)), state=State.RUNNING, pid=child("raise SystemExit(0)"))
        core, container, pub = _core(monitor, tmp_path, _ScriptedRunc(), init)
        core._spawn(core._on_exit(container, init, monitor.watch(init.pid)))
        waiter = asyncio.ensure_future(core.wait("c1", ""))
        await asyncio.sleep(0.3)
        assert not waiter.done() and pub.events == []
        got = os.read(client, 100)
        await asyncio.wait_for(waiter, 5)
        assert pub.names() == ["TaskExit"]
        return got

    try:
        assert run(scenario) == b"left in the fifo"
    finally:
        os.close(client)


# -- checkpoint / restore ----------------------------------------------------------------------

class _CheckpointingRunc(_ScriptedRunc):
    """checkpoint writes criu's dump.log into its work directory (and fails if told to);
    restore starts a real process and writes its pid where runc would."""

    async def checkpoint(self, id: str, args: list[str]) -> None:
        work = args[args.index("--work-path") + 1]
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "dump.log"), "w") as f:
            f.write("".join(f"(0.{i:04d}) dump step {i}\n" for i in range(40)))
            f.write("Error (criu/sk-unix.c:1): unix: Can't dump external socket\n")
        await self._run("checkpoint", id, args)

    async def restore(self, id: str, bundle: str, *, image: str, work: str, parent: str, pid_file: str,
                      console_socket: str | None, stdio: tuple[int | None, ...], no_pivot: bool) -> None:
        if "restore" in self.errors:
            os.makedirs(work, exist_ok=True)
            with open(os.path.join(work, "restore.log"), "w") as f:
                f.write("(0.01) Error (criu/files-reg.c:1): File tmp/gone has bad size 4 (expect 8)\n(0.02) end\n")
        await self._run("restore", id, image, work, parent)
        with open(pid_file, "w") as f:
            f.write(str(child("import time; time.sleep(60)")))


def _criu(tmp_path: Path, ok: bool = True) -> str:
    path = tmp_path / "criu"
    path.write_text("#!/bin/sh\n" + ("exit 0\n" if ok else "echo 'vdso: Failed to fill self vdso symtable' >&2; exit 1\n"))
    path.chmod(0o700)
    return str(path)


@pytest.mark.parametrize("state", [State.CREATED, State.STOPPED])
def test_only_a_live_task_is_checkpointed(tmp_path: Path, state: State) -> None:
    async def scenario(monitor: Monitor) -> list[tuple[object, ...]]:
        runc = _CheckpointingRunc()
        core, container, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=state, pid=12345))
        container.options.criu_path = _criu(tmp_path)
        with pytest.raises(errdefs.FailedPrecondition, match=f"cannot checkpoint task c1 in {state.name.lower()} state"):
            await core.checkpoint("c1", str(tmp_path / "image"), ("", b""))
        return runc.calls

    assert run(scenario) == []


def test_checkpoint_without_a_working_criu_does_not_ask_runc(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> list[tuple[object, ...]]:
        runc = _CheckpointingRunc()
        core, container, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=State.RUNNING, pid=1))
        container.options.criu_path = _criu(tmp_path, ok=False)
        with pytest.raises(errdefs.FailedPrecondition, match="criu check failed .*: vdso: Failed"):
            await core.checkpoint("c1", str(tmp_path / "image"), ("", b""))
        return runc.calls

    assert run(scenario) == []


def test_a_failed_dump_quotes_criu_and_keeps_its_log(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> tuple[str, list[tuple[object, ...]]]:
        runc = _CheckpointingRunc(checkpoint="criu failed: type NOTIFY errno 0")
        core, container, _ = _core(monitor, tmp_path, runc, Process("c1", "", Stdio(), state=State.PAUSED, pid=1))
        container.options.criu_path = _criu(tmp_path)
        with pytest.raises(errdefs.Unknown) as e:
            await core.checkpoint("c1", str(tmp_path / "image"), ("", b""))
        return str(e.value), runc.calls

    message, calls = run(scenario)
    work = str(tmp_path / "work" / "criu-work")
    assert calls == [("checkpoint", "c1", ["--image-path", str(tmp_path / "image"), "--work-path", work,
                                           "--leave-running"])]
    assert message == ("runc checkpoint failed: criu failed: type NOTIFY errno 0\n"
                       f"criu's log ({tmp_path}/criu-dump.log) says:\n"
                       "Error (criu/sk-unix.c:1): unix: Can't dump external socket")
    assert "Can't dump external socket" in (tmp_path / "criu-dump.log").read_text()
    assert not os.path.exists(work), "the default work directory is removed"


class _Keeper:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, object]] = {}

    def put(self, key: str, data: dict[str, object], fds: dict[str, int] | None = None) -> None:
        self.records[key] = data

    def drop(self, key: str) -> None:
        self.records = {k: v for k, v in self.records.items() if not k.startswith(key)}

    def ack(self, pid: int) -> None:
        pass


def test_a_task_created_from_a_checkpoint_is_restored_by_its_start(tmp_path: Path) -> None:
    """As containerd's runc shim: Create records the checkpoint (pid 0, nothing runs), Start runs
    runc restore; the restored init is then a task like a created one (watched, recorded)."""
    bundle, image = tmp_path / "bundle", tmp_path / "image"
    bundle.mkdir()
    image.mkdir()
    (bundle / "config.json").write_text('{"process": {"args": ["sh"]}}')

    async def scenario(monitor: Monitor) -> None:
        runc = _CheckpointingRunc()
        pub = _RecordingPublisher()
        core = Core(namespace="t", monitor=monitor, publisher=pub, runc_root=str(tmp_path / "state"))
        core._runc = lambda opts, bundle: runc  # type: ignore[assignment,method-assign,return-value]
        keeper = core.keeper = _Keeper()
        with pytest.raises(errdefs.InvalidArgument, match="is not a directory"):
            await core.create("c1", bundle=str(bundle), rootfs=[], stdio=Stdio(), options=("", b""),
                              checkpoint=str(tmp_path / "absent"))
        from ketch.api.containerd.runc.options import oci_pb2

        options = ("containerd.runc.v1.Options", oci_pb2.Options(criu_path=_criu(tmp_path)).SerializeToString())
        container = await core.create("c1", bundle=str(bundle), rootfs=[], stdio=Stdio(), options=options,
                                      checkpoint=str(image), parent_checkpoint="/parent")
        assert (container.init.pid, container.init.state) == (0, State.CREATED)
        assert runc.calls == []
        assert keeper.records["c/c1"]["checkpoint"] == str(image)
        [created] = pub.events
        assert (type(created).__name__, created.checkpoint, created.pid) == ("TaskCreate", str(image), 0)  # type: ignore[attr-defined]

        proc = await core.start("c1", "")
        assert runc.calls == [("restore", "c1", str(image), str(bundle / "work"), "/parent")]
        assert proc.state == State.RUNNING and proc.pid > 0
        assert keeper.records["p/c1/-"]["pid"] == proc.pid
        assert keeper.records["c/c1"]["checkpoint"] == ""
        assert [type(e).__name__ for e in pub.events] == ["TaskCreate", "TaskStart"]
        assert pub.events[1].pid == proc.pid  # type: ignore[attr-defined]

        os.kill(proc.pid, signal.SIGKILL)  # its exit is reported as a created init's
        async with asyncio.timeout(10):
            await core.wait("c1", "")
        assert proc.exit_status == 128 + signal.SIGKILL
        assert pub.names()[-1] == "TaskExit"

    run(scenario)


def test_a_successor_shim_restores_a_task_whose_start_has_not_come(tmp_path: Path) -> None:
    """Taken over between Create (from a checkpoint) and Start: the keeper's record says which
    checkpoint, and the successor's Start restores from it, with stdio made anew."""
    bundle, image = tmp_path / "bundle", tmp_path / "image"
    bundle.mkdir()
    image.mkdir()
    out = tmp_path / "out.log"

    async def scenario(monitor: Monitor) -> None:
        runc = _CheckpointingRunc()
        core = Core(namespace="t", monitor=monitor, publisher=_RecordingPublisher(), runc_root=str(tmp_path / "s"))
        core._runc = lambda opts, bundle: runc  # type: ignore[assignment,method-assign,return-value]
        from ketch.shim.options import RuntimeOptions

        RuntimeOptions(criu_path=_criu(tmp_path)).save(str(bundle))
        stdio = {"stdin": "", "stdout": f"file://{out}", "stderr": "", "terminal": False}
        core.restore({"c/c1": ({"bundle": str(bundle), "mounted_rootfs": False, "checkpoint": str(image),
                                "parent_checkpoint": ""}, {}),
                      "p/c1/-": ({"state": int(State.CREATED), "pid": 0, "exit_status": 0, "exited_at": 0.0,
                                  "stdio": stdio, "spec": "", "logger": 0}, {})}, {})
        container = core.container("c1")
        assert (container.checkpoint, container.init.io) == (str(image), None)
        proc = await core.start("c1", "")
        assert runc.calls == [("restore", "c1", str(image), str(bundle / "work"), "")]
        assert proc.state == State.RUNNING and proc.io is not None and out.exists()
        os.kill(proc.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            await core.wait("c1", "")

    run(scenario)


def test_a_failed_restore_quotes_criu_and_leaves_the_task_created(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> None:
        runc = _CheckpointingRunc(restore="criu failed: type RESTORE errno 0")
        core, container, pub = _core(monitor, tmp_path, runc, Process("c1", "", Stdio()))
        container.options.criu_path = _criu(tmp_path)
        container.checkpoint = str(tmp_path)
        container.init.io = core._make_io(container, Stdio())
        with pytest.raises(errdefs.Unknown) as e:
            await core.start("c1", "")
        assert str(e.value) == ("runc restore failed: criu failed: type RESTORE errno 0\n"
                                f"criu's log ({tmp_path}/work/restore.log) says:\n"
                                "(0.01) Error (criu/files-reg.c:1): File tmp/gone has bad size 4 (expect 8)")
        assert (container.init.state, container.init.pid, pub.names()) == (State.CREATED, 0, [])
        await core.delete("c1", "")  # and it deletes as a created task
        assert "c1" not in core.containers

    run(scenario)
