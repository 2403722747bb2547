"""A pod's containers, as containerd's CRI runs them: each one a container record in the
``k8s.io`` namespace (labelled ``io.cri-containerd.kind=container``) whose spec joins its pod's
namespaces, and, once started, a task in the pod's shim group whose output ketchd writes to the
pod's log directory in the CRI format.

A container is CREATED until it starts (no task yet), RUNNING while its task runs, EXITED after;
its exit (code, time, reason) is kept in its record, so that ContainerStatus answers the same
after a ketchd restart or once the task is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from ketch import cgroups, errdefs, mount
from ketch.api.containerd.types import mount_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.cri.images import NAMESPACE, CriImages, ImageInfo
from ketch.cri.logs import ByteReader, Fifos, LogWriter, copy_lines
from ketch.cri.sandbox import (CONTAINER_TYPE, KIND_LABEL, NODE, POD, SANDBOX_ID, SANDBOX_NAME, SANDBOX_NAMESPACE,
                               SANDBOX_UID, Pods, Sandbox, by_id_prefix, creating, records)
from ketch.metadata import Container, Runtime, TypedValue
from ketch.metadata.local import ContainerService
from ketch.oci.seccomp import default_profile, load_profile
from ketch.oci.spec import PROCESS_TYPE_URL, RESOURCES_TYPE_URL, SPEC_TYPE_URL, default_spec
from ketch.runtime import CreateOptions, Stdio, TaskManager
from ketch.snapshots.service import SnapshotService

__all__ = ["Containers", "StreamIO"]

log = logging.getLogger("ketch.cri")

CONTAINER_EXTENSION = "io.cri-containerd.container.metadata"
CONTAINER_TYPE_URL = "ketch.cri.v1.Container"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
IMAGE_NAME = "io.kubernetes.cri.image-name"
#: the most ExecSync returns of each stream (the kubelet's gRPC message limit is 16 MiB)
EXEC_SYNC_CAP = 8 * 1024 * 1024
#: the most output an attached client may fall behind by; past it, output is dropped for it
#: (the container's log gets all of it; a slow client never holds the container up)
ATTACH_BACKLOG = 4 * 1024 * 1024

#: every capability the kernel knows, by number
_CAP_NAMES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
            "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
            "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
            "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE"]


def held_capabilities() -> list[str]:
    """The capabilities ketchd's own bounding set holds: "all" for a privileged container or
    ALL added, as containerd (root may lack some, e.g. CAP_SYS_RESOURCE, and runc cannot give
    what its caller does not have)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    except (OSError, StopIteration, ValueError):
        return []
    return [name for bit, name in enumerate(_CAP_NAMES) if mask >> bit & 1]


@dataclass
class Meta:
    """What ketchd keeps of a CRI container (its record's extension, as JSON)."""

    id: str
    name: str
    sandbox_id: str
    config: str
    """The ContainerConfig, serialized and base64-encoded."""
    image_id: str
    image_ref: str
    log_path: str = ""
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0

    @property
    def container_config(self) -> cri.ContainerConfig:
        config = cri.ContainerConfig()
        config.ParseFromString(base64.b64decode(self.config))
        return config

    def encode(self) -> TypedValue:
        return TypedValue(CONTAINER_TYPE_URL, json.dumps(asdict(self)).encode())

    @classmethod
    def decode(cls, value: TypedValue) -> Meta:
        return cls(**json.loads(value.value))


def container_name(md: cri.ContainerMetadata, pod: cri.PodSandboxMetadata) -> str:
    return f"{md.name}_{pod.name}_{pod.namespace}_{pod.uid}_{md.attempt}"


@dataclass
class StreamIO:
    """A client's side of an exec or attach: where the process's input comes from (``stdin``
    answers b"" at its end) and where its output goes, and the terminal sizes it asks for."""

    stdin: Callable[[], Awaitable[bytes]] | None = None
    stdout: Callable[[bytes], Awaitable[None]] | None = None
    stderr: Callable[[bytes], Awaitable[None]] | None = None
    resizes: AsyncIterator[tuple[int, int]] | None = None


class _Listener:
    """An attached client's share of a container's output: (stream, bytes) in order, b"" at a
    stream's end."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.pending = 0
        self.dropped = 0

    def feed(self, stream: str, chunk: bytes) -> None:
        if chunk and self.pending > ATTACH_BACKLOG:
            self.dropped += len(chunk)
            return
        self.pending += len(chunk)
        self.chunks.put_nowait((stream, chunk))


@dataclass
class _Running:
    """The log copying of a started container, and the clients attached to its output."""

    fifos: Fifos
    writer: LogWriter | None
    copies: list[asyncio.Task[None]] = field(default_factory=list)
    listeners: set[_Listener] = field(default_factory=set)
    open_streams: set[str] = field(default_factory=set)


class _Tee:
    """Reads a container's output for its log, and hands each chunk to attached clients."""

    def __init__(self, reader: asyncio.StreamReader, stream: str, running: _Running) -> None:
        self._reader = reader
        self._stream = stream
        self._running = running
        running.open_streams.add(stream)

    async def read(self, n: int = -1) -> bytes:
        chunk = await self._reader.read(n)
        if not chunk:
            self._running.open_streams.discard(self._stream)
        for listener in list(self._running.listeners):
            listener.feed(self._stream, chunk)
        return chunk


async def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking ``fd``, waiting (not blocking) while it is full."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_writer(fd, wake)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


async def _feed(path: str, read: Callable[[], Awaitable[bytes]]) -> None:
    """Copy what ``read`` gives into the FIFO at ``path`` (whose reader, the shim, is there)
    until its end or the reader's."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        log.info("stdin %s: %s", path, e)
        return
    try:
        while chunk := await read():
            await _write_all(fd, chunk)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


async def _resize(task: Any, sizes: AsyncIterator[tuple[int, int]], exec_id: str = "") -> None:
    async for width, height in sizes:
        try:
            await task.resize(width, height, exec_id)
        except errdefs.KetchError as e:
            log.info("resize of %s %s: %s", task.id, exec_id or "", e)


class Containers:
    def __init__(self, *, pods: Pods, images: CriImages, containers: ContainerService, tasks: TaskManager,
                 snapshots: SnapshotService, snapshotter: str, runtime: str, state_dir: str) -> None:
        self._pods = pods
        self._images = images
        self._containers = containers
        self._tasks = tasks
        self._snapshots = snapshots
        self._snapshotter = snapshotter
        self._runtime = runtime
        self._state_dir = state_dir
        self._running: dict[str, _Running] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, id: str) -> asyncio.Lock:
        return self._locks.setdefault(id, asyncio.Lock())

    def _io_dir(self, id: str) -> str:
        return os.path.join(self._state_dir, "cri", "containers", id)

    # -- lookups ----------------------------------------------------------------------------

    def all(self) -> list[Meta]:
        return records(self._containers, "container", CONTAINER_EXTENSION, Meta.decode)

    def get(self, ref: str) -> Meta:
        return by_id_prefix(self.all(), ref, "container")

    def in_pod(self, sandbox_id: str) -> list[Meta]:
        return [m for m in self.all() if m.sandbox_id == sandbox_id]

    def _save(self, meta: Meta) -> None:
        c = self._containers.get(NAMESPACE, meta.id)
        c.extensions[CONTAINER_EXTENSION] = meta.encode()
        self._containers.update(NAMESPACE, c, [f"extensions.{CONTAINER_EXTENSION}"])

    async def state(self, meta: Meta) -> cri.ContainerState:
        if not meta.started_at:
            return cri.ContainerState.CONTAINER_CREATED
        if meta.finished_at:
            return cri.ContainerState.CONTAINER_EXITED
        if not self._tasks.exists(NAMESPACE, meta.id):
            return cri.ContainerState.CONTAINER_UNKNOWN
        try:
            process = await self._tasks.get(NAMESPACE, meta.id).state()
        except errdefs.KetchError:
            return cri.ContainerState.CONTAINER_UNKNOWN
        if process.status == task_types.STOPPED:
            await self._record_exit(meta, process.exit_status, process.exited_at.ToNanoseconds())
            return cri.ContainerState.CONTAINER_EXITED
        return cri.ContainerState.CONTAINER_RUNNING

    async def _record_exit(self, meta: Meta, code: int, at_ns: int) -> None:
        if meta.finished_at:
            return
        meta.exit_code, meta.finished_at = code, at_ns or time.time_ns()
        meta.reason = "Completed" if code == 0 else "Error"
        if await self._oom_killed(meta):
            meta.reason = "OOMKilled"
        self._save(meta)

    async def _oom_killed(self, meta: Meta) -> bool:
        return False  # OOM events are matched to containers with the stats work (see issue 12)

    # -- create -----------------------------------------------------------------------------

    async def create(self, sandbox_ref: str, config: cri.ContainerConfig, pod_config: cri.PodSandboxConfig) -> str:
        sandbox = self._pods.get(sandbox_ref)
        if await self._pods.state(sandbox) != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        md = config.metadata
        if not md.name:
            raise errdefs.InvalidArgument("container metadata needs a name")
        pod = sandbox.pod
        name = container_name(md, pod.metadata)
        for other in self.all():
            if other.name == name:
                raise errdefs.AlreadyExists(f"container name {name!r} is reserved for {other.id}")
        image = self._images.find(config.image.image)
        if image is None:
            raise errdefs.NotFound(f"image {config.image.image!r} not found: pull it first")
        id = secrets.token_hex(32)
        log_path = os.path.join(pod.log_directory, config.log_path) if pod.log_directory and config.log_path else ""
        meta = Meta(id, name, sandbox.id, base64.b64encode(config.SerializeToString()).decode(), image.id,
                    config.image.image, log_path, created_at=time.time_ns())
        async with creating(self._pods.leases) as lease:
            await self._create(meta, config, pod, sandbox, image, lease)
        return id

    async def _create(self, meta: Meta, config: cri.ContainerConfig, pod: cri.PodSandboxConfig, sandbox: Sandbox,
                      image: ImageInfo, lease: str) -> None:
        id = meta.id
        mounts = await self._snapshots.prepare(NAMESPACE, self._snapshotter, id, self._images.chain_id(image),
                                               lease=lease)
        try:
            spec = await self._spec(meta, config, pod, sandbox, image, mounts)
            self._containers.create(NAMESPACE, Container(
                id=id, labels={**dict(config.labels), KIND_LABEL: "container"}, image=image.id,
                runtime=Runtime(self._tasks.get(NAMESPACE, sandbox.id).runtime if self._tasks.exists(
                    NAMESPACE, sandbox.id) else self._runtime),
                spec=TypedValue(SPEC_TYPE_URL, json.dumps(spec).encode()), snapshotter=self._snapshotter,
                snapshot_key=id, extensions={CONTAINER_EXTENSION: meta.encode()}))
        except BaseException:
            with contextlib.suppress(Exception):
                await self._snapshots.remove(NAMESPACE, self._snapshotter, id)
            raise

    async def _spec(self, meta: Meta, config: cri.ContainerConfig, pod: cri.PodSandboxConfig, sandbox: Sandbox,
                    image: ImageInfo, mounts: list[mount.Mount]) -> dict[str, Any]:
        spec = default_spec(NAMESPACE, meta.id)
        img = image.config.get("config") or {}
        process = spec["process"]
        entrypoint, cmd = list(img.get("Entrypoint") or []), list(img.get("Cmd") or [])
        if config.command:
            args = [*config.command, *config.args]
        elif config.args:
            args = [*entrypoint, *config.args]
        else:
            args = [*entrypoint, *cmd]
        if not args:
            raise errdefs.InvalidArgument(f"container {config.metadata.name}: no command given and the image has none")
        process["args"] = args
        env = {e.split("=", 1)[0]: e for e in (img.get("Env") or process["env"])}
        for kv in config.envs:
            env[kv.key] = f"{kv.key}={kv.value}"
        process["env"] = list(env.values())
        process["cwd"] = config.working_dir or img.get("WorkingDir") or "/"
        process["terminal"] = config.tty
        linux_cfg = config.linux
        sec = linux_cfg.security_context
        await self._user(spec, sec, img.get("User") or "", mounts)
        if sec.privileged:
            if not pod.linux.security_context.privileged:
                raise errdefs.InvalidArgument("a privileged container needs a privileged pod")
            caps = held_capabilities()
            spec["linux"].pop("maskedPaths", None)
            spec["linux"].pop("readonlyPaths", None)
            spec["mounts"] = [dict(m, options=[o for o in m["options"] if o != "ro"]) if m["destination"] == "/sys"
                              else m for m in spec["mounts"]]
            spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        else:
            caps = list(process["capabilities"]["bounding"])
            added = sec.capabilities.add_capabilities
            dropped = sec.capabilities.drop_capabilities
            if any(c.upper() == "ALL" for c in added):
                caps = held_capabilities()
            for cap in added:
                name = _cap(cap)
                if name != "CAP_ALL" and name not in caps:
                    caps.append(name)
            if any(c.upper() == "ALL" for c in dropped):
                caps = [c for c in caps if c in {_cap(a) for a in added}]
            else:
                drop = {_cap(c) for c in dropped}
                caps = [c for c in caps if c not in drop]
            if sec.masked_paths:
                spec["linux"]["maskedPaths"] = list(sec.masked_paths)
            if sec.readonly_paths:
                spec["linux"]["readonlyPaths"] = list(sec.readonly_paths)
        process["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
        profile = _seccomp(sec, caps)
        if profile is not None:
            spec["linux"]["seccomp"] = profile
        process["noNewPrivileges"] = sec.no_new_privs
        spec["root"]["readonly"] = sec.readonly_rootfs
        # the pod's namespaces
        pause_pid = self._tasks.get(NAMESPACE, sandbox.id).pid if self._tasks.exists(NAMESPACE, sandbox.id) else 0
        opts = sec.namespace_options
        pod_opts = pod.linux.security_context.namespace_options
        namespaces = []
        for ns in spec["linux"]["namespaces"]:
            kind = ns["type"]
            if kind == "network":
                if pod_opts.network == NODE:
                    continue
                ns = {"type": "network", "path": sandbox.netns}
            elif kind == "ipc":
                if pod_opts.ipc == NODE:
                    continue
                ns = {"type": "ipc", "path": f"/proc/{pause_pid}/ns/ipc"}
            elif kind == "uts":
                if pod_opts.network == NODE:
                    continue
                ns = {"type": "uts", "path": f"/proc/{pause_pid}/ns/uts"}
            elif kind == "pid":
                if opts.pid == NODE:
                    continue
                if opts.pid == POD:
                    ns = {"type": "pid", "path": f"/proc/{pause_pid}/ns/pid"}
            namespaces.append(ns)
        spec["linux"]["namespaces"] = namespaces
        spec.pop("hostname", None)
        # mounts: the pod's files, then the asked-for ones (they win on the same destination)
        pod_dir = self._pods.dir(sandbox.id)
        extra = [{"destination": "/etc/hosts", "type": "bind", "source": os.path.join(pod_dir, "hosts"),
                  "options": ["rbind", "rprivate", "rw"]},
                 {"destination": "/etc/resolv.conf", "type": "bind", "source": os.path.join(pod_dir, "resolv.conf"),
                  "options": ["rbind", "rprivate", "rw"]},
                 {"destination": "/etc/hostname", "type": "bind", "source": os.path.join(pod_dir, "hostname"),
                  "options": ["rbind", "rprivate", "rw"]}]
        if pod_opts.ipc != NODE:
            spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
            extra.append({"destination": "/dev/shm", "type": "bind", "source": os.path.join(pod_dir, "shm"),
                          "options": ["rbind", "rprivate", "rw"]})
        for m in config.mounts:
            if not m.host_path or not m.container_path:
                raise errdefs.InvalidArgument("a mount needs a host path and a container path")
            source = os.path.realpath(m.host_path)
            if not os.path.exists(source):
                os.makedirs(source, exist_ok=True)  # as the kubelet's DirectoryOrCreate and containerd
            propagation = {cri.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
                           cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
                           cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared"}[m.propagation]
            if propagation != "rprivate":
                spec["linux"]["rootfsPropagation"] = "rshared" if propagation == "rshared" else "rslave"
                await asyncio.to_thread(_ensure_shared, source, propagation)
            extra = [e for e in extra if e["destination"] != m.container_path]
            extra.append({"destination": m.container_path, "type": "bind", "source": source,
                          "options": ["rbind", propagation, "ro" if m.readonly else "rw"]})
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in {e["destination"] for e in extra}]
        spec["mounts"].extend(extra)
        for dev in config.devices:
            spec["linux"].setdefault("devices", []).append(_device(dev))
        # resources and cgroup
        res = linux_cfg.resources
        resources = spec["linux"]["resources"]
        _apply_resources(resources, res)
        if res.oom_score_adj:
            process["oomScoreAdj"] = res.oom_score_adj
        parent = pod.linux.cgroup_parent
        if parent:
            spec["linux"]["cgroupsPath"] = os.path.join(parent, meta.id)
        if pod.linux.sysctls:
            spec["linux"]["sysctl"] = dict(pod.linux.sysctls)
        spec["annotations"] = {**dict(config.annotations), CONTAINER_TYPE: "container", SANDBOX_ID: sandbox.id,
                               SANDBOX_NAME: pod.metadata.name, SANDBOX_NAMESPACE: pod.metadata.namespace,
                               SANDBOX_UID: pod.metadata.uid, CONTAINER_NAME: config.metadata.name,
                               IMAGE_NAME: config.image.image}
        return spec

    async def _user(self, spec: dict[str, Any], sec: cri.LinuxContainerSecurityContext, image_user: str,
                    mounts: list[mount.Mount]) -> None:
        """uid, gid and groups: the security context's, else the image's, names looked up in
        the image's /etc/passwd and /etc/group."""
        if sec.HasField("run_as_group") and not (sec.HasField("run_as_user") or sec.run_as_username):
            raise errdefs.InvalidArgument("run_as_group needs run_as_user or run_as_username")
        if sec.HasField("run_as_user"):
            user = str(sec.run_as_user.value)
        elif sec.run_as_username:
            user = sec.run_as_username
        else:
            user = image_user
        name, _, group = user.partition(":")
        passwd, groups = await asyncio.to_thread(_read_user_files, mounts)
        uid, gid, username = 0, 0, ""
        if name:
            if name.isdigit():
                uid = int(name)
                entry = next((e for e in passwd if e[2] == uid), None)
                if entry is not None:
                    gid, username = entry[3], entry[0]
            else:
                entry = next((e for e in passwd if e[0] == name), None)
                if entry is None:
                    raise errdefs.NotFound(f"user {name!r} not found in the image's /etc/passwd")
                username, uid, gid = entry[0], entry[2], entry[3]
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                g = next((e for e in groups if e[0] == group), None)
                if g is None:
                    raise errdefs.NotFound(f"group {group!r} not found in the image's /etc/group")
                gid = g[2]
        if sec.HasField("run_as_group"):
            gid = sec.run_as_group.value
        extra = sorted({g[2] for g in groups if username and username in g[3] and g[2] != gid})
        extra += [g for g in sec.supplemental_groups if g not in extra]
        spec["process"]["user"] = {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})}

    # -- start, stop, remove ----------------------------------------------------------------

    async def start(self, ref: str) -> None:
        meta = self.get(ref)
        async with self._lock(meta.id):
            if meta.started_at:
                raise errdefs.FailedPrecondition(f"container {meta.id} was started already")
            sandbox = self._pods.get(meta.sandbox_id)
            if await self._pods.state(sandbox) != cri.PodSandboxState.SANDBOX_READY:
                raise errdefs.FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
            config = meta.container_config
            container = self._containers.get(NAMESPACE, meta.id)
            snapshotter = self._snapshots.get(self._snapshotter)
            mounts = await asyncio.to_thread(snapshotter.mounts, NAMESPACE, meta.id)
            fifos = Fifos(self._io_dir(meta.id), stdin=config.stdin)
            out, err = await fifos.open()
            writer = LogWriter(meta.log_path) if meta.log_path else None
            running = _Running(fifos, writer)
            stdin, stdout, stderr = fifos.paths
            try:
                rootfs = [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]
                task = await self._tasks.create(NAMESPACE, container, CreateOptions(
                    stdio=Stdio(stdin, stdout, "" if config.tty else stderr, config.tty), rootfs=rootfs))
                fifos.writers_ready()
                for reader, stream in ((out, "stdout"), (err, "stderr")):
                    running.copies.append(asyncio.ensure_future(self._copy(_Tee(reader, stream, running), stream,
                                                                           writer)))
                meta.pid = await task.start()
            except BaseException:
                for copy in running.copies:
                    copy.cancel()
                if writer is not None:
                    writer.close()
                fifos.remove()
                if self._tasks.exists(NAMESPACE, meta.id):
                    with contextlib.suppress(errdefs.KetchError):
                        await self._tasks.delete(NAMESPACE, meta.id)
                raise
            self._running[meta.id] = running
            meta.started_at = time.time_ns()
            self._save(meta)

    async def recover(self) -> None:
        """After a ketchd restart: go on copying the output of every running container to its
        log (the shims kept their ends of the FIFOs; what was written meanwhile waits in them)."""
        for meta in self.all():
            if not meta.started_at or meta.finished_at or meta.id in self._running:
                continue
            if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING:
                continue
            fifos = Fifos(self._io_dir(meta.id), stdin=meta.container_config.stdin)  # for attach
            try:
                out, err = await fifos.open()
            except OSError as e:
                log.warning("container %s: cannot reopen its output FIFOs: %s", meta.id, e)
                continue
            fifos.writers_ready()
            writer = LogWriter(meta.log_path) if meta.log_path else None
            running = self._running[meta.id] = _Running(fifos, writer)
            for reader, stream in ((out, "stdout"), (err, "stderr")):
                running.copies.append(asyncio.ensure_future(self._copy(_Tee(reader, stream, running), stream,
                                                                       writer)))

    @staticmethod
    async def _copy(reader: ByteReader, stream: str, writer: LogWriter | None) -> None:
        if writer is None:
            while await reader.read(1 << 16):
                pass
            return
        await copy_lines(reader, stream, writer)

    async def stop(self, ref: str, timeout: int) -> None:
        """SIGTERM (or the image's stop signal), then SIGKILL after ``timeout`` seconds."""
        meta = self.get(ref)
        if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING:
            return
        task = self._tasks.get(NAMESPACE, meta.id)
        waiting = asyncio.ensure_future(task.wait())
        try:
            if timeout > 0:
                with contextlib.suppress(errdefs.NotFound):
                    await task.kill(self._stop_signal(meta))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiting), timeout)
            if not waiting.done():
                with contextlib.suppress(errdefs.NotFound):
                    await task.kill(signal.SIGKILL, all=True)
                ended = await asyncio.wait_for(waiting, 60)
            else:
                ended = waiting.result()
        finally:
            waiting.cancel()
        await self._record_exit(meta, ended.status, int(ended.exited_at * 1e9))
        await self._drain(meta.id)

    def _stop_signal(self, meta: Meta) -> int:
        info = self._images.find(meta.image_id)
        name = str(((info.config.get("config") or {}).get("StopSignal") or "") if info is not None else "").upper()
        if name.isdigit():
            return int(name)
        if name:
            found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
            if isinstance(found, signal.Signals):
                return int(found)
        return int(signal.SIGTERM)

    async def _drain(self, id: str) -> None:
        running = self._running.get(id)
        if running is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*running.copies, return_exceptions=True), 5)

    async def remove(self, ref: str) -> None:
        """Remove the container, stopping it first; nothing when it is gone."""
        try:
            meta = self.get(ref)
        except errdefs.NotFound:
            return
        if await self.state(meta) == cri.ContainerState.CONTAINER_RUNNING:
            await self.stop(meta.id, 0)
        async with self._lock(meta.id):
            if self._tasks.exists(NAMESPACE, meta.id):
                await self._tasks.delete(NAMESPACE, meta.id)
            running = self._running.pop(meta.id, None)
            if running is not None:
                for copy in running.copies:
                    copy.cancel()
                if running.writer is not None:
                    running.writer.close()
            Fifos(self._io_dir(meta.id)).remove()
            with contextlib.suppress(errdefs.NotFound):
                await self._snapshots.remove(NAMESPACE, self._snapshotter, meta.id)
            with contextlib.suppress(errdefs.NotFound):
                self._containers.delete(NAMESPACE, meta.id)
        self._locks.pop(meta.id, None)

    async def reopen_log(self, ref: str) -> None:
        meta = self.get(ref)
        running = self._running.get(meta.id)
        if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING or running is None:
            raise errdefs.FailedPrecondition(f"container {meta.id} is not running")
        if running.writer is not None:
            running.writer.reopen()

    # -- status -----------------------------------------------------------------------------

    async def status(self, ref: str, verbose: bool = False) -> tuple[cri.ContainerStatus, dict[str, str]]:
        meta = self.get(ref)
        state = await self.state(meta)
        config = meta.container_config
        status = cri.ContainerStatus(
            id=meta.id, metadata=config.metadata, state=state, created_at=meta.created_at,
            started_at=meta.started_at, finished_at=meta.finished_at, exit_code=meta.exit_code,
            image=config.image, image_ref=meta.image_id, reason=meta.reason, message=meta.message,
            labels=config.labels, annotations=config.annotations, log_path=meta.log_path,
            mounts=list(config.mounts))
        info: dict[str, str] = {}
        if verbose:
            info["info"] = json.dumps({"sandboxID": meta.sandbox_id, "pid": meta.pid if state == 1 else 0,
                                       "runtimeType": self._runtime})
        return status, info

    async def list(self, f: cri.ContainerFilter | None = None) -> list[cri.Container]:
        out = []
        for meta in self.all():
            config = meta.container_config
            state = await self.state(meta)
            if f is not None:
                if f.id and not meta.id.startswith(f.id):
                    continue
                if f.pod_sandbox_id and not meta.sandbox_id.startswith(f.pod_sandbox_id):
                    continue
                if f.HasField("state") and f.state.state != state:
                    continue
                if any(config.labels.get(k) != v for k, v in f.label_selector.items()):
                    continue
            out.append(cri.Container(id=meta.id, pod_sandbox_id=meta.sandbox_id, metadata=config.metadata,
                                     image=config.image, image_ref=meta.image_id, state=state,
                                     created_at=meta.created_at, labels=config.labels,
                                     annotations=config.annotations))
        return out

    # -- exec -------------------------------------------------------------------------------

    async def exec_sync(self, ref: str, cmd: Sequence[str], timeout: int) -> cri.ExecSyncResponse:
        """Run ``cmd`` in the container; its output (each stream capped) and exit code. Past
        ``timeout`` seconds (0: none) the process is killed and the call is DeadlineExceeded."""
        outputs: list[bytearray] = [bytearray(), bytearray()]

        def collect(buf: bytearray) -> Callable[[bytes], Awaitable[None]]:
            async def write(chunk: bytes) -> None:
                if len(buf) < EXEC_SYNC_CAP:
                    buf.extend(chunk[:EXEC_SYNC_CAP - len(buf)])
            return write

        try:
            code = await self.exec(ref, cmd, False, StreamIO(stdout=collect(outputs[0]), stderr=collect(outputs[1])),
                                   timeout)
        except asyncio.TimeoutError:
            raise errdefs.DeadlineExceeded(f"command {list(cmd)!r} timed out after {timeout}s and was killed") from None
        return cri.ExecSyncResponse(stdout=bytes(outputs[0]), stderr=bytes(outputs[1]), exit_code=code)

    async def exec(self, ref: str, cmd: Sequence[str], tty: bool, io: StreamIO, timeout: float = 0) -> int:
        """Run ``cmd`` in the container (with a terminal when ``tty``: its output all comes
        as stdout), its stdio to and from ``io``; its exit code once it exited and its output
        went out. Past ``timeout`` seconds (0: none), or when the caller gives up (a cancel),
        the process is killed; asyncio.TimeoutError for the first."""
        meta = self.get(ref)
        if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING:
            raise errdefs.FailedPrecondition(f"container {meta.id} is not running")
        if not cmd:
            raise errdefs.InvalidArgument("exec needs a command")
        task = self._tasks.get(NAMESPACE, meta.id)
        container = self._containers.get(NAMESPACE, meta.id)
        assert container.spec is not None
        process = dict(json.loads(container.spec.value)["process"], args=list(cmd), terminal=tty)
        exec_id = f"exec-{secrets.token_hex(8)}"
        fifos = Fifos(tempfile.mkdtemp(prefix=f"{exec_id}-", dir=self._io_dir(meta.id)), stdin=io.stdin is not None)
        out_reader, err_reader = await fifos.open()

        async def pump(reader: asyncio.StreamReader, write: Callable[[bytes], Awaitable[None]] | None) -> None:
            while chunk := await reader.read(1 << 16):
                if write is not None:
                    await write(chunk)

        copies = [asyncio.ensure_future(pump(out_reader, io.stdout)),
                  asyncio.ensure_future(pump(err_reader, io.stderr))]
        sides: list[asyncio.Future[None]] = []
        try:
            stdin, stdout, stderr = fifos.paths
            await task.exec(exec_id, any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode()),
                            Stdio(stdin, stdout, "" if tty else stderr, tty))
            waiting = asyncio.ensure_future(task.wait(exec_id))
            try:
                await task.start(exec_id)
                fifos.writers_ready()  # an exec's FIFOs are opened by its start
                if io.stdin is not None:
                    sides.append(asyncio.ensure_future(self._stdin(task, stdin, io.stdin, exec_id)))
                if io.resizes is not None and tty:
                    sides.append(asyncio.ensure_future(_resize(task, io.resizes, exec_id)))
                ended = await asyncio.wait_for(asyncio.shield(waiting), timeout or None)
            except BaseException:
                # timed out, or the caller gave up (its deadline, a cancel): the process must
                # not outlive the call
                with contextlib.suppress(errdefs.KetchError, asyncio.CancelledError):
                    await asyncio.shield(task.kill(signal.SIGKILL, exec_id=exec_id))
                with contextlib.suppress(asyncio.TimeoutError, errdefs.KetchError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(waiting), 10)
                raise
            finally:
                waiting.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*copies, return_exceptions=True), 5)
            return ended.status
        finally:
            for c in [*copies, *sides]:
                c.cancel()
            with contextlib.suppress(errdefs.KetchError):
                await task.delete_process(exec_id)
            fifos.remove()

    @staticmethod
    async def _stdin(task: Any, path: str, read: Callable[[], Awaitable[bytes]], exec_id: str = "") -> None:
        """Feed the process's stdin FIFO; at the input's end, close the process's stdin."""
        await _feed(path, read)
        with contextlib.suppress(errdefs.KetchError):
            await task.close_io(True, exec_id)

    async def attach(self, ref: str, io: StreamIO) -> None:
        """Attach ``io`` to the running container's own stdio until its output ends (it
        exited) or, unless the container is stdin_once, the client's input ends (as
        containerd: a stdin_once container's stdin is closed then, and it ends on its own).
        Without a terminal, output comes as stdout and stderr; with one, all as stdout."""
        meta = self.get(ref)
        running = self._running.get(meta.id)
        if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING or running is None:
            raise errdefs.FailedPrecondition(f"container {meta.id} is not running")
        config = meta.container_config
        task = self._tasks.get(NAMESPACE, meta.id)
        listener = _Listener()
        awaiting = set(running.open_streams)
        running.listeners.add(listener)

        async def out() -> None:
            while awaiting:
                stream, chunk = await listener.chunks.get()
                listener.pending -= len(chunk)
                if not chunk:
                    awaiting.discard(stream)
                    continue
                write = io.stdout if stream == "stdout" or config.tty else io.stderr
                if write is not None:
                    await write(chunk)

        ends = [asyncio.ensure_future(out())]
        sides: list[asyncio.Future[None]] = []
        stdin_path = running.fifos.paths[0]
        if io.stdin is not None and config.stdin and stdin_path:
            if config.stdin_once and not config.tty:
                sides.append(asyncio.ensure_future(self._stdin(task, stdin_path, io.stdin)))
            else:
                ends.append(asyncio.ensure_future(_feed(stdin_path, io.stdin)))
        if io.resizes is not None and config.tty:
            sides.append(asyncio.ensure_future(_resize(task, io.resizes)))
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            running.listeners.discard(listener)
            for t in [*ends, *sides]:
                t.cancel()
            if listener.dropped:
                log.warning("container %s: %d bytes of output were not sent to an attached client that fell "
                            "behind", meta.id, listener.dropped)

    # -- stats and resources ----------------------------------------------------------------

    async def update_resources(self, ref: str, resources: cri.LinuxContainerResources) -> None:
        meta = self.get(ref)
        container = self._containers.get(NAMESPACE, meta.id)
        assert container.spec is not None
        spec = json.loads(container.spec.value)
        _apply_resources(spec["linux"].setdefault("resources", {}), resources)
        if self._tasks.exists(NAMESPACE, meta.id) and await self.state(meta) == cri.ContainerState.CONTAINER_RUNNING:
            await self._tasks.get(NAMESPACE, meta.id).update(
                any_pb2.Any(type_url=RESOURCES_TYPE_URL, value=json.dumps(spec["linux"]["resources"]).encode()), {})
        container.spec = TypedValue(SPEC_TYPE_URL, json.dumps(spec).encode())
        self._containers.update(NAMESPACE, container, ["spec"])

    async def stats(self, meta: Meta) -> cri.ContainerStats:
        config = meta.container_config
        out = cri.ContainerStats(attributes=cri.ContainerAttributes(
            id=meta.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations))
        now = time.time_ns()
        out.cpu.timestamp = out.memory.timestamp = out.writable_layer.timestamp = now
        out.writable_layer.fs_id.mountpoint = self._snapshotter
        with contextlib.suppress(errdefs.KetchError):
            usage = await asyncio.to_thread(self._snapshots.get(self._snapshotter).usage, NAMESPACE, meta.id)
            out.writable_layer.used_bytes.value = usage.size
            out.writable_layer.inodes_used.value = usage.inodes
        if await self.state(meta) != cri.ContainerState.CONTAINER_RUNNING:
            return out
        try:
            data = await self._tasks.get(NAMESPACE, meta.id).stats()
        except errdefs.KetchError:
            return out
        try:
            used = cgroups.usage(data.type_url, data.value)
        except (ValueError, DecodeError):
            return out
        out.cpu.usage_core_nano_seconds.value = used.cpu_ns
        out.memory.working_set_bytes.value = used.working_set
        return out


def _seccomp(sec: cri.LinuxContainerSecurityContext, caps: list[str]) -> dict[str, Any] | None:
    """The seccomp profile the security context asks for (none for a privileged container),
    as containerd reads it: the ``seccomp`` field, else ``seccomp_profile_path``."""
    if sec.privileged:
        return None
    if sec.HasField("seccomp"):
        kind = sec.seccomp.profile_type
        if kind == cri.SecurityProfile.ProfileType.RuntimeDefault:
            return default_profile(caps)
        if kind == cri.SecurityProfile.ProfileType.Localhost:
            return load_profile(sec.seccomp.localhost_ref)
        return None
    path = sec.seccomp_profile_path
    if path in ("", "unconfined"):
        return None
    if path in ("runtime/default", "docker/default"):
        return default_profile(caps)
    if path.startswith("localhost/"):
        return load_profile(path[len("localhost/"):])
    raise errdefs.InvalidArgument(f"unsupported seccomp profile {path!r}: use runtime/default, unconfined or "
                                  "localhost/<path>")


def _cap(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


def _device(dev: cri.Device) -> dict[str, Any]:
    st = os.stat(dev.host_path)
    import stat as stat_mod

    kind = "c" if stat_mod.S_ISCHR(st.st_mode) else "b" if stat_mod.S_ISBLK(st.st_mode) else ""
    if not kind:
        raise errdefs.InvalidArgument(f"{dev.host_path} is not a device")
    return {"path": dev.container_path or dev.host_path, "type": kind, "major": os.major(st.st_rdev),
            "minor": os.minor(st.st_rdev), "fileMode": st.st_mode & 0o777, "uid": 0, "gid": 0}


def _apply_resources(resources: dict[str, Any], res: cri.LinuxContainerResources) -> None:
    cpu: dict[str, Any] = resources.setdefault("cpu", {})
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if not cpu:
        resources.pop("cpu")
    if res.memory_limit_in_bytes:
        resources.setdefault("memory", {})["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        resources.setdefault("memory", {})["swap"] = res.memory_swap_limit_in_bytes


def _read_user_files(mounts: list[mount.Mount]) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str, int, list[str]]]]:
    """The image's /etc/passwd and /etc/group entries, read through a temporary mount of the
    container's root filesystem."""
    with tempfile.TemporaryDirectory(prefix="ketch-user-") as tmp:
        mount.mount_all(mounts, tmp)
        try:
            passwd = _read(os.path.join(tmp, "etc", "passwd"))
            group = _read(os.path.join(tmp, "etc", "group"))
        finally:
            mount.unmount_all(tmp)
    users = []
    for line in passwd:
        f = line.split(":")
        if len(f) >= 4 and f[2].isdigit() and f[3].isdigit():
            users.append((f[0], f[1], int(f[2]), int(f[3])))
    groups = []
    for line in group:
        f = line.split(":")
        if len(f) >= 3 and f[2].isdigit():
            groups.append((f[0], f[1], int(f[2]), [m for m in (f[3] if len(f) > 3 else "").split(",") if m]))
    return users, groups


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def _ensure_shared(source: str, propagation: str) -> None:
    """A mount propagating from the host needs its source on a shared mount (rslave: shared or
    a slave); FailedPrecondition naming the mount otherwise, as containerd."""
    with open("/proc/self/mountinfo") as f:
        best = ("", "")
        for line in f:
            parts = line.split()
            point = parts[4]
            if (source == point or source.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, " ".join(parts[6:parts.index("-")]))
    if "shared:" in best[1] or (propagation == "rslave" and "master:" in best[1]):
        return
    kind = "shared or slave" if propagation == "rslave" else "shared"
    raise errdefs.FailedPrecondition(f"path {source} is mounted on {best[0]} but it is not a {kind} mount")
