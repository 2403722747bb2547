"""Checkpoint and restore through the ketch shim (runc checkpoint / restore with CRIU) under
Debian's containerd 1.6, driven by its ctr and its gRPC API; criu from ``../shared/criu``
(ketch.testing.criu), on the daemon's PATH.

The container counts in memory (``i``, written to /tmp/n every 0.2 s): a restored process that
goes on from the checkpointed value proves its memory came back; a fresh start would count from 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ketch import AsyncClient
from ketch.client import LogURI
from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.api.containerd.types import descriptor_pb2
from ketch.client._containers import pack_options
from ketch.shim.keeper import parent_pid
from ketch.testing import criu, images
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME
from tests.interop.conftest import Env, running

IMAGE = "example.com/ketch/counter:1"
CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
#: counts in memory, to /tmp/n and stdout; a /tmp/jump made meanwhile adds 1000 once (so a
#: restored value tells the checkpointed memory from the process that went on after the checkpoint)
COUNTER = """#!/bin/sh
i=0
while true; do
  i=$((i+1))
  if [ -e /tmp/jump ]; then i=$((i+1000)); rm /tmp/jump; fi
  echo $i > /tmp/n
  echo "n=$i"
  sleep 0.2
done
"""


#: holds a TCP connection open inside the container (to itself, over its own loopback); the
#: listener's stdin stays open (at EOF on it, busybox nc closes the connection)
TCP = """#!/bin/sh
sleep 100000 | nc -l -p 5000 > /dev/null &
sleep 0.5
while true; do echo x; sleep 0.2; done | nc 127.0.0.1 5000
"""


@pytest.fixture(scope="module")
def counter_archive(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("counter") / "rootfs"
    shutil.copytree(rootfs, root, symlinks=True)
    (root / "count").write_text(COUNTER)
    (root / "count").chmod(0o755)
    (root / "tcp").write_text(TCP)
    (root / "tcp").chmod(0o755)
    out = root.parent / "counter.tar"
    images.write_oci_archive(images.image_from_dir(root, IMAGE, cmd=("/count",)), out)
    return out


@pytest.fixture(scope="module")
def criu_bin() -> str:
    return criu.setup()  # fails (never skips) when criu cannot be set up


@pytest.fixture
def cenv(rootfs: Path, criu_bin: str) -> Iterator[Env]:
    """Debian's containerd with the ketch shim, criu on its (and so the shim's) PATH."""
    with running("containerd", KETCH_RUNTIME, rootfs, path=(os.path.dirname(criu_bin),)) as e:
        yield e


@pytest.fixture
def bare(rootfs: Path) -> Iterator[Env]:
    """The same without criu on the PATH."""
    with running("containerd", KETCH_RUNTIME, rootfs) as e:
        yield e


class Counter:
    """A counting container of ``env`` in namespace ``ns``, seen from the host."""

    def __init__(self, env: Env, ns: str, id: str) -> None:
        self.env, self.ns, self.id = env, ns, id

    def run(self) -> None:
        self.env.ctr(self.ns, "run", "-d", *self.env.fifo, "--runtime", self.env.runtime, IMAGE, self.id)

    def path(self, name: str) -> Path:
        return self.env.cd.bundle(self.ns, self.id) / "rootfs" / "tmp" / name

    def value(self) -> int:
        for _ in range(50):  # the shell truncates before it writes
            text = self.path("n").read_text().strip() if self.path("n").exists() else ""
            if text:
                return int(text)
            time.sleep(0.02)
        raise AssertionError(f"{self.id}: /tmp/n stays empty")

    def until(self, check: str, pred: Callable[[int], bool], timeout: float = 30) -> int:
        """The counter's value once ``pred`` holds for it (``check`` says what is awaited)."""
        deadline = time.monotonic() + timeout
        v = -1
        while time.monotonic() < deadline:
            v = self.value() if self.path("n").exists() else -1
            if pred(v):
                return v
            time.sleep(0.05)
        raise AssertionError(f"{self.id}: counter {v}, waited for {check}")

    def exec(self, *args: str) -> str:
        return self.env.ctr(self.ns, "task", "exec", *self.env.fifo, "--exec-id", support.unique("x"), self.id,
                            *args).stdout

    def status(self) -> str:
        for line in self.env.ctr(self.ns, "task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields[0] == self.id:
                return fields[2]
        return ""

    def remove_task(self) -> None:
        if self.status() not in ("STOPPED", ""):
            self.env.ctr(self.ns, "task", "kill", "-s", "SIGKILL", self.id)
            deadline = time.monotonic() + 20
            while self.status() != "STOPPED" and time.monotonic() < deadline:
                time.sleep(0.05)
        self.env.ctr(self.ns, "task", "rm", self.id)


def _api(env: Env, ns: str) -> tuple[grpc.Channel, tuple[tuple[str, str]]]:
    return grpc.insecure_channel(f"unix://{env.cd.address}"), (("containerd-namespace", ns),)


def checkpoint_api(env: Env, ns: str, id: str, options: oci_pb2.CheckpointOptions) -> list[descriptor_pb2.Descriptor]:
    """containerd's Tasks.Checkpoint with runc checkpoint options (what its Go client sends for
    io.containerd.runc runtimes, and ctr cannot ask for another runtime); the descriptors."""
    channel, md = _api(env, ns)
    with channel:
        r = tasks_pb2_grpc.TasksStub(channel).Checkpoint(
            tasks_pb2.CheckpointTaskRequest(container_id=id, options=pack_options(options)), metadata=md, timeout=120)
    return list(r.descriptors)


def restore_api(env: Env, ns: str, id: str, checkpoint: descriptor_pb2.Descriptor, *, stdout: str = "",
                terminal: bool = False, options: oci_pb2.Options | None = None) -> int:
    """A new task of the existing container ``id`` restored from ``checkpoint`` (a CRIU image
    tar in the content store) on its own snapshot, as dockerd's start --checkpoint does, its
    output to ``stdout`` (and stderr), with runtime ``options``; its pid."""
    channel, md = _api(env, ns)
    with channel:
        mounts = snapshots_pb2_grpc.SnapshotsStub(channel).Mounts(
            snapshots_pb2.MountsRequest(snapshotter="overlayfs", key=id), metadata=md, timeout=30).mounts
        tasks = tasks_pb2_grpc.TasksStub(channel)
        tasks.Create(tasks_pb2.CreateTaskRequest(container_id=id, rootfs=mounts, checkpoint=checkpoint,
                                                 stdout=stdout, stderr="" if terminal else stdout,
                                                 terminal=terminal,
                                                 options=pack_options(options) if options else None),
                     metadata=md, timeout=120)
        return int(tasks.Start(tasks_pb2.StartRequest(container_id=id), metadata=md, timeout=120).pid)


def _fifo_dirs(id: str) -> set[Path]:
    """ctr containers restore makes its FIFOs under /run/containerd/fifo (it has no --fifo-dir)
    and leaves them: the directories holding ``id``'s."""
    base = Path("/run/containerd/fifo")
    return {p.parent for p in base.glob(f"*/{id}-std*")} if base.is_dir() else set()


def test_ctr_checkpoint_leave_running_then_restore_live_rw(cenv: Env, counter_archive: Path) -> None:
    ns, cid, ref = cenv.ns(), support.unique("ck"), "example.com/ketch/checkpoint:1"
    cenv.ctr(ns, "images", "import", str(counter_archive))
    c = Counter(cenv, ns, cid)
    try:
        c.run()
        c.exec("touch", "/tmp/before")
        before = c.until(">= 5", lambda v: v >= 5)
        cenv.ctr(ns, "containers", "checkpoint", "--task", "--rw", cid, ref, timeout=180)
        assert c.status() == "RUNNING"  # left running, and resumed
        after = c.value()
        c.until("counting on", lambda v: v > after)
        # what happens from now on is not in the checkpoint: a jump of 1000, a file
        c.exec("touch", "/tmp/after", "/tmp/jump")
        peak = c.until("the jump", lambda v: v >= before + 1000)
        c.remove_task()
        cenv.ctr(ns, "containers", "rm", cid)

        cenv.ctr(ns, "containers", "restore", "--live", "--rw", cid, ref, timeout=180)
        assert c.status() == "RUNNING"
        restored = c.value()
        assert before <= restored < before + 1000 <= peak, (before, restored, peak)
        assert c.until("counting on", lambda v: v > restored) < before + 1000
        # its files: those written before the checkpoint, not those after
        assert int(c.exec("cat", "/tmp/n")) >= restored
        assert c.exec("ls", "/tmp/before").strip() == "/tmp/before"
        assert not c.path("after").exists()
        assert not c.path("jump").exists()
    finally:
        for d in _fifo_dirs(cid):
            shutil.rmtree(d, ignore_errors=True)


def test_checkpoint_with_exit_then_restore_into_the_same_container(cenv: Env, counter_archive: Path,
                                                                   tmp_path: Path) -> None:
    ns, cid = cenv.ns(), support.unique("ck")
    cenv.ctr(ns, "images", "import", str(counter_archive))
    c = Counter(cenv, ns, cid)
    c.run()
    c.until(">= 5", lambda v: v >= 5)
    descriptors = checkpoint_api(cenv, ns, cid, oci_pb2.CheckpointOptions(exit=True))
    [image] = [d for d in descriptors if d.media_type == CRIU_TAR]
    assert image.size > 0
    # the task exited with the checkpoint, and its exit was reported as any other
    deadline = time.monotonic() + 20
    while c.status() != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.status() == "STOPPED"
    at_exit = c.value()
    time.sleep(0.5)
    assert c.value() == at_exit
    c.remove_task()

    log = tmp_path / "restored.log"
    restore_api(cenv, ns, cid, image, stdout=f"file://{log}")
    assert c.status() == "RUNNING"
    first = c.until("a new value", lambda v: v != at_exit)
    assert at_exit < first <= at_exit + 2, (at_exit, first)  # from its memory, not from 1
    c.until("counting on", lambda v: v > first)
    # its stdout is the new task's, as for a fresh create
    _until_logged(log, first + 1)


def _until_logged(log: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f"n={n}" in log.read_text().split():
            return
        time.sleep(0.05)
    raise AssertionError(f"n={n} not in {log}: {log.read_text() if log.exists() else '(none)'}")


def test_a_restored_init_is_served_as_a_created_one(cenv: Env, counter_archive: Path, tmp_path: Path) -> None:
    """The restored init is the serving shim's child (runc restore --detach leaves it to the
    shim, a subreaper, as runc create does), under the group's keeper; exec, pause and resume
    work on it, its output goes on, and its exit is reported with its status."""
    ns, cid = cenv.ns(), support.unique("ck")
    cenv.ctr(ns, "images", "import", str(counter_archive))
    c = Counter(cenv, ns, cid)
    c.run()
    c.until(">= 5", lambda v: v >= 5)
    [image] = [d for d in checkpoint_api(cenv, ns, cid, oci_pb2.CheckpointOptions(exit=True))
               if d.media_type == CRIU_TAR]
    deadline = time.monotonic() + 20
    while c.status() != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    c.remove_task()
    log = tmp_path / "restored.log"
    pid = restore_api(cenv, ns, cid, image, stdout=f"file://{log}")
    shim = parent_pid(pid)
    assert shim in support.shim_pids(ns), "the serving shim reaps the restored init"
    assert parent_pid(shim) in support.keeper_pids(ns)
    assert c.exec("echo", "alive") == "alive\n"
    cenv.ctr(ns, "task", "pause", cid)
    assert c.status() == "PAUSED"
    cenv.ctr(ns, "task", "resume", cid)
    v = c.value()
    c.until("counting on", lambda n: n > v + 2)
    _until_logged(log, v + 2)
    cenv.ctr(ns, "task", "kill", "-s", "SIGKILL", cid)
    deadline = time.monotonic() + 20
    while c.status() != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    channel, md = _api(cenv, ns)
    with channel:
        deleted = tasks_pb2_grpc.TasksStub(channel).Delete(tasks_pb2.DeleteTaskRequest(container_id=cid), metadata=md)
    assert (deleted.pid, deleted.exit_status) == (pid, 128 + signal.SIGKILL)


def _image_criu_tar(env: Env, ns: str, name: str) -> descriptor_pb2.Descriptor:
    """The CRIU tar of the checkpoint image ``name`` (an OCI index in the content store)."""
    channel, md = _api(env, ns)
    with channel:
        target = images_pb2_grpc.ImagesStub(channel).Get(images_pb2.GetImageRequest(name=name), metadata=md).image.target
    index = json.loads(env.ctr(ns, "content", "get", target.digest).stdout)
    [tar] = [m for m in index["manifests"] if m["mediaType"] == CRIU_TAR]
    return descriptor_pb2.Descriptor(media_type=tar["mediaType"], digest=tar["digest"], size=tar["size"])


def test_ctr_task_checkpoint_leaves_it_running_and_restores(cenv: Env, counter_archive: Path) -> None:
    ns, cid = cenv.ns(), support.unique("ck")
    cenv.ctr(ns, "images", "import", str(counter_archive))
    c = Counter(cenv, ns, cid)
    c.run()
    before = c.until(">= 5", lambda v: v >= 5)
    name = cenv.ctr(ns, "task", "checkpoint", cid, timeout=180).stdout.strip()
    assert c.status() == "RUNNING"
    assert name in cenv.ctr(ns, "images", "ls", "-q").stdout.split()
    c.exec("touch", "/tmp/jump")
    c.until("the jump", lambda v: v >= before + 1000)
    c.remove_task()

    # the image's CRIU tar restores: the process from the checkpoint, before the jump
    restore_api(cenv, ns, cid, _image_criu_tar(cenv, ns, name))
    restored = c.until("the checkpointed count", lambda v: v < before + 1000)
    assert restored >= before
    c.until("counting on", lambda v: v > restored)


def test_a_terminal_task_is_checkpointed_and_restored_with_a_pty(cenv: Env, counter_archive: Path,
                                                                  tmp_path: Path) -> None:
    """The terminal option (criu --shell-job): the restored process gets the new task's pty."""
    ns, cid = cenv.ns(), support.unique("ck")
    cenv.ctr(ns, "images", "import", str(counter_archive))
    log, restored_log = tmp_path / "tty.log", tmp_path / "restored.log"

    async def create() -> None:
        async with AsyncClient(cenv.cd.address, ns) as client:
            container = await client.create_container(cid, image=IMAGE, runtime=KETCH_RUNTIME, terminal=True)
            await (await container.new_task(LogURI(f"file://{log}"))).start()

    asyncio.run(create())
    c = Counter(cenv, ns, cid)
    before = c.until(">= 5", lambda v: v >= 5)
    _until_logged(log, before)
    [image] = [d for d in checkpoint_api(cenv, ns, cid, oci_pb2.CheckpointOptions(exit=True, terminal=True))
               if d.media_type == CRIU_TAR]
    deadline = time.monotonic() + 20
    while c.status() != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    at_exit = c.value()
    c.remove_task()
    restore_api(cenv, ns, cid, image, stdout=f"file://{restored_log}", terminal=True)
    first = c.until("a new value", lambda v: v != at_exit)
    assert at_exit < first <= at_exit + 2, (at_exit, first)
    _until_logged(restored_log, first + 1)


def test_a_failed_dump_quotes_criu_and_open_tcp_reaches_it(cenv: Env, counter_archive: Path) -> None:
    """An established TCP connection: criu refuses to dump it unless told (open_tcp, criu's
    --tcp-established); the error quotes criu's log, kept as the bundle's criu-dump.log. Told,
    criu goes on to dump the socket (which this host's kernel does not let it finish: the
    TCP repair getsockopts are "not supported" here, so the test stops at criu's words)."""
    ns, cid = cenv.ns(), support.unique("ck")
    cenv.ctr(ns, "images", "import", str(counter_archive))
    cenv.ctr(ns, "run", "-d", *cenv.fifo, "--runtime", cenv.runtime, IMAGE, cid, "/tcp")
    bundle = cenv.cd.bundle(ns, cid)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the connection is up: ESTABLISHED in the container's /proc/net/tcp
        pids = cenv.ctr(ns, "task", "ps", cid).stdout.split()[2::2]
        tcp = Path(f"/proc/{pids[0]}/net/tcp").read_text() if pids else ""
        if any(line.split()[3] == "01" for line in tcp.splitlines()[1:]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no established connection in {cid}: {tcp}")
    r = cenv.ctr(ns, "task", "checkpoint", cid, check=False, timeout=120)
    assert r.returncode != 0
    assert "runc checkpoint failed" in r.stderr and "criu's log" in r.stderr
    assert "--tcp-established" in r.stderr, r.stderr  # criu's own advice, from its log
    assert "--tcp-established" in (bundle / "criu-dump.log").read_text()
    status = cenv.ctr(ns, "task", "ls").stdout
    assert f"{cid} " in status and "RUNNING" in status
    # told, criu takes the connection on (the advice is gone); the task runs on either way
    with pytest.raises(grpc.RpcError) as told:
        checkpoint_api(cenv, ns, cid, oci_pb2.CheckpointOptions(open_tcp=True))
    details = str(told.value.details())
    assert "criu's log" in details and "--tcp-established" not in details, details
    assert "RUNNING" in cenv.ctr(ns, "task", "ls").stdout


def test_criu_path_is_the_criu_runc_runs(bare: Env, counter_archive: Path, criu_bin: str) -> None:
    """No criu on the daemon's (and shim's, and runc's) PATH: the runtime option criu_path
    names it (runc --criu), for the checkpoint and for the restore."""
    assert shutil.which("criu") is None, "a criu on PATH would make this test prove nothing"
    ns, cid = bare.ns(), support.unique("ck")
    bare.ctr(ns, "images", "import", str(counter_archive))
    options = oci_pb2.Options(criu_path=criu_bin)

    async def create() -> None:
        async with AsyncClient(bare.cd.address, ns) as client:
            container = await client.create_container(cid, image=IMAGE, runtime=KETCH_RUNTIME)
            await (await container.new_task(None, options=options)).start()

    asyncio.run(create())
    c = Counter(bare, ns, cid)
    before = c.until(">= 5", lambda v: v >= 5)
    name = bare.ctr(ns, "task", "checkpoint", cid, timeout=180).stdout.strip()
    c.exec("touch", "/tmp/jump")
    c.until("the jump", lambda v: v >= before + 1000)
    c.remove_task()
    restore_api(bare, ns, cid, _image_criu_tar(bare, ns, name), options=options)
    restored = c.until("the checkpointed count", lambda v: v < before + 1000)
    c.until("counting on", lambda v: v > restored)


def _fail_criu(path: Path) -> Path:
    path.write_text("#!/bin/sh\necho 'Error (criu/cr-check.c:1): vdso: Failed to fill self vdso symtable' >&2\n"
                    "echo 'Looks bad.' >&2\nexit 1\n")
    path.chmod(stat.S_IRWXU)
    return path


@pytest.mark.parametrize("case", ["missing", "failing"])
def test_without_a_working_criu_checkpoint_is_failed_precondition_naming_criu(
        bare: Env, counter_archive: Path, tmp_path: Path, case: str) -> None:
    """criu_path (the runc option) pointing at no criu, or at a criu whose check fails: the
    checkpoint is refused, saying so, and the task runs on."""
    ns, cid = bare.ns(), support.unique("ck")
    bare.ctr(ns, "images", "import", str(counter_archive))
    criu_path = str(tmp_path / "no-criu") if case == "missing" else str(_fail_criu(tmp_path / "criu"))

    async def create() -> None:
        async with AsyncClient(bare.cd.address, ns) as client:
            container = await client.create_container(cid, image=IMAGE, runtime=KETCH_RUNTIME)
            task = await container.new_task(None, options=oci_pb2.Options(criu_path=criu_path))
            await task.start()

    asyncio.run(create())
    c = Counter(bare, ns, cid)
    c.until(">= 2", lambda v: v >= 2)
    r = bare.ctr(ns, "task", "checkpoint", cid, check=False, timeout=120)
    assert r.returncode != 0
    assert "failed precondition" in r.stderr
    if case == "missing":
        assert f"criu_path '{criu_path}' is not an executable file" in r.stderr
    else:
        assert f"criu check failed ({criu_path})" in r.stderr and "vdso: Failed to fill self vdso symtable" in r.stderr
    with pytest.raises(grpc.RpcError) as e:
        checkpoint_api(bare, ns, cid, oci_pb2.CheckpointOptions(exit=True))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "criu" in str(e.value.details())
    assert c.status() == "RUNNING"
    v = c.value()
    c.until("counting on", lambda n: n > v)
