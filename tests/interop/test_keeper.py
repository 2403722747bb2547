"""Crash-only shim groups under ketchd: kill -9 of the process that serves a group (the parent
of its containers' init processes), with ketchd up, or killed and restarted around it. The
group's keeper starts a successor; every container goes on with its pid and its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.shim.keeper import parent_pid
from ketch.testing import system as support
from tests.interop.conftest import Env
from tests.interop.test_ctr_shim import PATH, Events, _read_until
from tests.interop.test_ketchd import Resubscriber, _pids, _run_detached, md


def _counted(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _assert_no_gap(numbers: list[int]) -> None:
    assert numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers[-50:]


@pytest.fixture
def trigger(kenv: Env) -> Iterator[Path]:
    """A file the 'quitter' container waits for (its rootfs is the shared busybox one)."""
    path = Path(kenv.rootfs, "tmp", support.unique("go"))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _shim_of(kenv: Env, ns: str, task: str) -> int:
    """The serving shim of ``task``: the parent of its init process."""
    return parent_pid(int(_pids(kenv, ns)[task][0]))


def _outage(ns: str, shim: int, during: object = None) -> None:
    """kill -9 the serving ``shim`` while its keeper is stopped, so that what ``during`` does
    happens while no shim runs; then let the keeper take over."""
    keeper = parent_pid(shim)
    assert keeper in support.keeper_pids(ns)
    os.kill(keeper, signal.SIGSTOP)
    try:
        os.kill(shim, signal.SIGKILL)
        if callable(during):
            during()
        time.sleep(0.5)
    finally:
        os.kill(keeper, signal.SIGCONT)


@pytest.mark.parametrize("ketchd", ["up", "restarted"])
def test_containers_outlive_their_shim(kenv: Env, trigger: Path, tmp_path: Path, ketchd: str) -> None:
    ns = kenv.ns()
    log = tmp_path / "counter.log"
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--log-uri", f"file://{log}",
             "--rootfs", kenv.rootfs, "counter", "sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); usleep 50000; done")
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "quitter",
             "sh", "-c", f"while [ ! -e /tmp/{trigger.name} ]; do usleep 20000; done; exit 7")
    _run_detached(kenv, ns, ["sleeper"])
    before = _pids(kenv, ns)
    assert {status for _, status in before.values()} == {"RUNNING"}
    inits = {name: int(pid) for name, (pid, _) in before.items()}
    assert len({parent_pid(pid) for pid in inits.values()}) == 1, "one serving shim for the group"
    subscriber = Resubscriber(kenv, ns)
    try:
        time.sleep(0.5)
        shim = _shim_of(kenv, ns, "counter")
        if ketchd == "restarted":
            kenv.cd.kill(signal.SIGKILL)

        def quit_now() -> None:
            trigger.touch()
            time.sleep(0.3)  # the quitter exits while no shim serves the group

        _outage(ns, shim, during=quit_now)
        if ketchd == "restarted":
            time.sleep(1)
            kenv.cd.start()
        # the survivors: RUNNING with the same pids, after at most a short Unavailable
        deadline = time.monotonic() + 10
        after: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            after = _pids(kenv, ns)
            states = {name: after.get(name, ("", ""))[1] for name in ("counter", "quitter", "sleeper")}
            if states == {"counter": "RUNNING", "quitter": "STOPPED", "sleeper": "RUNNING"}:
                break
            time.sleep(0.1)
        assert after["counter"] == before["counter"] and after["sleeper"] == before["sleeper"], (before, after)
        assert after["quitter"][1] == "STOPPED"
        channel = grpc.insecure_channel(f"unix://{kenv.cd.address}")
        tasks = tasks_pb2_grpc.TasksStub(channel)
        got = tasks.Get(tasks_pb2.GetRequest(container_id="quitter"), metadata=md(ns)).process
        assert got.exit_status == 7
        # the exit was reported once, with its true status
        deadline = time.monotonic() + 10
        while not subscriber.exits and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
        assert subscriber.exits == [("quitter", 7)]
        # everything works on the survivors
        r = kenv.ctr(ns, "tasks", "exec", *kenv.fifo, "--exec-id", "after", "sleeper", "echo", "alive")
        assert r.stdout == "alive\n"
        kenv.ctr(ns, "tasks", "pause", "sleeper")
        assert _pids(kenv, ns)["sleeper"][1] == "PAUSED"
        kenv.ctr(ns, "tasks", "resume", "sleeper")
        metrics = kenv.ctr(ns, "tasks", "metrics", "--format", "json", "sleeper").stdout
        assert json.loads(metrics)
        # the counter's log has no gap and keeps growing
        seen = _counted(log)
        time.sleep(0.5)
        grown = _counted(log)
        assert len(grown) > len(seen)
        _assert_no_gap(grown)
        # every status is the true one (no 255 anywhere), and delete works
        for name in ("counter", "sleeper"):
            kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", name)
        for name, status in (("counter", 137), ("sleeper", 137), ("quitter", 7)):
            deadline = time.monotonic() + 10
            while _pids(kenv, ns)[name][1] != "STOPPED" and time.monotonic() < deadline:
                time.sleep(0.05)
            deleted = tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id=name), metadata=md(ns))
            assert (name, deleted.exit_status) == (name, status)
        channel.close()
    finally:
        subscriber.close()


def test_an_attached_client_and_a_terminal_see_no_gap(kenv: Env) -> None:
    """ctr attached to a FIFO, and a terminal: output written while no shim serves reaches
    them in order, and neither sees EOF or a hangup."""
    import pty

    ns = kenv.ns()
    attached = subprocess.Popen(
        ["ctr", "--address", kenv.cd.address, "--namespace", ns, "run", *kenv.fifo, "--runtime", kenv.runtime, *PATH,
         "--rootfs", kenv.rootfs, "fifo", "sh", "-c", "i=0; while [ $i -lt 60 ]; do echo $i; i=$((i+1)); usleep 50000; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    master, slave = pty.openpty()
    tty = subprocess.Popen(
        ["ctr", "--address", kenv.cd.address, "--namespace", ns, "run", "-t", *kenv.fifo, "--runtime", kenv.runtime,
         *PATH, "--rootfs", kenv.rootfs, "tty", "sh"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        assert b"#" in _read_until(master, b"#", 30)
        deadline = time.monotonic() + 20
        while "fifo" not in _pids(kenv, ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        _outage(ns, _shim_of(kenv, ns, "fifo"))
        time.sleep(0.5)
        os.write(master, b"echo still-$((40+2))\n")
        assert b"still-42" in _read_until(master, b"still-42", 10)
        out, err = attached.communicate(timeout=30)
        assert attached.returncode == 0, err
        _assert_no_gap([int(n) for n in out.split()])
        assert out.split()[-1] == "59"
        os.write(master, b"exit 5\n")
        assert tty.wait(timeout=30) == 5
    finally:
        for p in (attached, tty):
            if p.poll() is None:
                p.kill()
                p.wait()
        os.close(master)
        for name in ("fifo", "tty"):
            kenv.ctr(ns, "tasks", "rm", "-f", name, check=False)
            kenv.ctr(ns, "containers", "rm", name, check=False)


def test_an_oom_kill_after_a_takeover_is_reported(kenv: Env) -> None:
    ns = kenv.ns()
    events = Events(kenv, ns)
    try:
        kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--memory-limit", str(16 << 20),
                 "--rootfs", kenv.rootfs, "hog", "sh", "-c", "sleep 1; tail /dev/zero")
        _outage(ns, _shim_of(kenv, ns, "hog"))
        oom = events.wait_for("/tasks/oom", timeout=20)
        assert '"container_id":"hog"' in oom[0]
        exit_line = events.wait_for("/tasks/exit", timeout=20)[0]
        assert '"exit_status":137' in exit_line
    finally:
        events.close()


def test_a_keeper_dying_alone_loses_nothing(kenv: Env) -> None:
    """The keeper is killed while the shim serves: the containers are the shim's children, so
    they run on, and their exits are reported with their true status."""
    ns = kenv.ns()
    _run_detached(kenv, ns, ["calm"])
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "five",
             "sh", "-c", "sleep 1; exit 5")
    shim = support.shim_pid(ns, "calm")
    os.kill(parent_pid(shim), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids(kenv, ns)["five"][1] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"unix://{kenv.cd.address}")
    got = tasks_pb2_grpc.TasksStub(channel).Get(tasks_pb2.GetRequest(container_id="five"), metadata=md(ns))
    assert got.process.exit_status == 5
    channel.close()
    assert _pids(kenv, ns)["calm"][1] == "RUNNING" and support.shim_pid(ns, "calm") == shim
    r = kenv.ctr(ns, "tasks", "exec", *kenv.fifo, "--exec-id", "x", "calm", "echo", "fine")
    assert r.stdout == "fine\n"


def test_live_upgrade_to_a_newly_installed_ketch(kenv: Env, tmp_path: Path) -> None:
    """A newer ketch installed in the same venv (here: the editable install's version bumped)
    takes over a running group on ``ketchd upgrade-shims``: Connect reports the new version,
    the containers keep their pids and their output."""
    import asyncio

    from ketch import identifiers, ttrpc
    from ketch.api.containerd.task.v2 import shim_pb2

    ns = kenv.ns()
    log = tmp_path / "counter.log"
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--log-uri", f"file://{log}",
             "--rootfs", kenv.rootfs, "counter", "sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); usleep 50000; done")
    _run_detached(kenv, ns, ["sleeper"])
    before = _pids(kenv, ns)
    address = kenv.cd.bundle(ns, "counter").joinpath("address").read_text()

    def version() -> str:
        async def ask() -> str:
            async with await ttrpc.connect(address, timeout=5) as client:
                r = await client.call("containerd.task.v2.Task", "Connect", shim_pb2.ConnectRequest(id="counter"),
                                      shim_pb2.ConnectResponse, timeout=5,
                                      metadata={identifiers.TTRPC_NAMESPACE_KEY: ns})
                return r.version
        return asyncio.run(ask())

    import ketch

    init = Path(ketch.__file__)
    original = init.read_text()
    old = version()
    new = old + "+upgraded"
    keeper = parent_pid(_shim_of(kenv, ns, "counter"))
    deadline = time.monotonic() + 10  # ketchd starts its shim template in the background
    while not support.shim_templates(str(kenv.cd.base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    templates = support.shim_templates(str(kenv.cd.base))
    assert len(templates) == 1
    try:
        init.write_text(original.replace(f'__version__ = "{old}"', f'__version__ = "{new}"'))
        out = subprocess.run([f"{support.VENV_BIN}/ketchd", "--state", str(kenv.cd.base / "state"), "upgrade-shims"],
                             capture_output=True, text=True, check=True).stdout
        assert f"keeper {keeper}" in out and "shim template: pid" in out, out
        # the template is replaced by one of the new version, for the groups to come
        new_template = int(out.split("shim template: pid")[1].split()[0])
        assert new_template != templates[0] and support.shim_templates(str(kenv.cd.base)) == [new_template]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if version() == new:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        assert version() == new
    finally:
        init.write_text(original)
    assert support.keeper_pids(ns) == {keeper}, "the keeper exec'd in place"
    deadline = time.monotonic() + 10
    after = _pids(kenv, ns)
    while after != before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _pids(kenv, ns)
    assert after == before
    seen = _counted(log)
    time.sleep(0.5)
    grown = _counted(log)
    assert len(grown) > len(seen)
    _assert_no_gap(grown)
    r = kenv.ctr(ns, "tasks", "exec", *kenv.fifo, "--exec-id", "up", "sleeper", "echo", "upgraded")
    assert r.stdout == "upgraded\n"
