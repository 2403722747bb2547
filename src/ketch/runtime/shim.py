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
from typing import TypeVar

from google.protobuf import message as _message

from ketch import errdefs, identifiers, ttrpc
from ketch.api.containerd.task.v2 import shim_pb2

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
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


def _argv(binary: str, params: ShimParams, namespace: str, id: str, *tail: str) -> list[str]:
    argv = [binary, "-namespace", namespace, "-address", params.grpc_address,
            "-publish-binary", params.publish_binary, "-id", id]
    if params.debug:
        argv.append("-debug")
    return argv + list(tail)


async def _run(argv: list[str], cwd: str, stdin: bytes, timeout: float, params: ShimParams,
               extra_env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    env = dict(os.environ, TTRPC_ADDRESS=params.ttrpc_address, **(extra_env or {}))
    env.setdefault("GOMAXPROCS", "2")
    env.pop("NOTIFY_SOCKET", None)
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
    try:
        code, out, err = await _run(argv, bundle, options, params.start_timeout, params,
                                    {"KETCH_SHIM_GROUP": group} if group else None)
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

    def __init__(self, path: str, namespace: str, id: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._partial = b""
        self._log = logging.getLogger("ketch.shim")
        self._where = f"namespace={namespace} id={id}"
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
                self._log.info("%s %s", self._where, line.decode(errors="replace"))

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class ShimClient:
    """One ttrpc connection to one shim (which may serve several tasks)."""

    def __init__(self, address: str, namespace: str, client: ttrpc.Client, timeout: float) -> None:
        self.address = address
        self.namespace = namespace
        self._client = client
        self.timeout = timeout

    @classmethod
    async def connect(cls, address: str, namespace: str, *, timeout: float,
                      on_close: Callable[[], object] | None = None) -> ShimClient:
        client = await ttrpc.connect(address, timeout=timeout, on_close=on_close)
        return cls(address, namespace, client, timeout)

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def call(self, method: str, request: _message.Message, response_type: type[M], *,
                   timeout: float | None = -1.0) -> M:
        """Call Task/<method>; ``timeout=None`` waits as long as it takes (Wait). The timeout
        is ours only: like containerd, we send shims no deadline (see ttrpc.Client.call)."""
        return await self._client.call(
            SERVICE, method, request, response_type,
            timeout=self.timeout if timeout == -1.0 else timeout,
            metadata={identifiers.TTRPC_NAMESPACE_KEY: self.namespace}, send_timeout=False)

    async def close(self) -> None:
        await self._client.close()
