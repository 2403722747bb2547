"""Pod sandboxes, as containerd's CRI makes them: a pause container from the sandbox image, in a
network namespace of its own attached through CNI, holding the pod's IPC and UTS namespaces
and its ``/dev/shm`` for the pod's containers to join.

Everything a pod is can be rebuilt from disk: the pause container's record in the ``k8s.io``
namespace (labelled ``io.cri-containerd.kind=sandbox``) carries the pod's configuration, its
network namespace and addresses as an extension; its task is the runtime's. A pod is READY
while its pause process runs. Stop kills the pause container (the pod's containers first) and
always releases the network (CNI DEL, then the netns); Remove stops first, then deletes the
task, the record, the snapshot and the pod's directories.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from ketch import errdefs, mount
from ketch.api.containerd.types import mount_pb2
from ketch.api.containerd.types.task import task_pb2 as task_types
from ketch.api.k8s.cri.runtime.v1 import api_pb2 as cri
from ketch.cri import cni, netns
from ketch.cri.images import NAMESPACE, CriImages
from ketch.metadata import Container, LeaseStore, Runtime, TypedValue
from ketch.metadata.local import ContainerService
from ketch.oci.spec import SPEC_TYPE_URL, default_spec
from ketch.runtime import CreateOptions, TaskManager
from ketch.snapshots.service import SnapshotService

__all__ = ["KIND_LABEL", "Pods", "Sandbox", "by_id_prefix", "records"]

log = logging.getLogger("ketch.cri")

KIND_LABEL = "io.cri-containerd.kind"
SANDBOX_EXTENSION = "io.cri-containerd.sandbox.metadata"
SANDBOX_TYPE_URL = "ketch.cri.v1.Sandbox"
#: the annotations by which runtimes (and ketchd's shim grouping) know a pod's containers
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
SANDBOX_LOG_DIR = "io.kubernetes.cri.sandbox-log-directory"
#: the pause container's OOM score (containerd's defaultSandboxOOMAdj) and CPU shares
SANDBOX_OOM_SCORE_ADJ = -998
SANDBOX_CPU_SHARES = 2
STOP_TIMEOUT = 10.0

NODE = cri.NamespaceMode.NODE
POD = cri.NamespaceMode.POD


@dataclass
class Sandbox:
    """What ketchd keeps of a pod (the pause container's extension, as JSON)."""

    id: str
    name: str
    config: str
    """The PodSandboxConfig, serialized and base64-encoded."""
    runtime_handler: str = ""
    netns: str = ""
    ips: list[str] = field(default_factory=list)
    created_at: int = 0
    stopped: bool = False

    @property
    def pod(self) -> cri.PodSandboxConfig:
        config = cri.PodSandboxConfig()
        config.ParseFromString(base64.b64decode(self.config))
        return config

    def encode(self) -> TypedValue:
        return TypedValue(SANDBOX_TYPE_URL, json.dumps(asdict(self)).encode())

    @classmethod
    def decode(cls, value: TypedValue) -> Sandbox:
        return cls(**json.loads(value.value))


@contextlib.asynccontextmanager
async def creating(leases: LeaseStore) -> AsyncIterator[str]:
    """A lease holding what a create makes (its snapshot) until the record that holds it
    exists: garbage collection running meanwhile must not take it."""
    lease = f"cri-create-{time.time_ns()}-{secrets.token_hex(4)}"
    expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    leases.create(NAMESPACE, lease, {"containerd.io/gc.expire": expire})
    try:
        yield lease
    finally:
        with contextlib.suppress(errdefs.KetchError):
            leases.delete(NAMESPACE, lease)


def sandbox_name(md: cri.PodSandboxMetadata) -> str:
    """The unique name of a pod attempt, as containerd makes it."""
    return f"{md.name}_{md.namespace}_{md.uid}_{md.attempt}"


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_Identified)


def records(containers: ContainerService, kind: str, extension: str, decode: Callable[[Any], R]) -> list[R]:
    """Every CRI record of ``kind`` ("sandbox", "container"): the extension the CRI keeps on
    its containerd container, decoded."""
    out = []
    for c in containers.list(NAMESPACE, [f'labels."{KIND_LABEL}"=={kind}']):
        ext = c.extensions.get(extension)
        if ext is not None:
            out.append(decode(ext))
    return out


def by_id_prefix(items: list[R], ref: str, what: str) -> R:
    """The one of ``items`` whose id is ``ref`` or starts with it (as crictl lets a person
    type); InvalidArgument when empty or ambiguous, NotFound when none."""
    if not ref:
        raise errdefs.InvalidArgument(f"{what} id must not be empty")
    matches = [item for item in items if item.id.startswith(ref)]
    if not matches:
        raise errdefs.NotFound(f"{what} {ref!r}")
    if len(matches) > 1:
        raise errdefs.InvalidArgument(f"{what} id prefix {ref!r} is ambiguous")
    return matches[0]


class Pods:
    def __init__(self, *, images: CriImages, containers: ContainerService, tasks: TaskManager,
                 snapshots: SnapshotService, leases: LeaseStore, cni_runner: cni.CNI, cni_conf_dir: str, snapshotter: str,
                 runtime: str, sandbox_image: str, state_dir: str, restrict_oom_score_adj: bool,
                 collect: Callable[[], object]) -> None:
        self._images = images
        self._containers = containers
        self._tasks = tasks
        self._snapshots = snapshots
        self.leases = leases
        self._cni = cni_runner
        self._cni_conf_dir = cni_conf_dir
        self._snapshotter = snapshotter
        self._runtime = runtime
        self._sandbox_image = sandbox_image
        self._state_dir = state_dir
        self._restrict_oom = restrict_oom_score_adj
        self._collect = collect
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, id: str) -> asyncio.Lock:
        return self._locks.setdefault(id, asyncio.Lock())

    def dir(self, id: str) -> str:
        """The pod's own files (hostname, resolv.conf, hosts, shm) in ketchd's state."""
        return os.path.join(self._state_dir, "cri", "sandboxes", id)

    # -- lookups ----------------------------------------------------------------------------

    def all(self) -> list[Sandbox]:
        return records(self._containers, "sandbox", SANDBOX_EXTENSION, Sandbox.decode)

    def get(self, ref: str) -> Sandbox:
        """The pod ``ref`` names: its id or an unambiguous prefix of it; NotFound."""
        return by_id_prefix(self.all(), ref, "pod sandbox")

    async def state(self, sandbox: Sandbox) -> cri.PodSandboxState:
        """SANDBOX_READY while the pause process runs."""
        if sandbox.stopped or not self._tasks.exists(NAMESPACE, sandbox.id):
            return cri.PodSandboxState.SANDBOX_NOTREADY
        try:
            process = await self._tasks.get(NAMESPACE, sandbox.id).state()
        except errdefs.KetchError:
            return cri.PodSandboxState.SANDBOX_NOTREADY
        running = process.status in (task_types.RUNNING, task_types.PAUSED, task_types.PAUSING)
        return cri.PodSandboxState.SANDBOX_READY if running else cri.PodSandboxState.SANDBOX_NOTREADY

    async def port_forward(self, ref: str, port: int) -> socket.socket:
        """A connection to ``port`` on the pod's loopback (inside its network namespace; the
        host's for a pod on the host network)."""
        sandbox = self.get(ref)
        if await self.state(sandbox) != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        return await netns.connect(sandbox.netns, port)

    # -- run --------------------------------------------------------------------------------

    async def run(self, config: cri.PodSandboxConfig, runtime_handler: str = "") -> str:
        md = config.metadata
        if not md.name or not md.namespace or not md.uid:
            raise errdefs.InvalidArgument("pod sandbox metadata needs a name, a namespace and a uid")
        runtime = self._runtime_for(runtime_handler)
        name = sandbox_name(md)
        for other in self.all():
            if other.name == name:
                raise errdefs.AlreadyExists(f"pod sandbox name {name!r} is reserved for {other.id}")
        id = secrets.token_hex(32)
        sandbox = Sandbox(id, name, base64.b64encode(config.SerializeToString()).decode(), runtime_handler,
                          created_at=time.time_ns())
        image = self._images.find(self._sandbox_image)
        if image is None:
            await self._images.pull(self._sandbox_image)
            image = self._images.find(self._sandbox_image)
            if image is None:
                raise errdefs.NotFound(f"sandbox image {self._sandbox_image} vanished after its pull")
        opts = config.linux.security_context.namespace_options
        undo: list[Callable[[], Any]] = []
        try:
            os.makedirs(self.dir(id), mode=0o711)
            undo.append(lambda: shutil.rmtree(self.dir(id), ignore_errors=True))
            self._write_files(config, id)
            if opts.ipc != NODE:
                shm = os.path.join(self.dir(id), "shm")
                os.makedirs(shm, exist_ok=True)
                await asyncio.to_thread(mount.mount, mount.Mount("tmpfs", "shm", (
                    "nosuid", "noexec", "nodev", "mode=1777", "size=65536k")), shm)
                undo.append(lambda: mount.unmount_all(shm))
            if opts.network != NODE:
                sandbox.netns = await netns.create()
                undo.append(lambda: netns.remove(sandbox.netns))
                await self._attach_network(config, sandbox)
                undo.append(lambda: self._detach_network(config, sandbox))
            spec = self._spec(config, sandbox, image.config)
            chain = self._images.chain_id(image)
            async with creating(self.leases) as lease:
                mounts = await self._snapshots.prepare(NAMESPACE, self._snapshotter, id, chain, lease=lease)
                undo.append(lambda: self._snapshots.remove(NAMESPACE, self._snapshotter, id))
                container = self._containers.create(NAMESPACE, Container(
                    id=id, labels={**dict(config.labels), KIND_LABEL: "sandbox"}, image=image.id,
                    runtime=Runtime(runtime), spec=TypedValue(SPEC_TYPE_URL, json.dumps(spec).encode()),
                    snapshotter=self._snapshotter, snapshot_key=id,
                    extensions={SANDBOX_EXTENSION: sandbox.encode()}))
            undo.append(lambda: self._containers.delete(NAMESPACE, container.id))
            rootfs = [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]
            task = await self._tasks.create(NAMESPACE, container, CreateOptions(rootfs=rootfs))
            undo.append(lambda: self._tasks.delete(NAMESPACE, id))
            undo.append(lambda: task.kill(signal.SIGKILL))
            await task.start()
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    result = step()
                    if asyncio.iscoroutine(result):
                        await result
            raise
        log.info("pod sandbox %s (%s) ready, ips %s", id, name, sandbox.ips)
        return id

    def _runtime_for(self, handler: str) -> str:
        if handler in ("", "runc", "ketch", self._runtime):
            return self._runtime
        if handler.startswith("io.containerd."):
            return handler
        raise errdefs.NotFound(f"no runtime for handler {handler!r}")

    def _write_files(self, config: cri.PodSandboxConfig, id: str) -> None:
        d = self.dir(id)
        hostname = config.hostname or socket.gethostname()
        with open(os.path.join(d, "hostname"), "w") as f:
            f.write(hostname + "\n")
        dns = config.dns_config
        if dns.servers or dns.searches or dns.options:
            lines = [f"nameserver {s}" for s in dns.servers]
            if dns.searches:
                lines.append("search " + " ".join(dns.searches))
            if dns.options:
                lines.append("options " + " ".join(dns.options))
            resolv = "\n".join(lines) + "\n"
        else:
            try:
                with open("/etc/resolv.conf") as f:
                    resolv = f.read()
            except OSError:
                resolv = ""
        with open(os.path.join(d, "resolv.conf"), "w") as f:
            f.write(resolv)
        with open(os.path.join(d, "hosts"), "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")

    def _cni_args(self, config: cri.PodSandboxConfig, id: str) -> dict[str, str]:
        md = config.metadata
        return {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": md.namespace, "K8S_POD_NAME": md.name,
                "K8S_POD_INFRA_CONTAINER_ID": id, "K8S_POD_UID": md.uid}

    @staticmethod
    def _capabilities(config: cri.PodSandboxConfig) -> dict[str, Any]:
        ports = [{"hostPort": p.host_port, "containerPort": p.container_port,
                  "protocol": cri.Protocol.Name(p.protocol).lower(), "hostIP": p.host_ip}
                 for p in config.port_mappings if p.host_port > 0]
        caps: dict[str, Any] = {}
        if ports:
            caps["portMappings"] = ports
        dns = config.dns_config
        if dns.servers or dns.searches or dns.options:
            caps["dns"] = {"servers": list(dns.servers), "searches": list(dns.searches), "options": list(dns.options)}
        return caps

    async def _attach_network(self, config: cri.PodSandboxConfig, sandbox: Sandbox) -> None:
        network = cni.load(self._cni_conf_dir)
        got = await self._cni.add(network, sandbox.id, sandbox.netns, args=self._cni_args(config, sandbox.id),
                                  capabilities=self._capabilities(config))
        sandbox.ips = got.ips

    async def _detach_network(self, config: cri.PodSandboxConfig, sandbox: Sandbox) -> None:
        try:
            network = cni.load(self._cni_conf_dir)
        except errdefs.NotFound:
            log.warning("pod %s: no CNI config left to detach its network with", sandbox.id)
            return
        await self._cni.delete(network, sandbox.id, sandbox.netns, args=self._cni_args(config, sandbox.id))

    def _spec(self, config: cri.PodSandboxConfig, sandbox: Sandbox, image_config: dict[str, Any]) -> dict[str, Any]:
        spec = default_spec(NAMESPACE, sandbox.id)
        img = image_config.get("config") or {}
        args = [*(img.get("Entrypoint") or []), *(img.get("Cmd") or [])]
        if not args:
            raise errdefs.InvalidArgument(f"sandbox image {self._sandbox_image} has no entrypoint or command")
        process = spec["process"]
        process["args"] = args
        process["env"] = list(img.get("Env") or process["env"])
        process["cwd"] = img.get("WorkingDir") or "/"
        linux_cfg = config.linux
        sec = linux_cfg.security_context
        opts = sec.namespace_options
        oom = SANDBOX_OOM_SCORE_ADJ
        if self._restrict_oom:
            oom = max(oom, _own_oom_score_adj())
        process["oomScoreAdj"] = oom
        if sec.HasField("run_as_user"):
            process["user"]["uid"] = sec.run_as_user.value
        if sec.HasField("run_as_group"):
            process["user"]["gid"] = sec.run_as_group.value
        spec["root"]["readonly"] = True
        spec["hostname"] = config.hostname
        linux = spec["linux"]
        namespaces = []
        for ns in linux["namespaces"]:
            kind = ns["type"]
            if kind == "network":
                if opts.network == NODE:
                    continue
                ns = {"type": "network", "path": sandbox.netns}
            elif kind == "ipc" and opts.ipc == NODE:
                continue
            elif kind == "pid" and opts.pid == NODE:
                continue
            elif kind == "uts" and opts.network == NODE:
                continue
            namespaces.append(ns)
        linux["namespaces"] = namespaces
        if opts.network == NODE:
            spec.pop("hostname", None)
        if linux_cfg.cgroup_parent:
            linux["cgroupsPath"] = os.path.join(linux_cfg.cgroup_parent, sandbox.id)
        if linux_cfg.sysctls:
            linux["sysctl"] = dict(linux_cfg.sysctls)
        linux.setdefault("resources", {})["cpu"] = {"shares": SANDBOX_CPU_SHARES}
        if opts.ipc != NODE:
            spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
            spec["mounts"].append({"destination": "/dev/shm", "type": "bind",
                                   "source": os.path.join(self.dir(sandbox.id), "shm"), "options": ["rbind", "rw"]})
        if sec.privileged:
            linux.pop("maskedPaths", None)
            linux.pop("readonlyPaths", None)
        md = config.metadata
        spec["annotations"] = {**dict(config.annotations), CONTAINER_TYPE: "sandbox", SANDBOX_ID: sandbox.id,
                               SANDBOX_NAME: md.name, SANDBOX_NAMESPACE: md.namespace, SANDBOX_UID: md.uid,
                               SANDBOX_LOG_DIR: config.log_directory}
        return spec

    # -- stop and remove --------------------------------------------------------------------

    async def stop(self, ref: str, stop_containers: Callable[[str], Any] | None = None) -> None:
        """Stop the pod: its containers (``stop_containers``), the pause container, and its
        network, which is always released. Stopping a stopped pod does nothing more."""
        sandbox = self.get(ref)
        async with self._lock(sandbox.id):
            if stop_containers is not None:
                await stop_containers(sandbox.id)
            await self._stop_task(sandbox.id)
            config = sandbox.pod
            if sandbox.netns:
                await self._detach_network(config, sandbox)
                await netns.remove(sandbox.netns)
            shm = os.path.join(self.dir(sandbox.id), "shm")
            await asyncio.to_thread(_unmount_if_mounted, shm)
            if not sandbox.stopped:
                sandbox.stopped = True
                self._save(sandbox)

    async def _stop_task(self, id: str) -> None:
        if not self._tasks.exists(NAMESPACE, id):
            return
        task = self._tasks.get(NAMESPACE, id)
        try:
            state = await task.state()
        except errdefs.KetchError:
            return
        if state.status == task_types.STOPPED:
            return
        waiting = asyncio.ensure_future(task.wait())
        try:
            with contextlib.suppress(errdefs.NotFound):
                await task.kill(signal.SIGKILL, all=True)
            with contextlib.suppress(errdefs.KetchError):
                await asyncio.wait_for(waiting, STOP_TIMEOUT)
        finally:
            waiting.cancel()

    def _save(self, sandbox: Sandbox) -> None:
        c = self._containers.get(NAMESPACE, sandbox.id)
        c.extensions[SANDBOX_EXTENSION] = sandbox.encode()
        self._containers.update(NAMESPACE, c, [f"extensions.{SANDBOX_EXTENSION}"])

    async def remove(self, ref: str, stop_containers: Callable[[str], Any] | None = None,
                     remove_containers: Callable[[str], Any] | None = None) -> None:
        """Remove the pod (stopping it first, as containerd does); nothing when it is gone."""
        try:
            sandbox = self.get(ref)
        except errdefs.NotFound:
            return
        await self.stop(sandbox.id, stop_containers)
        async with self._lock(sandbox.id):
            if remove_containers is not None:
                await remove_containers(sandbox.id)
            if self._tasks.exists(NAMESPACE, sandbox.id):
                await self._tasks.delete(NAMESPACE, sandbox.id)
            with contextlib.suppress(errdefs.NotFound):
                await self._snapshots.remove(NAMESPACE, self._snapshotter, sandbox.id)
            with contextlib.suppress(errdefs.NotFound):
                self._containers.delete(NAMESPACE, sandbox.id)
            await asyncio.to_thread(shutil.rmtree, self.dir(sandbox.id), True)
        self._locks.pop(sandbox.id, None)
        self._collect()

    # -- status -----------------------------------------------------------------------------

    async def status(self, ref: str, verbose: bool = False) -> tuple[cri.PodSandboxStatus, dict[str, str]]:
        sandbox = self.get(ref)
        config = sandbox.pod
        opts = config.linux.security_context.namespace_options
        status = cri.PodSandboxStatus(
            id=sandbox.id, metadata=config.metadata, state=await self.state(sandbox), created_at=sandbox.created_at,
            labels=config.labels, annotations=config.annotations, runtime_handler=sandbox.runtime_handler)
        if sandbox.ips and opts.network != NODE:
            status.network.ip = sandbox.ips[0]
            status.network.additional_ips.extend(cri.PodIP(ip=ip) for ip in sandbox.ips[1:])
        status.linux.namespaces.options.CopyFrom(opts)
        info: dict[str, str] = {}
        if verbose:
            pid = self._tasks.get(NAMESPACE, sandbox.id).pid if self._tasks.exists(NAMESPACE, sandbox.id) else 0
            info["info"] = json.dumps({"pid": pid, "netNamespacePath": sandbox.netns, "image": self._sandbox_image,
                                       "runtimeHandler": sandbox.runtime_handler})
        return status, info

    async def list(self, f: cri.PodSandboxFilter | None = None) -> list[cri.PodSandbox]:
        out = []
        for sandbox in self.all():
            config = sandbox.pod
            state = await self.state(sandbox)
            if f is not None:
                if f.id and not sandbox.id.startswith(f.id):
                    continue
                if f.HasField("state") and f.state.state != state:
                    continue
                if any(config.labels.get(k) != v for k, v in f.label_selector.items()):
                    continue
            out.append(cri.PodSandbox(id=sandbox.id, metadata=config.metadata, state=state,
                                      created_at=sandbox.created_at, labels=config.labels,
                                      annotations=config.annotations, runtime_handler=sandbox.runtime_handler))
        return out


def _own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _unmount_if_mounted(path: str) -> None:
    if os.path.isdir(path):
        mount.unmount_all(path)

