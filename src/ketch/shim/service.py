"""containerd.task.v2.Task: the shim's task service, over the runc command line.

One service instance can hold several containers (each call names its task by id), which is
what lets a group of tasks share one shim process. Per container it keeps the init process,
its execs, its stdio and its OOM watch; process state moves only through ``process.py``.

Ordering guarantees, all relied on by containerd's clients:
* /tasks/start (or exec-started) is published before that process's /tasks/exit: start and
  exit handling take the process's lock.
* A process's /tasks/exit is published after its output is drained (bounded) and before its
  Wait returns.
* Exec exits are published before the init exit of the same container.
* /tasks/oom is published before the /tasks/exit of the OOM-killed init.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import empty_pb2, timestamp_pb2

from ketch import __version__, errdefs, mount, ttrpc
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.task.v2 import shim_pb2 as api
from ketch.cgroups import Cgroup, OOMWatch
from ketch.files import write_atomic
from ketch.oci.runc import Runc, spawn
from ketch.shim.process import Process, State
from ketch.shim.publisher import Publisher
from ketch.shim.reaper import Monitor
from ketch.shim.stdio import Logger, LoggerSpawn, ProcessIO, Stdio

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
#: how long the init exit waits for exec exits to be published first
EXEC_EXIT_GRACE = 5.0


@dataclass
class RuntimeOptions:
    """What the shim takes from containerd.runc.v1.Options / containerd.linux.runc.CreateOptions."""

    binary_name: str = "runc"
    root: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    io_uid: int = -1
    io_gid: int = -1

    @classmethod
    def from_any(cls, type_url: str, value: bytes, default_root: str) -> RuntimeOptions:
        opts = cls(root=default_root)
        name = type_url.rsplit("/", 1)[-1]
        if not type_url:
            return opts
        if name == "containerd.runc.v1.Options":
            from ketch.api.containerd.runc.options import oci_pb2

            o: Any = oci_pb2.Options.FromString(value)
            opts.binary_name = o.binary_name or opts.binary_name
            opts.root = o.root or opts.root
            opts.systemd_cgroup = o.systemd_cgroup
        elif name == "containerd.linux.runc.CreateOptions":
            from ketch.api.containerd.linux.runctypes import runc_pb2

            o = runc_pb2.CreateOptions.FromString(value)
        else:
            raise errdefs.InvalidArgument(f"unsupported runtime options type {type_url!r}")
        opts.no_pivot_root = o.no_pivot_root
        opts.no_new_keyring = o.no_new_keyring
        if o.io_uid or o.io_gid:
            opts.io_uid, opts.io_gid = o.io_uid, o.io_gid
        return opts

    def save(self, bundle: str) -> None:
        """options.json in the bundle: what the ``delete`` action needs to find runc's state."""
        write_atomic(os.path.join(bundle, "options.json"), json.dumps(self.__dict__).encode(), durable=False)

    @classmethod
    def load(cls, bundle: str, default_root: str) -> RuntimeOptions:
        try:
            with open(os.path.join(bundle, "options.json")) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return cls(root=default_root)


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    runc: Runc
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    mounted_rootfs: bool = False
    cgroup: Cgroup | None = None
    oom: OOMWatch | None = None

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errdefs.NotFound(f"exec {exec_id!r} of task {self.id!r}") from None


def _set_ts(ts: timestamp_pb2.Timestamp, t: float) -> None:
    if t:
        ts.seconds = int(t)
        ts.nanos = int((t - int(t)) * 1e9)


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class Lifetime:
    """When a shim with no task left goes away. A shim serving one task exits as soon as
    Shutdown finds it empty; a shared (grouped) shim lingers a while for the group's next task,
    which then needs no new process. Once it decides to go it refuses new tasks
    (Unavailable), so the caller starts a fresh shim."""

    def __init__(self, linger: float, on_exit: Callable[[], None]) -> None:
        self.linger = linger
        self.closing = False
        self._on_exit = on_exit
        self._timer: asyncio.TimerHandle | None = None

    def busy(self) -> None:
        if self.closing:
            raise errdefs.Unavailable("the shim is shutting down; start another")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def idle(self, now: bool = False) -> None:
        if now or self.linger <= 0:
            self._exit()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._exit)

    def _exit(self) -> None:
        self.closing = True
        self._on_exit()


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        monitor: Monitor,
        publisher: Publisher,
        runc_root: str,
        lifetime: Lifetime | None = None,
    ) -> None:
        self.namespace = namespace
        self.monitor = monitor
        self.publisher = publisher
        self.runc_root = runc_root
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self.lifetime = lifetime
        self._tasks: set[asyncio.Task[None]] = set()

    # -- helpers ---------------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        try:
            return self.containers[id]
        except KeyError:
            raise errdefs.NotFound(f"task {id!r} in namespace {self.namespace!r}") from None

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def register(self, server: ttrpc.Server) -> None:
        M = ttrpc.Method
        server.register(SERVICE, {
            "State": M(api.StateRequest, self.state),
            "Create": M(api.CreateTaskRequest, self.create),
            "Start": M(api.StartRequest, self.start),
            "Delete": M(api.DeleteRequest, self.delete),
            "Pids": M(api.PidsRequest, self.pids),
            "Pause": M(api.PauseRequest, self.pause),
            "Resume": M(api.ResumeRequest, self.resume),
            "Checkpoint": M(api.CheckpointTaskRequest, self.checkpoint),
            "Kill": M(api.KillRequest, self.kill),
            "Exec": M(api.ExecProcessRequest, self.exec),
            "ResizePty": M(api.ResizePtyRequest, self.resize_pty),
            "CloseIO": M(api.CloseIORequest, self.close_io),
            "Update": M(api.UpdateTaskRequest, self.update),
            "Wait": M(api.WaitRequest, self.wait),
            "Stats": M(api.StatsRequest, self.stats),
            "Connect": M(api.ConnectRequest, self.connect),
            "Shutdown": M(api.ShutdownRequest, self.shutdown),
        })

    # -- create / start ------------------------------------------------------------------------

    async def create(self, req: api.CreateTaskRequest, ctx: ttrpc.Context) -> api.CreateTaskResponse:
        if not req.id:
            raise errdefs.InvalidArgument("task id must not be empty")
        if req.id in self.containers or req.id in self._creating:
            raise errdefs.AlreadyExists(f"task {req.id}")
        if req.checkpoint or req.parent_checkpoint:
            raise errdefs.Unimplemented("restoring a task from a checkpoint is not supported yet")
        bundle = req.bundle or os.getcwd()
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise errdefs.InvalidArgument(f"bundle {bundle!r} has no config.json")
        opts = RuntimeOptions.from_any(req.options.type_url, req.options.value, self.runc_root)
        if self.lifetime is not None:
            self.lifetime.busy()
        self._creating.add(req.id)
        try:
            container = await self._create(req, bundle, opts)
        finally:
            self._creating.discard(req.id)
        self.containers[req.id] = container
        init = container.init
        self.publisher.publish(events.TaskCreate(
            container_id=req.id, bundle=bundle, rootfs=req.rootfs, pid=init.pid,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
            checkpoint=req.checkpoint,
        ))
        return api.CreateTaskResponse(pid=init.pid)

    async def _create(self, req: api.CreateTaskRequest, bundle: str, opts: RuntimeOptions) -> Container:
        os.makedirs(opts.root, mode=0o711, exist_ok=True)
        opts.save(bundle)
        runc = Runc(self.monitor, binary=opts.binary_name, root=opts.root,
                    log_path=os.path.join(bundle, "log.json"), systemd_cgroup=opts.systemd_cgroup)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        init = Process(req.id, "", stdio)
        container = Container(req.id, bundle, runc, init)
        rootfs = os.path.join(bundle, "rootfs")
        io: ProcessIO | None = None
        try:
            if req.rootfs:
                os.makedirs(rootfs, mode=0o711, exist_ok=True)
                mount.mount_all((mount.Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs), rootfs)
                container.mounted_rootfs = True
            io = init.io = ProcessIO.create(stdio, uid=opts.io_uid, gid=opts.io_gid,
                                            logger=self._logger_spawner(req.id))
            await io.ready()
            pid_file = os.path.join(bundle, "init.pid")
            init.pid, exited = await self._run_process(io, pid_file, lambda console, stdio: runc.create(
                req.id, bundle, pid_file=pid_file, console_socket=console, stdio=stdio,
                no_pivot=opts.no_pivot_root, no_new_keyring=opts.no_new_keyring))
        except BaseException:
            if io is not None:
                io.close()
            with contextlib.suppress(Exception):
                await runc.delete(req.id, force=True)
            if container.mounted_rootfs:
                mount.unmount_all(rootfs)
            raise
        self._spawn(self._on_exit(container, init, exited))
        self._watch_oom(container)
        return container

    async def _run_process(
        self,
        io: ProcessIO,
        pid_file: str,
        run: Callable[[str | None, tuple[int | None, ...]], Awaitable[None]],
    ) -> tuple[int, asyncio.Future[int]]:
        """Run runc create/exec for a process with ``io``; its pid and a future for its exit.

        The reaper holds exits while runc runs, so a process that exits before its pid file
        is read is still caught; with a terminal, the pty master is received meanwhile."""
        with self.monitor.hold():
            console = asyncio.ensure_future(io.attach_console()) if io.console else None
            try:
                await run(io.console.path if io.console else None, tuple(io.runtime_fds))
                if console is not None:
                    await console
            except BaseException:
                if console is not None:
                    console.cancel()
                    with contextlib.suppress(BaseException):
                        await console
                raise
            finally:
                io.after_spawn()
            pid = _read_pid(pid_file)
            return pid, self.monitor.watch(pid)

    def _logger_spawner(self, container_id: str) -> LoggerSpawn:
        """Starts the logging binary of a binary:// stdio; the reaper collects its exit."""

        def spawn_logger(target: str, out_r: int, err_r: int) -> Logger:
            argv = Logger.argv(target)
            if not os.path.isabs(argv[0]):
                raise errdefs.InvalidArgument(f"binary:// logger {argv[0]!r} must be an absolute path")
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                pid = spawn(argv, env={"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": self.namespace},
                            fds={3: out_r, 4: err_r, 5: ready_w})
            except OSError as e:
                os.close(ready_r)
                raise errdefs.InvalidArgument(f"binary:// logger {argv[0]!r}: {e.strerror}") from None
            finally:
                os.close(ready_w)
            return Logger(pid, ready_r, self.monitor.watch(pid))

        return spawn_logger

    def _watch_oom(self, container: Container) -> None:
        try:
            container.cgroup = Cgroup.of_pid(container.init.pid)
            container.oom = OOMWatch(container.cgroup)
        except OSError as e:
            log.warning("no OOM watch for %s: %s", container.id, e)
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(container.oom.fd, self._check_oom, container)

    def _check_oom(self, container: Container) -> None:
        if container.oom is not None and container.oom.check():
            log.info("container %s: OOM", container.id)
            self.publisher.publish(events.TaskOOM(container_id=container.id))

    def _stop_oom(self, container: Container) -> None:
        if container.oom is not None:
            self._check_oom(container)
            asyncio.get_running_loop().remove_reader(container.oom.fd)
            container.oom.close()
            container.oom = None

    async def start(self, req: api.StartRequest, ctx: ttrpc.Context) -> api.StartResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        async with proc.lock:
            proc.require("start")
            if req.exec_id:
                await self._start_exec(container, proc)
                proc.transition("start")
                self.publisher.publish(events.TaskExecStarted(
                    container_id=container.id, exec_id=proc.exec_id, pid=proc.pid))
            else:
                await container.runc.start(container.id)
                proc.transition("start")
                self.publisher.publish(events.TaskStart(container_id=container.id, pid=proc.pid))
        return api.StartResponse(pid=proc.pid)

    async def _start_exec(self, container: Container, proc: Process) -> None:
        io = proc.io = ProcessIO.create(proc.stdio, logger=self._logger_spawner(container.id))
        fd, spec_file = tempfile.mkstemp(prefix=".exec-", suffix=".json", dir=container.bundle)
        pid_file = spec_file[:-len(".json")] + ".pid"
        try:
            await io.ready()
            with os.fdopen(fd, "wb") as f:
                f.write(proc.spec)
            proc.pid, exited = await self._run_process(io, pid_file, lambda console, stdio: container.runc.exec(
                container.id, spec_file, pid_file=pid_file, console_socket=console, stdio=stdio))
        except BaseException:
            io.close()
            proc.io = None
            raise
        finally:
            for path in (spec_file, pid_file):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._spawn(self._on_exit(container, proc, exited))

    # -- exits ---------------------------------------------------------------------------------

    async def _on_exit(self, container: Container, proc: Process, exited: asyncio.Future[int]) -> None:
        status = await exited
        async with proc.lock:
            if proc is container.init:
                await self._after_init_exit(container)
            if proc.io is not None:
                await proc.io.drain()
                proc.io.close()
            if not proc.record_exit(status):
                return
            self.publisher.publish(events.TaskExit(
                container_id=container.id, id=proc.id, pid=proc.pid, exit_status=proc.exit_status,
                exited_at=_timestamp(proc.exited_at)))
            proc.mark_exited()
        log.info("process exited container=%s id=%s pid=%d status=%d", container.id, proc.id, proc.pid, status)

    async def _after_init_exit(self, container: Container) -> None:
        """Before the init exit is published: report a pending OOM, and let the execs (which
        die with the container) be reported first."""
        self._stop_oom(container)
        running = [p for p in container.execs.values() if p.running]
        if not running:
            return
        # a container sharing the host's pid namespace keeps its execs alive: end them
        with contextlib.suppress(errdefs.KetchError):
            await container.runc.kill(container.id, signal.SIGKILL, all=True)
        for p in running:
            with contextlib.suppress(errdefs.KetchError):
                p.signal(signal.SIGKILL)
        await asyncio.wait([asyncio.ensure_future(p.exited.wait()) for p in running], timeout=EXEC_EXIT_GRACE)

    # -- queries -------------------------------------------------------------------------------

    async def state(self, req: api.StateRequest, ctx: ttrpc.Context) -> api.StateResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        s = proc.stdio
        resp = api.StateResponse(
            id=proc.id, bundle=container.bundle, pid=proc.pid, status=cast(Any, int(proc.state)),
            stdin=s.stdin, stdout=s.stdout, stderr=s.stderr, terminal=s.terminal,
            exit_status=proc.exit_status, exec_id=proc.exec_id,
        )
        _set_ts(resp.exited_at, proc.exited_at)
        return resp

    async def pids(self, req: api.PidsRequest, ctx: ttrpc.Context) -> api.PidsResponse:
        container = self._container(req.id)
        pids = await container.runc.ps(container.id)
        by_pid = {p.pid: p.exec_id for p in container.execs.values() if p.pid}
        resp = api.PidsResponse()
        for pid in pids:
            info = resp.processes.add(pid=pid)
            exec_id = by_pid.get(pid)
            if exec_id:  # as containerd's runc shim: an exec's pid carries its exec id
                from ketch.api.containerd.runc.options import oci_pb2

                details = oci_pb2.ProcessDetails(exec_id=exec_id)
                info.info.type_url = details.DESCRIPTOR.full_name
                info.info.value = details.SerializeToString()
        return resp

    async def stats(self, req: api.StatsRequest, ctx: ttrpc.Context) -> api.StatsResponse:
        container = self._container(req.id)
        container.init.check("stats")
        if container.cgroup is None:
            raise errdefs.Unavailable(f"task {req.id}: its cgroup is not known")
        type_url, value = container.cgroup.metrics()
        resp = api.StatsResponse()
        resp.stats.type_url = type_url
        resp.stats.value = value
        return resp

    async def connect(self, req: api.ConnectRequest, ctx: ttrpc.Context) -> api.ConnectResponse:
        container = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0,
                                   version=__version__)

    async def wait(self, req: api.WaitRequest, ctx: ttrpc.Context) -> api.WaitResponse:
        proc = self._container(req.id).process(req.exec_id)
        await proc.exited.wait()
        resp = api.WaitResponse(exit_status=proc.exit_status)
        _set_ts(resp.exited_at, proc.exited_at)
        return resp

    # -- control -------------------------------------------------------------------------------

    async def kill(self, req: api.KillRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        proc.check("kill")
        if req.exec_id:
            proc.signal(req.signal)
        else:
            try:
                await container.runc.kill(container.id, req.signal, all=req.all)
            except errdefs.KetchError as e:
                if "not running" in str(e) or "does not exist" in str(e):
                    raise errdefs.NotFound(f"task {req.id}: process already finished") from None
                raise
        return empty_pb2.Empty()

    async def pause(self, req: api.PauseRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        container = self._container(req.id)
        await self._freeze(container, "pause", container.runc.pause)
        self.publisher.publish(events.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    async def resume(self, req: api.ResumeRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        container = self._container(req.id)
        await self._freeze(container, "resume", container.runc.resume)
        self.publisher.publish(events.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    async def _freeze(self, container: Container, op: str, run: Callable[[str], Awaitable[None]]) -> None:
        """Pause or resume the whole container: check the move, ask runc, then make it."""
        async with container.init.lock:
            container.init.require(op)
            await run(container.id)
            container.init.transition(op)

    async def exec(self, req: api.ExecProcessRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        container = self._container(req.id)
        if not req.exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        if req.exec_id in container.execs:
            raise errdefs.AlreadyExists(f"id {req.exec_id}")
        container.init.check("exec")
        try:
            spec = json.loads(req.spec.value)
            if not isinstance(spec, dict) or not spec.get("args"):
                raise ValueError("the process has no args")
        except ValueError as e:
            raise errdefs.InvalidArgument(f"exec {req.exec_id}: invalid process spec: {e}") from None
        proc = Process(container.id, req.exec_id, Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
                       spec=req.spec.value)
        container.execs[req.exec_id] = proc
        self.publisher.publish(events.TaskExecAdded(container_id=container.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def resize_pty(self, req: api.ResizePtyRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        proc = self._container(req.id).process(req.exec_id)
        proc.check("resize")
        if proc.io is None:
            raise errdefs.FailedPrecondition(f"{proc.kind} {proc.id} has not started")
        proc.io.resize(req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: api.CloseIORequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        proc = self._container(req.id).process(req.exec_id)
        proc.check("close_io")
        if req.stdin and proc.io is not None:
            proc.io.close_stdin()
        return empty_pb2.Empty()

    async def update(self, req: api.UpdateTaskRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        container = self._container(req.id)
        container.init.check("update")
        try:
            resources = json.loads(req.resources.value or b"{}")
            if not isinstance(resources, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise errdefs.InvalidArgument(f"task {req.id}: invalid resources: {e}") from None
        fd, path = tempfile.mkstemp(prefix=".resources-", suffix=".json", dir=container.bundle)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(resources, f)
            await container.runc.update(container.id, path)
        finally:
            os.unlink(path)
        return empty_pb2.Empty()

    async def checkpoint(self, req: api.CheckpointTaskRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        raise errdefs.Unimplemented(f"checkpoint of task {req.id}: not supported by the ketch shim yet")

    # -- delete / shutdown ---------------------------------------------------------------------

    async def delete(self, req: api.DeleteRequest, ctx: ttrpc.Context) -> api.DeleteResponse:
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        proc.require("delete")
        if req.exec_id:
            proc.delete()
            del container.execs[req.exec_id]
            if proc.io is not None:
                proc.io.close()
        else:
            await self._delete_init(container)
        resp = api.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        _set_ts(resp.exited_at, proc.exited_at)
        return resp

    async def _delete_init(self, container: Container) -> None:
        init = container.init
        await container.runc.delete(container.id, force=init.state == State.CREATED)
        init.delete()  # never started: runc killed its init; the exit handler will find it deleted
        for p in container.execs.values():
            if p.io is not None:
                p.io.close()
        if init.io is not None:
            init.io.close()
        self._stop_oom(container)
        if container.mounted_rootfs:
            mount.unmount_all(os.path.join(container.bundle, "rootfs"))
        del self.containers[container.id]
        self.publisher.publish(events.TaskDelete(
            container_id=container.id, id=container.id, pid=init.pid, exit_status=init.exit_status,
            exited_at=_timestamp(init.exited_at)))

    async def shutdown(self, req: api.ShutdownRequest, ctx: ttrpc.Context) -> empty_pb2.Empty:
        if (self.containers or self._creating) and not req.now:
            return empty_pb2.Empty()
        if self.lifetime is not None:
            # no task id: the daemon found this shim idle and unclaimed (after its restart)
            self.lifetime.idle(now=req.now or not req.id)
        return empty_pb2.Empty()


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    _set_ts(ts, t)
    return ts
