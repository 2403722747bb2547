"""The shim's containers and processes over the runc command line: no ttrpc, no requests.

One :class:`Core` can hold several containers (each call names its task by id), which is
what lets a group of tasks share one shim process. Per container it keeps the init process,
its execs, its stdio and its OOM watch; process state moves only through ``process.py``.
Calls take plain arguments and return plain values (or the :class:`Process`); ``service.py``
maps ttrpc requests onto them.

Ordering guarantees, all relied on by containerd's clients:
* /tasks/start (or exec-started) is published before that process's /tasks/exit: start and
  exit handling take the process's lock.
* A process's /tasks/exit is published after its output is drained and read by its client
  (bounded, see ketch.delivery) and before its Wait returns.
* Exec exits are published before the init exit of the same container.
* /tasks/oom is published before the /tasks/exit of the OOM-killed init.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import message as _message

from ketch import cgroups, delivery, errdefs, mount, timestamps
from ketch.files import write_atomic
from ketch.api.containerd.events import task_pb2 as events
from ketch.api.containerd.types import mount_pb2
from ketch.cgroups import Cgroup, OOMWatch
from ketch.oci import criu
from ketch.oci.runc import Runc, RuncError
from ketch.shim.lifetime import Lifetime
from ketch.shim.options import CheckpointOptions, RuntimeOptions
from ketch.shim.process import Process, State
from ketch.shim.reaper import Monitor
from ketch.shim.stdio import Logger, ProcessIO, Stdio, logger_spawner

log = logging.getLogger(__name__)

#: how long the init exit waits for exec exits to be published first
EXEC_EXIT_GRACE = 5.0


class Publisher(Protocol):
    def publish(self, event: _message.Message) -> None: ...


class Keeper(Protocol):
    """Where the core records what a successor shim needs (``keeper.KeeperLink``)."""

    def put(self, key: str, data: dict[str, Any], fds: dict[str, int] | None = None) -> None: ...
    def drop(self, key: str) -> None: ...
    def ack(self, pid: int) -> None: ...


class RootfsMount(Protocol):
    """One mount of a task's rootfs (a containerd.types.Mount has these fields)."""

    @property
    def type(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def options(self) -> Sequence[str]: ...


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    runc: Runc
    init: Process
    #: the runtime options it was created with (io_uid, io_gid apply to every process's stdio)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    execs: dict[str, Process] = field(default_factory=dict)
    mounted_rootfs: bool = False
    cgroup: Cgroup | None = None
    oom: OOMWatch | None = None
    #: the CRIU image (a directory) a Create asked to restore from, and its parent: the init is
    #: restored by its Start (``runc restore``), as containerd's runc shim does; "" after that
    checkpoint: str = ""
    parent_checkpoint: str = ""

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errdefs.NotFound(f"exec {exec_id!r} of task {self.id!r}") from None


def _with_terminal(process_spec: bytes, terminal: bool) -> bytes:
    """An OCI process spec whose ``terminal`` is what the request asked for: runc allocates a
    pty exactly when the spec says so, and refuses a console socket otherwise."""
    spec = json.loads(process_spec)
    if bool(spec.get("terminal")) == terminal:
        return process_spec
    spec["terminal"] = terminal
    return json.dumps(spec).encode()


def _match_terminal(config: str, terminal: bool) -> None:
    """The same for a task: its bundle's config.json gets the terminal the create asked for."""
    try:
        with open(config, "rb") as f:
            spec = json.load(f)
    except ValueError as e:
        raise errdefs.InvalidArgument(f"{config} is not a JSON OCI spec: {e}") from None
    process = spec.get("process") if isinstance(spec, dict) else None
    if not isinstance(process, dict) or bool(process.get("terminal")) == terminal:
        return
    process["terminal"] = terminal
    write_atomic(config, json.dumps(spec).encode(), durable=False)


def _shares_pid_namespace(bundle: str) -> bool:
    """Whether the bundle's container has no pid namespace of its own: none asked for (the
    host's), or one joined by path (another container's)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        namespaces = spec.get("linux", {}).get("namespaces", [])
    except (OSError, ValueError, AttributeError):
        return False
    pid = [n for n in namespaces if isinstance(n, dict) and n.get("type") == "pid"]
    return not pid or bool(pid[0].get("path"))


def _process_key(container_id: str, exec_id: str) -> str:
    return f"p/{container_id}/{exec_id or '-'}"


def _with_criu_log(error: RuncError, log_path: str, keep: str) -> RuncError:
    """``error`` (a failed runc checkpoint or restore) with what criu's log says went wrong
    (:func:`criu.log_excerpt`); the log is copied to ``keep`` when given (criu's work directory
    may be removed)."""
    tail = criu.log_excerpt(log_path)
    if not tail:
        return error
    where = log_path
    if keep:
        with contextlib.suppress(OSError):
            shutil.copyfile(log_path, keep)
            where = keep
    return type(error)(f"{error.message}\ncriu's log ({where}) says:\n{tail}", error.status)


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class Core:
    def __init__(
        self,
        *,
        namespace: str,
        monitor: Monitor,
        publisher: Publisher,
        runc_root: str,
        lifetime: Lifetime | None = None,
        cgroup_root: str = cgroups.ROOT,
    ) -> None:
        self.namespace = namespace
        #: where the cgroup filesystem is mounted
        self.cgroup_root = cgroup_root
        self.monitor = monitor
        self.publisher = publisher
        self.runc_root = runc_root
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self.lifetime = lifetime
        self._tasks: set[asyncio.Task[None]] = set()
        #: the group's keeper (None: this shim has none, as under tests)
        self.keeper: Keeper | None = None
        #: exits the keeper reported and this shim has not recorded yet
        self._unacked: set[int] = set()
        self.monitor.on_orphan = self._orphan_exit

    # -- lookups -------------------------------------------------------------------------------

    def container(self, id: str) -> Container:
        try:
            return self.containers[id]
        except KeyError:
            raise errdefs.NotFound(f"task {id!r} in namespace {self.namespace!r}") from None

    def process(self, id: str, exec_id: str) -> Process:
        return self.container(id).process(exec_id)

    def _runc(self, opts: RuntimeOptions, bundle: str) -> Runc:
        """The OCI runtime of a container in ``bundle``, as its options name it."""
        return Runc(self.monitor, binary=opts.binary_name, root=opts.root,
                    log_path=os.path.join(bundle, "log.json"), systemd_cgroup=opts.systemd_cgroup,
                    criu=opts.criu_path)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- what the keeper holds for a successor -------------------------------------------------

    def _record(self, container: Container, proc: Process | None = None) -> None:
        """Tell the keeper the current state of ``container`` (and of ``proc``), with the fds
        of its stdio; a successor shim rebuilds itself from these (:meth:`restore`)."""
        if self.keeper is None:
            return
        if proc is None:
            self.keeper.put(f"c/{container.id}", {"bundle": container.bundle,
                                                  "mounted_rootfs": container.mounted_rootfs,
                                                  "checkpoint": container.checkpoint,
                                                  "parent_checkpoint": container.parent_checkpoint})
            return
        io = proc.io
        data = {"state": int(proc.state), "pid": proc.pid, "exit_status": proc.exit_status,
                "exited_at": proc.exited_at, "stdio": dataclasses.asdict(proc.stdio),
                "spec": proc.spec.hex() if proc.state == State.CREATED else "",
                "logger": io.logger.pid if io is not None and io.logger is not None else 0}
        self.keeper.put(_process_key(container.id, proc.exec_id), data,
                        io.kept() if io is not None and not io.closed else None)

    def _follow(self, container: Container, proc: Process) -> None:
        """Keep the keeper's record of ``proc`` current as its stdio changes."""
        if proc.io is not None:
            proc.io.on_change = lambda: self._record(container, proc)
        self._record(container, proc)

    def keeper_exit(self, pid: int, status: int, at: float) -> None:
        """An exit the keeper reaped (a process whose shim died): route it like our own,
        acknowledged once recorded."""
        self._unacked.add(pid)
        self.monitor.notify(pid, status, at)

    def _orphan_exit(self, pid: int, status: int) -> None:
        if pid in self._unacked and self.keeper is not None:
            self._unacked.discard(pid)
            self.keeper.ack(pid)

    def restore(self, records: dict[str, tuple[dict[str, Any], dict[str, int]]],
                exits: dict[int, tuple[int, float]]) -> None:
        """Take over from a shim that died: rebuild containers and processes from the keeper's
        records (``key → (data, fds)``), resume their stdio, and route the exits the keeper
        kept meanwhile."""
        for key, (data, _fds) in sorted(records.items()):
            if not key.startswith("c/"):
                continue
            id = key[2:]
            opts = RuntimeOptions.load(data["bundle"], self.runc_root)
            runc = self._runc(opts, data["bundle"])
            container = Container(id, data["bundle"], runc, Process(id, "", Stdio()), opts,
                                  mounted_rootfs=bool(data.get("mounted_rootfs")),
                                  checkpoint=data.get("checkpoint", ""),
                                  parent_checkpoint=data.get("parent_checkpoint", ""))
            self.containers[id] = container
        for key, (data, fds) in sorted(records.items()):
            if not key.startswith("p/"):
                continue
            cid, _, exec_id = key[2:].partition("/")
            owner = self.containers.get(cid)
            if owner is None:
                for fd in fds.values():
                    os.close(fd)
                continue
            self._restore_process(owner, "" if exec_id == "-" else exec_id, data, fds)
        for container in self.containers.values():
            if container.init.running:
                self._watch_oom(container)
        for pid, (status, at) in exits.items():
            self.keeper_exit(pid, status, at)
        log.info("took over %d containers", len(self.containers))

    def _restore_process(self, container: Container, exec_id: str, data: dict[str, Any],
                         fds: dict[str, int]) -> None:
        proc = Process(container.id, exec_id, Stdio(**data["stdio"]), state=State(data["state"]), pid=data["pid"],
                       exit_status=data["exit_status"], exited_at=data["exited_at"],
                       spec=bytes.fromhex(data.get("spec", "")))
        if exec_id:
            container.execs[exec_id] = proc
        else:
            container.init = proc
        if proc.state == State.STOPPED or proc.pid <= 0:
            # (an init still to be restored from a checkpoint gets new stdio at its Start)
            for fd in fds.values():
                os.close(fd)
            if proc.state == State.STOPPED:
                proc.mark_exited()
            return
        logger = None
        if data.get("logger"):
            logger = Logger(int(data["logger"]), -1, self.monitor.watch(int(data["logger"])))
        proc.io = ProcessIO.adopt(proc.stdio, fds, logger)
        self._spawn(self._on_exit(container, proc, self.monitor.watch(proc.pid)))
        self._follow(container, proc)

    # -- create / start ------------------------------------------------------------------------

    async def create(
        self,
        id: str,
        *,
        bundle: str,
        rootfs: Sequence[RootfsMount],
        stdio: Stdio,
        options: tuple[str, bytes],
        checkpoint: str = "",
        parent_checkpoint: str = "",
    ) -> Container:
        """runc create, with ``options`` the runtime options Any (type URL, value). With a
        ``checkpoint`` (a directory holding a CRIU image), nothing runs yet: Start restores
        the init from it (see :meth:`_restore_init`), as containerd's runc shim does."""
        if not id:
            raise errdefs.InvalidArgument("task id must not be empty")
        if id in self.containers or id in self._creating:
            raise errdefs.AlreadyExists(f"task {id}")
        if checkpoint and not os.path.isdir(checkpoint):
            raise errdefs.InvalidArgument(f"task {id}: checkpoint {checkpoint!r} is not a directory")
        bundle = bundle or os.getcwd()
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise errdefs.InvalidArgument(f"bundle {bundle!r} has no config.json")
        opts = RuntimeOptions.from_any(*options, self.runc_root)
        if self.lifetime is not None:
            self.lifetime.busy()
        self._creating.add(id)
        try:
            container = await self._create(id, bundle, rootfs, stdio, opts, checkpoint, parent_checkpoint)
        finally:
            self._creating.discard(id)
        self.containers[id] = container
        self._record(container)
        self._follow(container, container.init)
        self.publisher.publish(events.TaskCreate(
            container_id=id, bundle=bundle, pid=container.init.pid,
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in rootfs],
            io=events.TaskIO(stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr, terminal=stdio.terminal),
            checkpoint=checkpoint,
        ))
        return container

    async def _create(
        self, id: str, bundle: str, rootfs: Sequence[RootfsMount], stdio: Stdio, opts: RuntimeOptions,
        checkpoint: str = "", parent_checkpoint: str = "",
    ) -> Container:
        os.makedirs(opts.root, mode=0o711, exist_ok=True)
        opts.save(bundle)
        _match_terminal(os.path.join(bundle, "config.json"), stdio.terminal)
        runc = self._runc(opts, bundle)
        init = Process(id, "", stdio)
        container = Container(id, bundle, runc, init, opts, checkpoint=checkpoint,
                              parent_checkpoint=parent_checkpoint if checkpoint else "")
        rootfs_dir = os.path.join(bundle, "rootfs")
        io: ProcessIO | None = None
        try:
            if rootfs:
                os.makedirs(rootfs_dir, mode=0o711, exist_ok=True)
                mount.mount_all((mount.Mount(m.type, m.source, tuple(m.options)) for m in rootfs), rootfs_dir)
                container.mounted_rootfs = True
            io = init.io = self._make_io(container, stdio)
            await io.ready()
            if checkpoint:
                return container
            pid_file = os.path.join(bundle, "init.pid")
            init.pid, exited = await self._run_process(io, pid_file, lambda console, stdio: runc.create(
                id, bundle, pid_file=pid_file, console_socket=console, stdio=stdio,
                no_pivot=opts.no_pivot_root, no_new_keyring=opts.no_new_keyring))
        except BaseException:
            if io is not None:
                io.close()
            with contextlib.suppress(Exception):
                await runc.delete(id, force=True)
            if container.mounted_rootfs:
                mount.unmount_all(rootfs_dir)
            raise
        self._spawn(self._on_exit(container, init, exited))
        self._watch_oom(container)
        return container

    def _make_io(self, container: Container, stdio: Stdio) -> ProcessIO:
        """The stdio of a process of ``container`` (its init or an exec): owned by the
        container's io_uid/io_gid, as containerd's runc shim makes both."""
        return ProcessIO.create(stdio, uid=container.options.io_uid, gid=container.options.io_gid,
                                logger=logger_spawner(self.monitor, self.namespace, container.id))

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

    def _watch_oom(self, container: Container) -> None:
        try:
            container.cgroup = Cgroup.of_pid(container.init.pid, self.cgroup_root)
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

    async def start(self, id: str, exec_id: str) -> Process:
        container = self.container(id)
        proc = container.process(exec_id)
        async with proc.lock:
            proc.require("start")
            if exec_id:
                try:
                    await self._start_exec(container, proc)
                except BaseException:
                    proc.mark_exited()  # runc exec failed: a Wait on it ends now, as containerd's
                    raise
                proc.transition("start")
                self._follow(container, proc)
                self.publisher.publish(events.TaskExecStarted(
                    container_id=container.id, exec_id=proc.exec_id, pid=proc.pid))
            elif container.checkpoint:
                await self._restore_init(container)
                proc.transition("start")
                self._record(container)
                self._record(container, proc)
                self.publisher.publish(events.TaskStart(container_id=container.id, pid=proc.pid))
            else:
                await container.runc.start(container.id)
                proc.transition("start")
                self._record(container, proc)
                self.publisher.publish(events.TaskStart(container_id=container.id, pid=proc.pid))
        return proc

    async def _restore_init(self, container: Container) -> None:
        """Start of a task created from a checkpoint: ``runc restore --detach`` of its CRIU
        image, the process's stdio made as for a fresh create (runc hands the checkpointed
        pipes' places to them); then it runs, watched as a created init is."""
        init, opts = container.init, container.options
        await criu.require(self.monitor, opts.criu_path)
        io = init.io
        if io is None:  # a successor shim's: the stdio made at Create died with its shim
            io = init.io = self._make_io(container, init.stdio)
            await io.ready()
        work = opts.criu_work_path or os.path.join(container.bundle, "work")
        pid_file = os.path.join(container.bundle, "init.pid")
        try:
            init.pid, exited = await self._run_process(io, pid_file, lambda console, stdio: container.runc.restore(
                container.id, container.bundle, image=container.checkpoint, work=work,
                parent=container.parent_checkpoint, pid_file=pid_file, console_socket=console, stdio=stdio,
                no_pivot=opts.no_pivot_root))
        except RuncError as e:
            raise _with_criu_log(e, os.path.join(work, "restore.log"), "") from None
        container.checkpoint = container.parent_checkpoint = ""
        self._spawn(self._on_exit(container, init, exited))
        self._watch_oom(container)

    async def _start_exec(self, container: Container, proc: Process) -> None:
        io = proc.io = self._make_io(container, proc.stdio)
        spec_file = pid_file = ""
        try:
            await io.ready()
            fd, spec_file = tempfile.mkstemp(prefix=".exec-", suffix=".json", dir=container.bundle)
            with os.fdopen(fd, "wb") as f:
                f.write(_with_terminal(proc.spec, proc.stdio.terminal))
            pid_file = spec_file[:-len(".json")] + ".pid"
            proc.pid, exited = await self._run_process(io, pid_file, lambda console, stdio: container.runc.exec(
                container.id, spec_file, pid_file=pid_file, console_socket=console, stdio=stdio))
        except BaseException:
            io.close()
            proc.io = None
            raise
        finally:
            for path in (spec_file, pid_file):
                with contextlib.suppress(FileNotFoundError):
                    if path:
                        os.unlink(path)
        self._spawn(self._on_exit(container, proc, exited))

    # -- exits ---------------------------------------------------------------------------------

    async def _on_exit(self, container: Container, proc: Process, exited: asyncio.Future[int]) -> None:
        status = await exited
        at = self.monitor.exit_time(proc.pid)
        async with proc.lock:
            if proc is container.init:
                await self._after_init_exit(container)
            if proc.io is not None:
                await proc.io.drain()
                proc.io.close()
            # a client may close its FIFOs once the exit is reported (ctr 1.6 does): what it
            # has not read by then would be lost
            await delivery.delivered((proc.stdio.stdout, proc.stdio.stderr))
            if not proc.record_exit(status, at):
                self._acknowledge(proc.pid)
                return
            self._record(container, proc)
            self._acknowledge(proc.pid)
            self.publisher.publish(events.TaskExit(
                container_id=container.id, id=proc.id, pid=proc.pid, exit_status=proc.exit_status,
                exited_at=timestamps.timestamp(proc.exited_at)))
            proc.mark_exited()
        log.info("process exited pid=%d status=%d", proc.pid, status,
                 extra={"container": container.id, "exec": "" if proc.id == container.id else proc.id})

    def _acknowledge(self, pid: int) -> None:
        if pid in self._unacked and self.keeper is not None:
            self._unacked.discard(pid)
            self.keeper.ack(pid)

    async def _after_init_exit(self, container: Container) -> None:
        """Before the init exit is published: report a pending OOM, and let the execs (which
        die with the container) be reported first."""
        self._stop_oom(container)
        running = [p for p in container.execs.values() if p.running]
        shared = _shares_pid_namespace(container.bundle)
        if not running and not shared:
            return  # in its own pid namespace, the init's death ended everything in it
        # a container without a pid namespace of its own keeps its other processes alive when its
        # init exits: end them all (runc kill --all), as containerd's runc shim does
        with contextlib.suppress(errdefs.KetchError):
            await container.runc.kill(container.id, signal.SIGKILL, all=True)
        for p in running:
            with contextlib.suppress(errdefs.KetchError):
                p.signal(signal.SIGKILL)
        if running:
            await asyncio.wait([asyncio.ensure_future(p.exited.wait()) for p in running], timeout=EXEC_EXIT_GRACE)

    # -- queries -------------------------------------------------------------------------------

    async def pids(self, id: str) -> list[tuple[int, str]]:
        """(pid, exec id or "") of every process in the container."""
        container = self.container(id)
        pids = await container.runc.ps(container.id)
        by_pid = {p.pid: p.exec_id for p in container.execs.values() if p.pid}
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    def stats(self, id: str) -> tuple[str, bytes]:
        """The container's cgroup metrics as an Any (type URL, value)."""
        container = self.container(id)
        container.init.check("stats")
        if container.cgroup is None:
            raise errdefs.Unavailable(f"task {id}: its cgroup is not known")
        return container.cgroup.metrics()

    def task_pid(self, id: str) -> int:
        container = self.containers.get(id)
        return container.init.pid if container else 0

    async def wait(self, id: str, exec_id: str) -> Process:
        proc = self.process(id, exec_id)
        await proc.exited.wait()
        return proc

    # -- control -------------------------------------------------------------------------------

    async def kill(self, id: str, exec_id: str, sig: int, *, all: bool = False) -> None:
        container = self.container(id)
        proc = container.process(exec_id)
        proc.check("kill")
        if exec_id:
            proc.signal(sig)
            return
        try:
            await container.runc.kill(container.id, sig, all=all)
        except errdefs.NotFound:
            raise errdefs.NotFound(f"task {id}: process already finished") from None

    async def pause(self, id: str) -> None:
        container = self.container(id)
        await self._freeze(container, "pause", container.runc.pause)
        self.publisher.publish(events.TaskPaused(container_id=container.id))

    async def resume(self, id: str) -> None:
        container = self.container(id)
        await self._freeze(container, "resume", container.runc.resume)
        self.publisher.publish(events.TaskResumed(container_id=container.id))

    async def _freeze(self, container: Container, op: str, run: Callable[[str], Awaitable[None]]) -> None:
        """Pause or resume the whole container: check the move, ask runc, then make it."""
        async with container.init.lock:
            container.init.require(op)
            await run(container.id)
            container.init.transition(op)
            self._record(container, container.init)

    async def checkpoint(self, id: str, path: str, options: tuple[str, bytes]) -> None:
        """runc checkpoint of the task's container into ``path`` (the CRIU image directory),
        with ``options`` a checkpoint options Any (type URL, value). It goes on running unless
        the options say exit: then its exit is reported as any other. criu missing or failing
        its check is FailedPrecondition; a failed dump quotes criu's dump.log, which is kept as
        the bundle's criu-dump.log (as containerd's runc shim does)."""
        container = self.container(id)
        opts = CheckpointOptions.from_any(*options)
        image = path or opts.image_path
        if not image:
            raise errdefs.InvalidArgument(f"checkpoint of task {id}: no image path")
        init = container.init
        async with init.lock:
            init.check("checkpoint")
            await criu.require(self.monitor, container.options.criu_path)
            work = opts.work_path or os.path.join(container.bundle, "work", "criu-work")
            try:
                await container.runc.checkpoint(container.id, opts.runc_args(image, work))
            except RuncError as e:
                raise _with_criu_log(e, os.path.join(work, "dump.log"),
                                     os.path.join(container.bundle, "criu-dump.log")) from None
            finally:
                if not opts.work_path:
                    shutil.rmtree(work, ignore_errors=True)

    def exec(self, id: str, exec_id: str, *, stdio: Stdio, spec: bytes) -> None:
        """Add an exec process (started by :meth:`start`); ``spec`` is its OCI process JSON."""
        container = self.container(id)
        if not exec_id:
            raise errdefs.InvalidArgument("exec id cannot be empty")
        if exec_id in container.execs:
            raise errdefs.AlreadyExists(f"id {exec_id}")
        container.init.check("exec")
        try:
            parsed = json.loads(spec)
            if not isinstance(parsed, dict) or not parsed.get("args"):
                raise ValueError("the process has no args")
        except ValueError as e:
            raise errdefs.InvalidArgument(f"exec {exec_id}: invalid process spec: {e}") from None
        container.execs[exec_id] = Process(container.id, exec_id, stdio, spec=spec)
        self._record(container, container.execs[exec_id])
        self.publisher.publish(events.TaskExecAdded(container_id=container.id, exec_id=exec_id))

    def resize(self, id: str, exec_id: str, width: int, height: int) -> None:
        proc = self.process(id, exec_id)
        proc.check("resize")
        if proc.io is None:
            raise errdefs.FailedPrecondition(f"{proc.kind} {proc.id} has not started")
        proc.io.resize(width, height)

    def close_io(self, id: str, exec_id: str, *, stdin: bool) -> None:
        proc = self.process(id, exec_id)
        proc.check("close_io")
        if stdin and proc.io is not None:
            proc.io.close_stdin()

    async def update(self, id: str, resources: bytes) -> None:
        """runc update with ``resources``, an OCI LinuxResources JSON object."""
        container = self.container(id)
        container.init.check("update")
        try:
            parsed = json.loads(resources or b"{}")
            if not isinstance(parsed, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise errdefs.InvalidArgument(f"task {id}: invalid resources: {e}") from None
        fd, path = tempfile.mkstemp(prefix=".resources-", suffix=".json", dir=container.bundle)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(parsed, f)
            await container.runc.update(container.id, path)
        finally:
            os.unlink(path)

    # -- delete / shutdown ---------------------------------------------------------------------

    async def delete(self, id: str, exec_id: str) -> Process:
        """Delete a stopped (or never started) process. A Start of it in flight is waited for
        (the process lock), so the delete judges the state that Start leaves."""
        container = self.container(id)
        proc = container.process(exec_id)
        async with proc.lock:
            proc.require("delete")
            if exec_id:
                proc.delete()
                del container.execs[exec_id]
                if proc.io is not None:
                    proc.io.close()
                if self.keeper is not None:
                    self.keeper.drop(_process_key(id, exec_id))
            else:
                await self._delete_init(container)
        return proc

    async def _delete_init(self, container: Container) -> None:
        init = container.init
        with contextlib.suppress(errdefs.NotFound):  # runc forgot it already (``shim delete`` ran)
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
        if self.keeper is not None:
            self.keeper.drop(f"c/{container.id}")
            self.keeper.drop(f"p/{container.id}")
        self.publisher.publish(events.TaskDelete(
            container_id=container.id, id=container.id, pid=init.pid, exit_status=init.exit_status,
            exited_at=timestamps.timestamp(init.exited_at)))

    def shutdown(self, *, now: bool, named: bool) -> None:
        """Shutdown: go once no task is left (at once with ``now``); ``named`` is False when the
        daemon found this shim idle and unclaimed (after its restart)."""
        if (self.containers or self._creating) and not now:
            return
        if self.lifetime is not None:
            self.lifetime.idle(now=now or not named)
