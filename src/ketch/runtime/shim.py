"""Running shim binaries (``start``, ``delete``) and talking to a shim over ttrpc.

Works with any runtime v2 shim: ours (containerd-shim-ketch-v2) and containerd's own
(containerd-shim-runc-v2). The invocation contract is containerd 1.6's: flags
``-namespace -address -publish-binary -id [-debug] start``, the bundle as working directory,
``TTRPC_ADDRESS`` in the environment, runtime options on stdin; ``start`` prints the address
(1.6) or a JSON bootstrap (1.7+); ``delete`` prints a marshalled DeleteResponse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from google.protobuf import any_pb2, empty_pb2
from google.protobuf import message as _message

from ketch import errdefs, identifiers, logfields, templatewire, ttrpc
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
#: the least time Create and Start get: runc create/exec can be slow on a loaded host
SLOW_CALL = 120.0
#: our shim's binary: the one that can serve a group of tasks
KETCH_SHIM = "containerd-shim-ketch-v2"
M = TypeVar("M", bound=_message.Message)


def binary_name(runtime: str) -> str:
    """``io.containerd.runc.v2`` → ``containerd-shim-runc-v2``, as containerd names shims."""
    parts = runtime.split(".")
    if len(parts) < 2 or not all(parts[-2:]):
        raise errdefs.InvalidArgument(f"invalid runtime name {runtime!r}, want a form like io.containerd.runc.v2")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def resolve(runtime: str, extra_dirs: list[str]) -> str:
    """The shim binary for ``runtime``: an absolute path as is; else by name in the runtime's
    own directory, on PATH, then in ``extra_dirs`` (ketchd's own bin directory)."""
    if os.path.isabs(runtime):
        if os.access(runtime, os.X_OK):
            return runtime
        raise errdefs.NotFound(f"runtime {runtime!r}: no executable at that path")
    name = binary_name(runtime)
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    raise errdefs.NotFound(f'runtime "{runtime}" binary not installed "{name}"')


@dataclass
class ShimParams:
    """What every shim invocation of one daemon shares."""

    grpc_address: str
    ttrpc_address: str
    publish_binary: str
    debug: bool = False
    start_timeout: float = 30.0
    delete_timeout: float = 30.0
    #: where our shim's template listens (empty: none)
    template_socket: str = ""


def _argv(binary: str, params: ShimParams, namespace: str, id: str, *tail: str) -> list[str]:
    argv = [binary, "-namespace", namespace, "-address", params.grpc_address,
            "-publish-binary", params.publish_binary, "-id", id]
    if params.debug:
        argv.append("-debug")
    return argv + list(tail)


def _env(params: ShimParams, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """A shim binary's environment."""
    env = dict(os.environ, TTRPC_ADDRESS=params.ttrpc_address, **(extra_env or {}))
    env.setdefault("GOMAXPROCS", "2")
    env.pop("NOTIFY_SOCKET", None)
    return env


async def _run(argv: list[str], cwd: str, stdin: bytes, timeout: float, params: ShimParams,
               extra_env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    env = _env(params, extra_env)
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        raise
    return proc.returncode or 0, out, err


async def start(binary: str, params: ShimParams, namespace: str, id: str, bundle: str, options: bytes,
                group: str = "") -> str:
    """Run ``binary … start`` in ``bundle``; the ttrpc address the shim serves on. ``group``
    asks our shim for a process shared by the tasks of that group."""
    argv = _argv(binary, params, namespace, id, "start")
    env = {"KETCH_SHIM_GROUP": group} if group else {}
    try:
        code, out, err = await _run(argv, bundle, options, params.start_timeout, params, env)
    except TimeoutError:
        raise errdefs.DeadlineExceeded(f"shim start for task {id}: no answer within {params.start_timeout:.0f}s") from None
    text = (out + err).decode(errors="replace").strip()
    if code != 0:
        raise errdefs.Unknown(f"start shim for task {id}: {text or f'exit status {code}'}")
    address = out.decode(errors="replace").strip()
    if address.startswith("{"):
        try:
            address = json.loads(address)["address"]
        except (ValueError, KeyError, TypeError):
            raise errdefs.Unknown(f"shim for task {id} printed an unreadable bootstrap: {address!r}") from None
    if not address:
        raise errdefs.Unknown(f"shim for task {id} printed no address: {text!r}")
    return str(address)


def _umask() -> int:
    """This process's umask, read without setting it (other threads may be creating files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


async def start_by_template(path: str, binary: str, params: ShimParams, namespace: str, id: str, bundle: str,
                            options: bytes, group: str = "") -> str:
    """What :func:`start` does, by our shim's template at ``path`` (ketch.shim.template): it runs
    ``start`` in-process with the flags, environment, cwd and options exec'ing ``binary`` would
    give it, and forks the server: no interpreter to exec. The address."""
    argv = _argv(binary, params, namespace, id, "start")[1:]
    env = _env(params, {"KETCH_SHIM_GROUP": group} if group else None)
    async with asyncio.timeout(templatewire.TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(templatewire.encode(templatewire.start_request(argv, env, bundle, _umask(), options)))
            await writer.drain()
            header = await reader.readexactly(templatewire.HEADER.size)
            body = await reader.readexactly(templatewire.decode_header(header))
        except asyncio.IncompleteReadError:
            raise templatewire.TemplateError("the template closed the connection") from None
        finally:
            writer.close()
    return templatewire.answer(templatewire.decode_body(body))


async def delete(binary: str, params: ShimParams, namespace: str, id: str, bundle: str) -> shim_pb2.DeleteResponse:
    """Run ``binary … delete`` (cleanup after a dead shim); its DeleteResponse."""
    argv = _argv(binary, params, namespace, id, "-bundle", bundle, "delete")
    try:
        code, out, err = await _run(argv, bundle if os.path.isdir(bundle) else "/", b"", params.delete_timeout, params)
    except TimeoutError:
        raise errdefs.DeadlineExceeded(f"shim delete for task {id}: no answer within {params.delete_timeout:.0f}s") from None
    if err.strip():
        log.warning("shim delete for %s/%s: %s", namespace, id, err.decode(errors="replace").strip())
    if code != 0:
        raise errdefs.Unknown(f"shim delete for task {id} failed with status {code}")
    try:
        resp: shim_pb2.DeleteResponse = shim_pb2.DeleteResponse.FromString(out)
        return resp
    except _message.DecodeError:
        raise errdefs.Unknown(f"shim delete for task {id} printed an unreadable answer") from None


class ShimLog:
    """Copies a shim's log FIFO (``<bundle>/log``) into ketchd's log, line by line.

    The FIFO is opened read-write: opening never waits for the shim, we never see EOF
    between shims' writes, and a shim writing while ketchd is down blocks instead of dying of
    SIGPIPE (a Go shim does die of it on its stderr)."""

    def __init__(self, path: str, namespace: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._partial = b""
        self._log = logging.getLogger("ketch.shim")
        self._namespace = namespace
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-65536:]
        for line in lines:
            if line.strip():
                logfields.relay(self._log, line.decode(errors="replace"), namespace=self._namespace)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class ShimClient:
    """The Task service of one shim (which may serve several tasks), over one ttrpc
    connection: one typed method per call, so nothing above the runtime builds shim requests.

    Every call has ``timeout`` (ours only: like containerd, shims get no deadline on the wire);
    Wait has none, and Create gets at least two minutes (runc create can be slow under load).
    """

    def __init__(self, client: ttrpc.Client, namespace: str, timeout: float) -> None:
        self._client = client
        self._metadata: dict[str, str | list[str]] = {identifiers.TTRPC_NAMESPACE_KEY: namespace}
        self.timeout = timeout
        #: the shim process's pid, once a Connect told it (0: not yet)
        self.pid = 0

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def _call(self, method: str, request: _message.Message, response_type: type[M],
                    timeout: float | None = -1.0) -> M:
        return await self._client.call(
            SERVICE, method, request, response_type, timeout=self.timeout if timeout == -1.0 else timeout,
            metadata=self._metadata, send_timeout=False)

    async def create(self, request: shim_pb2.CreateTaskRequest) -> int:
        resp = await self._call("Create", request, shim_pb2.CreateTaskResponse, timeout=max(self.timeout, SLOW_CALL))
        return resp.pid

    async def start(self, id: str, exec_id: str) -> int:
        """Start gets Create's budget: an exec's start is a runc exec, as slow as a create."""
        return (await self._call("Start", shim_pb2.StartRequest(id=id, exec_id=exec_id), shim_pb2.StartResponse,
                                 timeout=max(self.timeout, SLOW_CALL))).pid

    async def delete(self, id: str, exec_id: str = "") -> shim_pb2.DeleteResponse:
        return await self._call("Delete", shim_pb2.DeleteRequest(id=id, exec_id=exec_id), shim_pb2.DeleteResponse)

    async def state(self, id: str, exec_id: str = "") -> shim_pb2.StateResponse:
        return await self._call("State", shim_pb2.StateRequest(id=id, exec_id=exec_id), shim_pb2.StateResponse)

    async def wait(self, id: str, exec_id: str = "") -> shim_pb2.WaitResponse:
        return await self._call("Wait", shim_pb2.WaitRequest(id=id, exec_id=exec_id), shim_pb2.WaitResponse,
                                timeout=None)

    async def kill(self, id: str, exec_id: str, signal: int, all: bool) -> None:
        await self._call("Kill", shim_pb2.KillRequest(id=id, exec_id=exec_id, signal=signal, all=all),
                         empty_pb2.Empty)

    async def exec(self, id: str, exec_id: str, spec: any_pb2.Any, stdio: Stdio) -> None:
        await self._call("Exec", shim_pb2.ExecProcessRequest(
            id=id, exec_id=exec_id, spec=spec, stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
            terminal=stdio.terminal), empty_pb2.Empty)

    async def resize_pty(self, id: str, exec_id: str, width: int, height: int) -> None:
        await self._call("ResizePty", shim_pb2.ResizePtyRequest(id=id, exec_id=exec_id, width=width, height=height),
                         empty_pb2.Empty)

    async def close_io(self, id: str, exec_id: str, stdin: bool) -> None:
        await self._call("CloseIO", shim_pb2.CloseIORequest(id=id, exec_id=exec_id, stdin=stdin), empty_pb2.Empty)

    async def pause(self, id: str) -> None:
        await self._call("Pause", shim_pb2.PauseRequest(id=id), empty_pb2.Empty)

    async def resume(self, id: str) -> None:
        await self._call("Resume", shim_pb2.ResumeRequest(id=id), empty_pb2.Empty)

    async def pids(self, id: str) -> list[task_types.ProcessInfo]:
        return list((await self._call("Pids", shim_pb2.PidsRequest(id=id), shim_pb2.PidsResponse)).processes)

    async def update(self, id: str, resources: any_pb2.Any, annotations: dict[str, str]) -> None:
        await self._call("Update", shim_pb2.UpdateTaskRequest(id=id, resources=resources, annotations=annotations),
                         empty_pb2.Empty)

    async def stats(self, id: str) -> any_pb2.Any:
        return (await self._call("Stats", shim_pb2.StatsRequest(id=id), shim_pb2.StatsResponse)).stats

    async def checkpoint(self, id: str, path: str, options: any_pb2.Any | None) -> None:
        """A CRIU dump of the task into ``path``: no deadline of ours (its size sets its time)."""
        await self._call("Checkpoint", shim_pb2.CheckpointTaskRequest(id=id, path=path, options=options),
                         empty_pb2.Empty, timeout=None)

    async def connect(self, id: str) -> int:
        """The task's pid, as the shim knows it (and the shim's own: ``pid``)."""
        resp = await self._call("Connect", shim_pb2.ConnectRequest(id=id), shim_pb2.ConnectResponse)
        self.pid = resp.shim_pid
        return resp.task_pid

    async def shutdown(self, id: str = "", *, now: bool = False, timeout: float | None = -1.0) -> None:
        """Ask the shim to exit once it serves nothing (``id`` empty: only if it serves nothing)."""
        await self._call("Shutdown", shim_pb2.ShutdownRequest(id=id, now=now), empty_pb2.Empty, timeout=timeout)

    async def close(self) -> None:
        await self._client.close()


@dataclass(frozen=True)
class Stdio:
    """Where a process's standard streams go (FIFO paths or log URIs), and whether it has a tty."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class ShimLauncher(Protocol):
    """How the runtime reaches shims: resolve a runtime to a binary, run its ``start`` and
    ``delete``, connect to an address, list the shim sockets there are. :class:`Launcher` does
    it with shim binaries and unix sockets; tests use shims served in memory
    (:mod:`ketch.testing.fakeshim`)."""

    def resolve(self, runtime: str) -> str: ...

    async def start(self, binary: str, namespace: str, id: str, bundle: str, options: bytes,
                    group: str = "") -> str: ...

    async def delete(self, binary: str, namespace: str, id: str, bundle: str) -> shim_pb2.DeleteResponse: ...

    async def connect(self, address: str, namespace: str, *, timeout: float,
                      on_close: Callable[[], object] | None = None) -> ShimClient: ...

    def sockets(self) -> list[str]: ...


class Launcher:
    """Shims as containerd runs them: binaries on PATH (or beside ketchd), unix sockets."""

    def __init__(self, params: ShimParams, *, extra_dirs: list[str] | None = None) -> None:
        self.params = params
        self.extra_dirs = extra_dirs or []
        #: the binary whose template serves at params.template_socket, once it does
        self.template_binary = ""
        self._launching: asyncio.Future[None] | None = None

    def resolve(self, runtime: str) -> str:
        return resolve(runtime, self.extra_dirs)

    def launch_template(self) -> None:
        """Start (or find) the template in the background, unless that is under way; meanwhile
        a new group's first task executes the binary."""
        if self.params.template_socket and (self._launching is None or self._launching.done()):
            self.template_binary = ""
            self._launching = asyncio.ensure_future(self.start_template())

    async def settle(self, timeout: float) -> None:
        """Let a template launch under way finish (cancelling a subprocess as it starts can hang
        asyncio.run's exit)."""
        if self._launching is not None:
            await asyncio.wait([self._launching], timeout=timeout)

    async def start_template(self) -> None:
        """Have our shim keep a template at ``params.template_socket`` (or keep the one there,
        from an earlier ketchd): ``containerd-shim-ketch-v2 -socket PATH template`` starts it
        detached, in its own session. It outlives ketchd, as shims do. A failure only costs speed."""
        path = self.params.template_socket
        if not path:
            return
        try:
            binary = self.resolve("io.containerd.ketch.v2")
            code, out, err = await _run([binary, "-socket", path, "template"], "/", b"",
                                        self.params.start_timeout, self.params)
        except (errdefs.KetchError, OSError, TimeoutError) as e:
            log.warning("no shim template: %s", e)
            return
        if code != 0:
            log.warning("no shim template: %s", (out + err).decode(errors="replace").strip() or f"exit status {code}")
            return
        self.template_binary = binary
        log.info("shim template pid %s on %s", out.decode(errors="replace").strip(), path)

    async def start(self, binary: str, namespace: str, id: str, bundle: str, options: bytes, group: str = "") -> str:
        if binary == self.template_binary:
            try:
                return await start_by_template(self.params.template_socket, binary, self.params, namespace, id,
                                               bundle, options, group)
            except (templatewire.TemplateError, OSError, ValueError, TimeoutError) as e:
                log.warning("shim template: %s; executing %s start, and starting a template anew", e, binary)
                self.launch_template()
        return await start(binary, self.params, namespace, id, bundle, options, group)

    async def delete(self, binary: str, namespace: str, id: str, bundle: str) -> shim_pb2.DeleteResponse:
        return await delete(binary, self.params, namespace, id, bundle)

    async def connect(self, address: str, namespace: str, *, timeout: float,
                      on_close: Callable[[], object] | None = None) -> ShimClient:
        return ShimClient(await ttrpc.connect(address, timeout=timeout, on_close=on_close), namespace, timeout)

    def sockets(self) -> list[str]:
        """Every shim socket in our shim directory (``<dir of the gRPC socket>/s``)."""
        directory = os.path.join(os.path.dirname(self.params.grpc_address), "s")
        try:
            return ["unix://" + os.path.join(directory, name) for name in sorted(os.listdir(directory))]
        except OSError:
            return []
