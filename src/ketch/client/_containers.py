"""Containers: their spec, made from options the way containerd's client makes it, and the
metadata object that a task is created from."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from google.protobuf import any_pb2

from ketch import errdefs, timestamps
from ketch.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.client._io import IOSpec, ProcessIO, Stdio
from ketch.client._process import Task, resource_limits
from ketch.oci.spec import SPEC_TYPE_URL, default_spec

if TYPE_CHECKING:
    from ketch.client._conn import Connection
    from ketch.client._images import Image

__all__ = ["Container", "Mount", "SpecOptions", "build_spec"]

Mount = Union[str, Mapping[str, Any]]


@dataclass
class SpecOptions:
    """What a container's spec says beyond containerd's defaults."""

    args: Sequence[str] = ()
    env: Sequence[str] | Mapping[str, str] = ()
    cwd: str | None = None
    user: str | tuple[int, int] | None = None
    mounts: Sequence[Mount] = ()
    memory: int | None = None
    cpus: float | None = None
    terminal: bool = False
    hostname: str | None = None
    readonly: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)


def _env_list(env: Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(env, Mapping):
        return [f"{k}={v}" for k, v in env.items()]
    for e in env:
        if "=" not in e:
            raise errdefs.InvalidArgument(f"environment entry {e!r} must be NAME=VALUE")
    return list(env)


def merge_env(base: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``base`` with ``extra`` added; a name set twice keeps its last value, in its first place."""
    out: dict[str, str] = {}
    for e in (*base, *extra):
        name = e.split("=", 1)[0]
        out[name] = e
    return list(out.values())


def parse_mount(m: Mount) -> dict[str, Any]:
    """A bind mount from ``SRC:DST[:ro|rw]``, or an OCI mount dict as it is."""
    if isinstance(m, Mapping):
        if "destination" not in m:
            raise errdefs.InvalidArgument(f"mount {dict(m)!r} needs a destination")
        return dict(m)
    parts = m.split(":")
    if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
        raise errdefs.InvalidArgument(f"mount {m!r}: want /host/path:/container/path[:ro]")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise errdefs.InvalidArgument(f"mount {m!r}: mode must be ro or rw, not {mode!r}")
    return {"destination": parts[1], "type": "bind", "source": parts[0], "options": ["rbind", mode]}


def _lookup(rootfs: str | None, file: str, name: str) -> int:
    if name.isdigit():
        return int(name)
    if rootfs is None:
        raise errdefs.InvalidArgument(f"user {name!r}: names need the rootfs at hand; give numeric ids")
    try:
        with open(os.path.join(rootfs, "etc", file)) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[0] == name:
                    return int(fields[2])
    except OSError:
        pass
    raise errdefs.NotFound(f"no {'user' if file == 'passwd' else 'group'} {name!r} in the container's /etc/{file}")


def resolve_user(user: str | tuple[int, int], rootfs: str | None) -> tuple[int, int]:
    """(uid, gid) for ``uid[:gid]`` or ``name[:group]`` (names from the rootfs's /etc files)."""
    if isinstance(user, tuple):
        return user
    name, _, group = user.partition(":")
    uid = _lookup(rootfs, "passwd", name)
    if group:
        return uid, _lookup(rootfs, "group", group)
    if name.isdigit():
        return uid, 0
    # the user's primary group, from the passwd line
    with open(os.path.join(rootfs or "/", "etc", "passwd")) as f:
        for line in f:
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == name:
                return uid, int(fields[3])
    return uid, 0


def build_spec(namespace: str, container_id: str, opts: SpecOptions, *, rootfs: str | None = None,
               image_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """containerd's default spec, then the image's config (its env, entrypoint and cmd, working
    dir and user), then ``opts``."""
    spec = default_spec(namespace, container_id)
    process = spec["process"]
    args: list[str] = []
    user: str | tuple[int, int] | None = None
    if image_config is not None:
        process["env"] = merge_env(process["env"], image_config.get("Env") or [])
        args = [*(image_config.get("Entrypoint") or []), *(image_config.get("Cmd") or [])]
        if opts.args:
            args = [*(image_config.get("Entrypoint") or []), *opts.args]
        if image_config.get("WorkingDir"):
            process["cwd"] = image_config["WorkingDir"]
        user = image_config.get("User") or None
    else:
        args = list(opts.args)
    if not args:
        raise errdefs.InvalidArgument("the container needs a command (args), and the image names none")
    process["args"] = args
    process["env"] = merge_env(process["env"], _env_list(opts.env))
    if opts.cwd:
        process["cwd"] = opts.cwd
    user = opts.user or user
    if user:
        uid, gid = resolve_user(user, rootfs)
        process["user"] = {"uid": uid, "gid": gid}
    process["terminal"] = opts.terminal
    if rootfs is not None:
        spec["root"] = {"path": os.path.abspath(rootfs)}
    if opts.readonly:
        spec["root"]["readonly"] = True
    if opts.hostname:
        spec["hostname"] = opts.hostname
    spec["mounts"].extend(parse_mount(m) for m in opts.mounts)
    spec["linux"]["resources"].update(resource_limits(opts.memory, opts.cpus))
    if opts.annotations:
        spec["annotations"] = dict(opts.annotations)
    return spec


@dataclass
class Container:
    """A container as the daemon keeps it; tasks are made from it."""

    conn: Connection
    fifo_dir: str
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    snapshotter: str = ""
    snapshot_key: str = ""
    created_at: float | None = None

    @classmethod
    def from_proto(cls, conn: Connection, fifo_dir: str, c: containers_pb2.Container) -> Container:
        spec = json.loads(c.spec.value) if c.spec.value else {}
        return cls(conn, fifo_dir, c.id, dict(c.labels), c.image, c.runtime.name, spec, c.snapshotter,
                   c.snapshot_key, timestamps.seconds(c.created_at) if c.HasField("created_at") else None)

    @property
    def _containers(self) -> Any:
        return self.conn.stub(containers_pb2_grpc.ContainersStub)

    @property
    def _tasks(self) -> Any:
        return self.conn.stub(tasks_pb2_grpc.TasksStub)

    async def _rootfs(self) -> list[Any]:
        if not self.snapshot_key:
            return []
        stub = self.conn.stub(snapshots_pb2_grpc.SnapshotsStub)
        r = await self.conn.call(stub.Mounts, snapshots_pb2.MountsRequest(snapshotter=self.snapshotter,
                                                                          key=self.snapshot_key))
        return list(r.mounts)

    async def new_task(self, io: IOSpec = None, *, options: Any = None, checkpoint: str | None = None) -> Task:
        """Create the container's task (not started: :meth:`Task.start`); ``io`` its stdio.
        ``options``: runtime options for this task (a protobuf message). ``checkpoint``: the
        name of a checkpoint image whose process the task restores (through CRIU) instead of
        starting the spec's anew."""
        terminal = bool(self.spec.get("process", {}).get("terminal"))
        if isinstance(io, Stdio) and io.terminal != terminal:
            raise errdefs.InvalidArgument(f"the container's spec has terminal={terminal}, the IO asks for {io.terminal}")
        request = tasks_pb2.CreateTaskRequest(container_id=self.id, terminal=terminal)
        if checkpoint is not None:
            from ketch.client._checkpoint import checkpoint_descriptor

            request.checkpoint.CopyFrom(await checkpoint_descriptor(self.conn, checkpoint))
        pio = ProcessIO.create(io, self.fifo_dir, self.id).register(self.conn.ios)
        request.stdin, request.stdout, request.stderr = pio.stdin, pio.stdout, pio.stderr
        try:
            request.rootfs.extend(await self._rootfs())
            if options is not None:
                request.options.CopyFrom(pack_options(options))
            r = await self.conn.call(self._tasks.Create, request)
        except BaseException:
            await pio.remove()
            raise
        pio.copy()
        return Task(self.conn, self.id, "", pio, r.pid, spec=self.spec, fifo_dir=self.fifo_dir)

    async def task(self, io: IOSpec = None) -> Task:
        """The container's existing task; with ``io``, copies to and from its FIFOs again (a
        client that restarted, as dockerd's restore)."""
        r = await self.conn.call(self._tasks.Get, tasks_pb2.GetRequest(container_id=self.id))
        p = r.process
        pio = ProcessIO.attach(io, p.stdin, p.stdout, p.stderr, p.terminal).register(self.conn.ios)
        task = Task(self.conn, self.id, "", pio, p.pid, spec=self.spec, fifo_dir=self.fifo_dir)
        if p.status != 1:  # not CREATED: it runs, its stdin can be fed
            pio.started(task.close_stdin)
        return task

    async def checkpoint(self, ref: str, *, task: bool = True, rw: bool = False, exit: bool = False,
                         runtime: bool = True, image: bool = True, options: Any = None) -> Image:
        """Checkpoint the container as the image ``ref``, in containerd's format (``ctr
        containers restore`` reads it): with ``task`` its running process (CRIU images and
        spec, through the daemon's Tasks.Checkpoint; ``exit``: the task stops after), with
        ``runtime`` its runtime options, with ``image`` the image it was made from, with ``rw``
        the changes of its rw layer. ``options``: a ``containerd.runc.v1.CheckpointOptions``
        (open TCP connections, external unix sockets, terminal...). The task is paused
        meanwhile. AlreadyExists if ``ref`` names an image."""
        from ketch.client._checkpoint import checkpoint

        return await checkpoint(self.conn, self.id, ref, task=task, rw=rw, exit=exit, runtime=runtime, image=image,
                                options=options)

    async def update_labels(self, labels: Mapping[str, str | None]) -> dict[str, str]:
        """Set (or, with None, remove) the given labels; the labels after."""
        request = containers_pb2.UpdateContainerRequest()
        request.container.id = self.id
        for k, v in labels.items():
            if v is not None:
                request.container.labels[k] = v
        request.update_mask.paths.extend(f"labels.{k}" for k in labels)
        r = await self.conn.call(self._containers.Update, request)
        self.labels = dict(r.container.labels)
        return self.labels

    async def delete(self, *, snapshot: bool = True) -> None:
        """Remove the container (FailedPrecondition while it has a task) and, with
        ``snapshot``, its snapshot."""
        try:
            await self.conn.call(self._tasks.Get, tasks_pb2.GetRequest(container_id=self.id))
        except errdefs.NotFound:
            pass
        else:
            raise errdefs.FailedPrecondition(f"container {self.id} has a task: delete the task first")
        await self.conn.call(self._containers.Delete, containers_pb2.DeleteContainerRequest(id=self.id))
        if snapshot and self.snapshot_key:
            stub = self.conn.stub(snapshots_pb2_grpc.SnapshotsStub)
            try:
                await self.conn.call(stub.Remove, snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=self.snapshotter, key=self.snapshot_key))
            except errdefs.NotFound:
                pass


def pack_options(options: Any) -> any_pb2.Any:
    """A protobuf message as an Any, its type URL the bare full name (containerd's typeurl)."""
    return any_pb2.Any(type_url=options.DESCRIPTOR.full_name, value=options.SerializeToString())


def spec_any(spec: Mapping[str, Any]) -> any_pb2.Any:
    return any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode())
