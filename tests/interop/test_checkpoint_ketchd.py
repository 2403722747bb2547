"""Checkpoint and restore on ketchd (its Tasks.Checkpoint and Create from a checkpoint, the
content store side), with runc's shim and the ketch shim, driven by Debian's ctr and by an
experimental dockerd: a container counting in memory (logging each count to a file in its rw
layer) is checkpointed into the content store, removed, restored, and goes on counting where it
stopped; its checkpoint image moves to a second ketchd; a failing criu stores nothing; a ketchd
killed mid-checkpoint leaves nothing that outlives GC. (tests/interop/test_checkpoint.py has
the ketch shim under containerd.)

criu: the 4.1 that ketch.testing.criu sets up (Debian 12's 3.17 fails on this kernel), first on
ketchd's PATH, which its shims and runc inherit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch.api.containerd.runc.options import oci_pb2
from ketch.testing import criu, images, leftovers
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME, Ketchd
from tests.interop.conftest import Env, running
from tests.interop.test_checkpoint import CRIU_TAR, _fifo_dirs, checkpoint_api
from tests.interop.test_dockerd import AliasedKetchd, Docker, Stack

NAME = "docker.io/library/counter:ckd"
#: counts in a shell variable, logging each count: a restart from scratch would log 1 again
COUNTER = """#!/bin/sh
i=0
echo hello > /tmp/before
while true; do i=$((i+1)); echo $i >> /tmp/log; sleep 0.2; done
"""
CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
RUNTIMES = [pytest.param(RUNC_RUNTIME, id="runcshim"), pytest.param(KETCH_RUNTIME, id="ketchshim")]


@pytest.fixture(scope="module")
def criu_bin() -> str:
    return criu.setup()  # fails (never skips) when criu cannot be set up


@pytest.fixture(scope="module")
def criu_dir(criu_bin: str) -> str:
    return os.path.dirname(criu_bin)


@pytest.fixture(scope="module")
def counter_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rootfs = support.make_busybox_rootfs(tmp_path_factory.mktemp("counter") / "rootfs")
    (rootfs / "count").write_text(COUNTER)
    (rootfs / "count").chmod(0o755)
    out = tmp_path_factory.mktemp("counter-archive") / "counter.tar"
    images.write_oci_archive(images.image_from_dir(rootfs, NAME), out)
    return out


@pytest.fixture
def cid() -> Iterator[str]:
    """A container id of the test's own; after it, the FIFOs ctr containers restore leaves."""
    id = support.unique("ck")
    yield id
    for d in _fifo_dirs(id):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=RUNTIMES)
def cenv(request: pytest.FixtureRequest, rootfs: Path, criu_dir: str) -> Iterator[Env]:
    with running("ketchd", request.param, rootfs, path=(criu_dir,)) as e:
        yield e


def counts(env: Env, ns: str, cid: str) -> list[int]:
    """The counts the container's process logged so far (read with an exec)."""
    r = env.ctr(ns, "tasks", "exec", *env.fifo, "--exec-id", support.unique("cat"), cid, "cat", "/tmp/log")
    return [int(line) for line in r.stdout.split()]


def counting_past(env: Env, ns: str, cid: str, n: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = counts(env, ns, cid)
        if seen and seen[-1] > n:
            return seen
        assert time.monotonic() < deadline, f"{cid} is not counting past {n}: {seen[-3:]}"
        time.sleep(0.2)


def status(env: Env, ns: str, cid: str) -> str:
    for line in env.ctr(ns, "tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == cid:
            return fields[-1]
    return ""


def wait_status(env: Env, ns: str, cid: str, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while status(env, ns, cid) != want:
        assert time.monotonic() < deadline, f"{cid} is {status(env, ns, cid)!r}, not {want}"
        time.sleep(0.1)


def start_counter(env: Env, ns: str, cid: str, archive: Path) -> None:
    env.ctr(ns, "images", "import", str(archive))
    env.ctr(ns, "run", "-d", "--null-io", "--runtime", env.runtime, NAME, cid, "/count")
    counting_past(env, ns, cid, 3)


def remove(env: Env, ns: str, cid: str) -> None:
    env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", cid, check=False)
    wait_status(env, ns, cid, "STOPPED")
    env.ctr(ns, "tasks", "rm", cid)
    env.ctr(ns, "containers", "rm", cid)


def assert_restored(env: Env, ns: str, cid: str, before: list[int]) -> None:
    """``cid`` goes on counting from the last count it logged before its checkpoint."""
    wait_status(env, ns, cid, "RUNNING")
    after = counting_past(env, ns, cid, before[-1] + 3)
    assert after == list(range(1, len(after) + 1)), f"the count restarted or skipped: {after}"
    assert env.ctr(ns, "tasks", "exec", *env.fifo, "--exec-id", "before", cid, "cat", "/tmp/before").stdout == "hello\n"


def test_checkpoint_leave_running_then_exit_and_restore(cenv: Env, counter_image: Path, cid: str) -> None:
    ns = cenv.ns()
    start_counter(cenv, ns, cid, counter_image)
    cenv.ctr(ns, "containers", "checkpoint", "--task", "--rw", cid, "ckd/live:1")
    assert "ckd/live:1" in cenv.ctr(ns, "images", "ls", "-q").stdout.split()
    before = counts(cenv, ns, cid)
    counting_past(cenv, ns, cid, before[-1] + 2)  # left running: it counts on
    assert status(cenv, ns, cid) == "RUNNING"

    # ctr task checkpoint: an image (which ctr's containers restore cannot read: it lacks the
    # image name annotation containerd's client looks for); the task goes on
    name = cenv.ctr(ns, "tasks", "checkpoint", cid).stdout.strip()
    digest = next(line.split()[2] for line in cenv.ctr(ns, "images", "ls").stdout.splitlines() if line.startswith(name))
    index = json.loads(cenv.ctr(ns, "content", "get", digest).stdout)
    assert {CRIU_TAR, CONFIG} <= {m["mediaType"] for m in index["manifests"]}
    assert status(cenv, ns, cid) == "RUNNING"
    # a checkpoint that ends the task, with runc's CheckpointOptions as a gRPC client sends them
    # (ctr task checkpoint --exit sends them to io.containerd.runc.* runtimes only)
    assert {d.media_type for d in checkpoint_api(cenv, ns, cid, oci_pb2.CheckpointOptions(exit=True))} == \
        {CRIU_TAR, CONFIG}
    wait_status(cenv, ns, cid, "STOPPED")
    remove(cenv, ns, cid)

    cenv.ctr(ns, "containers", "restore", "--live", "--rw", cid, "ckd/live:1")
    assert_restored(cenv, ns, cid, before)
    work = Path(os.readlink(cenv.cd.bundle(ns, cid) / "work"))
    assert not [p.name for p in work.iterdir() if p.name.startswith("checkpoint-") or p.name == "restore"], \
        "the dump and the restore image are gone from the task's work dir"


def blobs(env: Env, ns: str) -> set[str]:
    return {line.split()[0] for line in env.ctr(ns, "content", "ls").stdout.splitlines()[1:]}


def blob_files(env: Env) -> set[str]:
    d = env.cd.base / "root" / "content" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in d.iterdir()} if d.is_dir() else set()


def collect(env: Env, ns: str) -> None:
    """Delete every lease of ``ns`` (ctr's, that its checkpoint left), and collect garbage now."""
    leases = [line.split()[0] for line in env.ctr(ns, "leases", "ls").stdout.splitlines()[1:]]
    env.ctr(ns, "leases", "create", "--id", "collect")
    env.ctr(ns, "leases", "rm", "--sync", *leases, "collect")


def test_checkpoint_image_migrates_to_another_ketchd(cenv: Env, counter_image: Path, rootfs: Path, criu_dir: str,
                                                     tmp_path: Path, cid: str) -> None:
    ns = cenv.ns()
    start_counter(cenv, ns, cid, counter_image)
    cenv.ctr(ns, "containers", "checkpoint", "--task", "--rw", cid, "ckd/mig:1")
    before = counts(cenv, ns, cid)
    archive = tmp_path / "checkpoint.tar"
    cenv.ctr(ns, "images", "export", "--skip-manifest-json", str(archive), "ckd/mig:1")  # it is no Docker image
    remove(cenv, ns, cid)

    with running("ketchd", cenv.runtime, rootfs, path=(criu_dir,)) as other:
        ns2 = other.ns()
        other.ctr(ns2, "images", "import", str(counter_image))
        other.ctr(ns2, "images", "import", "--no-unpack", str(archive))  # a checkpoint: nothing to unpack
        other.ctr(ns2, "containers", "restore", "--live", "--rw", cid, "ckd/mig:1")
        assert_restored(other, ns2, cid, before)
        remove(other, ns2, cid)


def criu_wrapper(tmp_path: Path, script: str) -> str:
    """A directory holding a ``criu`` that runs ``script``."""
    d = tmp_path / "criu-bin"
    d.mkdir()
    (d / "criu").write_text(f"#!/bin/sh\n{script}\n")
    (d / "criu").chmod(0o755)
    return str(d)


@pytest.mark.parametrize("runtime", [p.values[0] for p in RUNTIMES], ids=[p.id for p in RUNTIMES])
def test_failing_criu_is_failed_precondition_and_stores_nothing(runtime: str, rootfs: Path, counter_image: Path,
                                                                tmp_path: Path, cid: str) -> None:
    wrapper = criu_wrapper(tmp_path, 'echo "Error (criu/cr-check.c:1230): UFFD is not supported"; exit 1')
    with running("ketchd", runtime, rootfs, path=(wrapper,)) as env:
        ns = env.ns()
        start_counter(env, ns, cid, counter_image)
        image_blobs = blobs(env, ns)
        r = env.ctr(ns, "containers", "checkpoint", "--task", "--rw", cid, "ckd/none:1", check=False)
        assert r.returncode != 0
        assert "failed precondition" in r.stderr and f"criu check failed ({wrapper}/criu)" in r.stderr, r.stderr
        assert "UFFD is not supported" in r.stderr
        assert "ckd/none:1" not in env.ctr(ns, "images", "ls", "-q").stdout.split()
        assert status(env, ns, cid) == "RUNNING", "ctr resumed it: the task is as it was"
        collect(env, ns)
        assert blobs(env, ns) == image_blobs and blob_files(env) == image_blobs
        remove(env, ns, cid)


@pytest.mark.parametrize("runtime", [p.values[0] for p in RUNTIMES], ids=[p.id for p in RUNTIMES])
def test_ketchd_killed_during_a_checkpoint_leaves_nothing_after_gc(runtime: str, rootfs: Path, counter_image: Path,
                                                                   criu_bin: str, tmp_path: Path, cid: str) -> None:
    started, done = tmp_path / "dump-started", tmp_path / "dump-done"
    # criu check passes at once; the dump (runc speaks to `criu swrk`) takes 3s longer
    wrapper = criu_wrapper(tmp_path, f"""if [ "$1" = swrk ]; then touch {started}; sleep 3; fi
{criu_bin} "$@"
rc=$?
[ "$1" = swrk ] && touch {done}
exit $rc""")
    with running("ketchd", runtime, rootfs, path=(wrapper,)) as env:
        ns = env.ns()
        start_counter(env, ns, cid, counter_image)
        image_blobs = blobs(env, ns)
        ctr = subprocess.Popen(["ctr", "--address", env.cd.address, "--namespace", ns, "containers", "checkpoint",
                                "--task", "--rw", cid, "ckd/killed:1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not started.exists():
            assert ctr.poll() is None, f"ctr ended before the dump began: {ctr.communicate()}"
            assert time.monotonic() < deadline, "the dump did not begin"
            time.sleep(0.05)
        env.cd.kill(signal.SIGKILL)
        _, err = ctr.communicate(timeout=30)
        assert ctr.returncode != 0, err
        while not done.exists():  # the shim's dump ends on its own (into the directory ketchd made)
            assert time.monotonic() < deadline + 30, "the dump did not end"
            time.sleep(0.1)
        work = Path(os.readlink(env.cd.bundle(ns, cid) / "work"))
        assert [p for p in work.iterdir() if p.name.startswith("checkpoint-")], "the dump ketchd did not store"
        env.cd.start()

        assert not [p for p in work.iterdir() if p.name.startswith("checkpoint-")], "the dump is removed on reload"
        assert "ckd/killed:1" not in env.ctr(ns, "images", "ls", "-q").stdout.split()
        leases = env.ctr(ns, "leases", "ls").stdout
        assert "containerd.io/gc.expire" in leases, f"ctr's lease expires by itself: {leases}"
        assert blobs(env, ns) > image_blobs, "what ctr stored before the dump (rw layer, options), under its lease"
        collect(env, ns)
        assert blobs(env, ns) == image_blobs and blob_files(env) == image_blobs
        assert env.ctr(ns, "content", "active").stdout.splitlines()[1:] == []
        # the task lived through it: ctr paused it for the checkpoint; resumed, it counts on
        if status(env, ns, cid) == "PAUSED":
            env.ctr(ns, "tasks", "resume", cid)
        counting_past(env, ns, cid, counts(env, ns, cid)[-1] + 2)
        remove(env, ns, cid)


# -- dockerd (20.10, experimental) on ketchd -------------------------------------------------------

@pytest.fixture(params=RUNTIMES)
def stack(request: pytest.FixtureRequest, criu_dir: str) -> Iterator[Stack]:
    """An experimental dockerd on a ketchd with criu on its PATH; dockerd asks for runc.v2, which
    ketchd runs with runc's shim unless aliased to another (as tests/interop/test_dockerd.py)."""
    base = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    ketchd = (AliasedKetchd if request.param == KETCH_RUNTIME else Ketchd)(base)
    ketchd.path.append(criu_dir)
    d = Docker(base, ketchd.address)
    (base / "daemon.json").write_text(json.dumps({"live-restore": True, "experimental": True}))
    try:
        ketchd.start()
        d.start()
        yield Stack(ketchd, d)
    finally:
        if d.proc is not None:
            ids = d.run("ps", "-aq", check=False).stdout.split()
            if ids:
                d.run("rm", "-f", *ids, check=False)
        d.stop()
        ketchd.kill(signal.SIGTERM)
        ketchd.end_template()
        subprocess.run(["umount", str(base / "data")], capture_output=True, check=False)
        left = leftovers.check(ketchd.scope([], shared=("moby",), cgroup_parents=(d.cgroup_parent,)))
        slow = ketchd.slow_callbacks()
        if not left and not slow:
            shutil.rmtree(base, ignore_errors=True)
        assert not left, "left behind:\n  " + "\n  ".join(left) + f"\n(logs in {base})"
        assert not slow, "ketchd's event loop was blocked:\n" + "\n".join(slow)


def test_docker_checkpoint_create_ls_start_rm(stack: Stack, rootfs: Path, tmp_path: Path) -> None:
    docker = stack.docker
    tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    docker.run("import", "-c", "ENV PATH=/usr/bin:/bin", str(tar), "busybox:ckd")
    script = COUNTER.split("\n", 1)[1].replace("\n", "; ").replace("do;", "do").rstrip("; ")
    docker.run("run", "-d", "--name", "cnt", "--network", "none", "busybox:ckd", "sh", "-c", script)
    bundle = stack.ketchd.bundle("moby", docker.inspect("cnt", "{{.Id}}"))
    shim = "containerd-shim-ketch-v2" if isinstance(stack.ketchd, AliasedKetchd) else "containerd-shim-runc-v2"
    assert Path(json.loads((bundle / "ketch.json").read_text())["binary"]).name == shim

    def logged() -> list[int]:
        return [int(n) for n in docker.run("exec", "cnt", "cat", "/tmp/log").stdout.split()]

    deadline = time.monotonic() + 30
    while len(logged()) < 3:
        assert time.monotonic() < deadline, "not counting"
        time.sleep(0.2)
    docker.run("checkpoint", "create", "cnt", "cp1")  # the container stops (no --leave-running)
    assert docker.inspect("cnt", "{{.State.Running}}") == "false"
    before = [int(n) for n in subprocess.run(
        ["cat", f"{docker.inspect('cnt', '{{.GraphDriver.Data.UpperDir}}')}/tmp/log"],
        capture_output=True, text=True, check=True).stdout.split()]
    assert before, "its log is in its rw layer"
    assert docker.run("checkpoint", "ls", "cnt").stdout.splitlines()[1:] == ["cp1"]

    docker.run("start", "--checkpoint", "cp1", "cnt")
    assert docker.inspect("cnt", "{{.State.Running}}") == "true"
    deadline = time.monotonic() + 30
    while (after := logged())[-1] <= before[-1] + 3:
        assert time.monotonic() < deadline, f"not counting on: {after[-3:]}"
        time.sleep(0.2)
    assert after == list(range(1, len(after) + 1)), f"the count restarted or skipped: {after}"
    docker.run("checkpoint", "rm", "cnt", "cp1")
    assert docker.run("checkpoint", "ls", "cnt").stdout.splitlines()[1:] == []
    docker.run("rm", "-f", "cnt")
    # what the checkpoint and the start put in ketchd's content store went with their leases
    ctr = ["ctr", "--address", docker.containerd, "--namespace", "moby"]
    subprocess.run([*ctr, "leases", "create", "--id", "collect"], check=True, capture_output=True)
    subprocess.run([*ctr, "leases", "rm", "--sync", "collect"], check=True, capture_output=True)
    assert subprocess.run([*ctr, "content", "ls", "-q"], capture_output=True, text=True,
                          check=True).stdout.split() == []
