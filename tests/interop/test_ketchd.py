"""ketchd itself, driven by Debian's ctr and by a plain gRPC client (status codes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from ketch import logfields
from ketch.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME
from tests.interop.conftest import Env
from tests.interop.test_ctr_shim import PATH, Events, _task_status, _wait_status

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def md(ns: str) -> list[tuple[str, str]]:
    return [("containerd-namespace", ns)]


def spec_for(env: Env, *args: str) -> bytes:
    """The OCI spec ctr would make for a --rootfs container, taken from a real ctr-made one."""
    ns = env.ns()
    env.ctr(ns, "containers", "create", *PATH, "--rootfs", env.rootfs, "template", *args)
    info = json.loads(env.ctr(ns, "containers", "info", "template").stdout)
    env.ctr(ns, "containers", "rm", "template")
    return json.dumps(info["Spec"]).encode()


def code_of(call, *args, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code()


def test_version_and_plugins(kenv: Env) -> None:
    out = kenv.ctr("default", "version").stdout
    assert "Server:" in out and "ketch" in out and "UUID:" in out
    uuid1 = [line for line in out.splitlines() if "UUID" in line][0]
    plugins = kenv.ctr("default", "plugins", "ls").stdout
    assert "io.containerd.runtime.v2" in plugins and "io.containerd.grpc.v1" in plugins
    # the server's uuid is stable across restarts
    kenv.cd.kill(signal.SIGTERM)
    kenv.cd.start()
    assert [line for line in kenv.ctr("default", "version").stdout.splitlines() if "UUID" in line][0] == uuid1


def test_namespaces(kenv: Env) -> None:
    ns = kenv.ns()
    kenv.ctr("default", "namespaces", "create", ns, "team=blue")
    listed = kenv.ctr("default", "namespaces", "ls").stdout
    assert ns in listed and "team=blue" in listed
    kenv.ctr("default", "namespaces", "label", ns, "team=red")
    assert "team=red" in kenv.ctr("default", "namespaces", "ls").stdout
    # a namespace that holds a container cannot be removed
    kenv.ctr(ns, "containers", "create", *PATH, "--rootfs", kenv.rootfs, "c1", "true")
    r = kenv.ctr("default", "namespaces", "rm", ns, check=False)
    assert r.returncode != 0 and "must be empty" in r.stderr, r.stderr
    kenv.ctr(ns, "containers", "rm", "c1")
    assert kenv.ctr("default", "namespaces", "rm", ns).stdout.strip() == ns
    assert ns not in kenv.ctr("default", "namespaces", "ls").stdout


def test_containers_create_info_ls_rm(kenv: Env) -> None:
    ns = kenv.ns()
    kenv.ctr(ns, "containers", "create", *PATH, "--label", "tier=web", "--rootfs", kenv.rootfs, "web1", "true")
    kenv.ctr(ns, "containers", "create", *PATH, "--label", "tier=db", "--rootfs", kenv.rootfs, "db1", "true")
    info = json.loads(kenv.ctr(ns, "containers", "info", "web1").stdout)
    assert info["ID"] == "web1" and info["Labels"]["tier"] == "web"
    assert info["Runtime"]["Name"] == "io.containerd.runc.v2"
    assert info["Spec"]["root"]["path"] == kenv.rootfs
    assert set(kenv.ctr(ns, "containers", "ls", "-q").stdout.split()) == {"web1", "db1"}
    assert kenv.ctr(ns, "containers", "ls", "-q", "labels.tier==web").stdout.split() == ["web1"]
    assert kenv.ctr(ns, "containers", "ls", "-q", 'labels."tier"~=^d').stdout.split() == ["db1"]
    kenv.ctr(ns, "containers", "rm", "web1", "db1")
    assert kenv.ctr(ns, "containers", "ls", "-q").stdout.strip() == ""


def test_events_stream(kenv: Env) -> None:
    ns = kenv.ns()
    events = Events(kenv, ns)
    try:
        kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", KETCH_RUNTIME, *PATH, "--rootfs", kenv.rootfs, "ev", "true")
        events.wait_for("/containers/delete")
        assert events.topics(ns) == ["/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit",
                                     "/tasks/delete", "/containers/delete"]
    finally:
        events.close()


def test_status_codes(kenv: Env, channel: grpc.Channel) -> None:
    ns = kenv.ns()
    containers = containers_pb2_grpc.ContainersStub(channel)
    tasks = tasks_pb2_grpc.TasksStub(channel)
    assert code_of(containers.Get, containers_pb2.GetContainerRequest(id="nope"), metadata=md(ns)) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(tasks.Get, tasks_pb2.GetRequest(container_id="nope"), metadata=md(ns)) == grpc.StatusCode.NOT_FOUND
    for bad in ("../x", "a/b", "a" * 77):
        c = containers_pb2.Container(id=bad, runtime=containers_pb2.Container.Runtime(name=KETCH_RUNTIME))
        c.spec.type_url, c.spec.value = SPEC_TYPE, b"{}"
        assert code_of(containers.Create, containers_pb2.CreateContainerRequest(container=c), metadata=md(ns)) == \
            grpc.StatusCode.INVALID_ARGUMENT, bad
    # no namespace at all
    assert code_of(containers.List, containers_pb2.ListContainersRequest()) == grpc.StatusCode.FAILED_PRECONDITION

    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", KETCH_RUNTIME, *PATH, "--rootfs", kenv.rootfs, "busy", "sleep", "1000")
    spec = json.loads(kenv.ctr(ns, "containers", "info", "busy").stdout)["Spec"]
    dup = containers_pb2.Container(id="busy", runtime=containers_pb2.Container.Runtime(name=KETCH_RUNTIME))
    dup.spec.type_url, dup.spec.value = SPEC_TYPE, json.dumps(spec).encode()
    assert code_of(containers.Create, containers_pb2.CreateContainerRequest(container=dup), metadata=md(ns)) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_of(tasks.Create, tasks_pb2.CreateTaskRequest(container_id="busy"), metadata=md(ns)) == \
        grpc.StatusCode.ALREADY_EXISTS
    # the daemon itself refuses to delete a running task (ctr checks on the client side too)
    assert code_of(tasks.Delete, tasks_pb2.DeleteTaskRequest(container_id="busy"), metadata=md(ns)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert _task_status(kenv, ns, "busy") == "RUNNING"


def test_malformed_requests_leave_nothing(kenv: Env, channel: grpc.Channel) -> None:
    ns = kenv.ns()
    containers = containers_pb2_grpc.ContainersStub(channel)
    tasks = tasks_pb2_grpc.TasksStub(channel)
    # a spec that is not a JSON OCI spec
    c = containers_pb2.Container(id="badspec", runtime=containers_pb2.Container.Runtime(name=KETCH_RUNTIME))
    c.spec.type_url, c.spec.value = SPEC_TYPE, b"\x00not json"
    with pytest.raises(grpc.RpcError) as info:
        containers.Create(containers_pb2.CreateContainerRequest(container=c), metadata=md(ns))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec" in (info.value.details() or "")
    assert code_of(containers.Get, containers_pb2.GetContainerRequest(id="badspec"), metadata=md(ns)) == \
        grpc.StatusCode.NOT_FOUND
    # an unknown runtime: the container is stored, the task cannot be made, nothing stays behind
    good = containers_pb2.Container(id="norun", runtime=containers_pb2.Container.Runtime(name="io.containerd.nosuch.v9"))
    good.spec.type_url, good.spec.value = SPEC_TYPE, spec_for(kenv, "true")
    containers.Create(containers_pb2.CreateContainerRequest(container=good), metadata=md(ns))
    with pytest.raises(grpc.RpcError) as info:
        tasks.Create(tasks_pb2.CreateTaskRequest(container_id="norun"), metadata=md(ns))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "containerd-shim-nosuch-v9" in (info.value.details() or "")
    assert not kenv.cd.bundle(ns, "norun").exists()
    assert code_of(tasks.Get, tasks_pb2.GetRequest(container_id="norun"), metadata=md(ns)) == grpc.StatusCode.NOT_FOUND
    # an oversize message is refused by the transport
    huge = containers_pb2.Container(id="huge", runtime=containers_pb2.Container.Runtime(name=KETCH_RUNTIME))
    huge.spec.type_url, huge.spec.value = SPEC_TYPE, b"{" + b" " * (20 << 20) + b"}"
    assert code_of(containers.Create, containers_pb2.CreateContainerRequest(container=huge), metadata=md(ns)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(containers.Get, containers_pb2.GetContainerRequest(id="huge"), metadata=md(ns)) == \
        grpc.StatusCode.NOT_FOUND


def test_namespace_get_of_unused_namespace_is_ok(kenv: Env, channel: grpc.Channel) -> None:
    """dockerd asks for "moby" and "plugins.moby" at start and treats any error as fatal."""
    stub = namespace_pb2_grpc.NamespacesStub(channel)
    resp = stub.Get(namespace_pb2.GetNamespaceRequest(name="plugins.moby"))
    assert resp.namespace.name == "plugins.moby" and not resp.namespace.labels


def _run_detached(env: Env, ns: str, names: list[str]) -> None:
    procs = [subprocess.Popen(["ctr", "--address", env.cd.address, "--namespace", ns, "run", "-d", *env.fifo,
                               "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, n, "sleep", "1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err


def _pids(env: Env, ns: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in env.ctr(ns, "tasks", "ls").stdout.splitlines()[1:]:
        task, pid, status = line.split()
        out[task] = (pid, status)
    return out


def test_restart_with_twenty_running_and_one_dead_shim(kenv: Env) -> None:
    ns, other = kenv.ns(), kenv.ns()  # ketchd gives each namespace its own shim process
    names = [f"r{i}" for i in range(20)]
    _run_detached(kenv, ns, names)
    _run_detached(kenv, other, ["victim"])
    before = _pids(kenv, ns)
    assert len(before) == 20 and all(status == "RUNNING" for _, status in before.values())

    kenv.cd.kill(signal.SIGKILL)
    support.kill_shim_group(other, "victim")  # keeper and shim die while ketchd is down
    kenv.cd.start()
    events = Events(kenv, other)
    try:
        after = _pids(kenv, ns)
        for n in names:
            assert after[n] == before[n], (n, before[n], after[n])
        # its container ran on; the cleanup killed it: 137, as containerd reports
        exit_line = events.wait_for("/tasks/exit")[0]
        assert '"container_id":"victim"' in exit_line and '"exit_status":137' in exit_line
        _wait_status(kenv, other, "victim", "STOPPED")
        r = kenv.ctr(ns, "tasks", "exec", *kenv.fifo, "--exec-id", "x", "r7", "echo", "alive")
        assert r.stdout == "alive\n"
        kenv.ctr(other, "tasks", "rm", "victim")
        events.wait_for("/tasks/delete")
        kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "r3")
        _wait_status(kenv, ns, "r3", "STOPPED")
        kenv.ctr(ns, "tasks", "rm", "r3")
    finally:
        events.close()


def test_a_whole_shim_group_dying_while_ketchd_runs(kenv: Env) -> None:
    """The keeper and the serving shim both killed: nothing can take over, so the task is
    buried (STOPPED) and its container, still running, killed by the cleanup: 137."""
    ns = kenv.ns()
    events = Events(kenv, ns)
    try:
        _run_detached(kenv, ns, ["lonely"])
        support.kill_shim_group(ns, "lonely")
        exit_line = events.wait_for("/tasks/exit")[0]
        assert '"exit_status":137' in exit_line
        _wait_status(kenv, ns, "lonely", "STOPPED")
        kenv.ctr(ns, "tasks", "rm", "lonely")
        kenv.ctr(ns, "containers", "rm", "lonely")
        assert not kenv.cd.bundle(ns, "lonely").exists()
    finally:
        events.close()


def test_a_task_that_ended_with_nobody_watching_is_255(kenv: Env) -> None:
    """ketchd down, the task's shim and keeper killed, then the task exits on its own: nobody
    saw its status, so after the restart it is reported as 255 (not a made-up 137)."""
    ns = kenv.ns()
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "unseen",
             "sh", "-c", "sleep 1; exit 3")
    pid = int(_pids(kenv, ns)["unseen"][0])
    kenv.cd.kill(signal.SIGKILL)
    support.kill_shim_group(ns, "unseen")
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    kenv.cd.start()
    events = Events(kenv, ns)
    try:
        assert '"exit_status":255' in events.wait_for("/tasks/exit")[0]
        _wait_status(kenv, ns, "unseen", "STOPPED")
        channel = grpc.insecure_channel(f"unix://{kenv.cd.address}")
        got = tasks_pb2_grpc.TasksStub(channel).Get(tasks_pb2.GetRequest(container_id="unseen"), metadata=md(ns))
        channel.close()
        assert got.process.exit_status == 255
        kenv.ctr(ns, "tasks", "rm", "unseen")
        kenv.ctr(ns, "containers", "rm", "unseen")
    finally:
        events.close()


def test_fifty_concurrent_runs(kenv: Env) -> None:
    ns = kenv.ns()
    procs = [subprocess.Popen(["ctr", "--address", kenv.cd.address, "--namespace", ns, "run", "--rm", *kenv.fifo,
                               "--runtime", KETCH_RUNTIME, *PATH, "--rootfs", kenv.rootfs, f"f{i}", "echo", f"x{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(50)]
    results = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, err
        assert out == f"x{i}\n"
    assert kenv.ctr(ns, "containers", "ls", "-q").stdout.strip() == ""
    assert kenv.ctr(ns, "tasks", "ls", "-q").stdout.strip() == ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and list((kenv.cd.base / "state" / "runtime" / "v2" / ns).iterdir()):
        time.sleep(0.1)
    assert list((kenv.cd.base / "state" / "runtime" / "v2" / ns).iterdir()) == []


def test_sigterm_leaves_containers_running(kenv: Env) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["keeper"])
    pid = _pids(kenv, ns)["keeper"][0]
    shim = support.shim_pid(ns, "keeper")
    kenv.cd.kill(signal.SIGTERM)
    assert os.path.exists(f"/proc/{pid}") and os.path.exists(f"/proc/{shim}")
    assert not os.path.exists(kenv.cd.address)
    kenv.cd.start()
    assert _pids(kenv, ns)["keeper"] == (pid, "RUNNING")


def test_health_events_filter_and_container_update(kenv: Env, channel: grpc.Channel) -> None:
    from ketch.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
    from ketch.api.grpc.health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    ns = kenv.ns()
    stream = events_pb2_grpc.EventsStub(channel).Subscribe(
        events_pb2.SubscribeRequest(filters=[f"namespace=={ns},topic~=|^/containers/|"]))
    try:
        kenv.ctr(ns, "containers", "create", *PATH, "--rootfs", kenv.rootfs, "lab", "true")
        kenv.ctr(ns, "containers", "label", "lab", "color=green")
        info = json.loads(kenv.ctr(ns, "containers", "info", "lab").stdout)
        assert info["Labels"] == {"color": "green"}
        kenv.ctr(ns, "containers", "rm", "lab")
        topics = [next(stream).topic for _ in range(3)]
        assert topics == ["/containers/create", "/containers/update", "/containers/delete"]
    finally:
        stream.cancel()


def test_task_update_sets_the_memory_limit(kenv: Env, channel: grpc.Channel) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["upd"])
    req = tasks_pb2.UpdateTaskRequest(container_id="upd")
    req.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    req.resources.value = json.dumps({"memory": {"limit": 64 << 20}}).encode()
    tasks_pb2_grpc.TasksStub(channel).Update(req, metadata=md(ns))
    pid = _pids(kenv, ns)["upd"][0]
    from ketch.cgroups import Cgroup

    mem = Cgroup.of_pid(int(pid)).path("memory")
    assert mem is not None
    limit_file = "memory.max" if os.path.exists(os.path.join(mem, "memory.max")) else "memory.limit_in_bytes"
    with open(os.path.join(mem, limit_file)) as f:
        assert int(f.read()) == 64 << 20


def test_config_default_and_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ketchd = f"{support.VENV_BIN}/ketchd"
    default = subprocess.run([ketchd, "config", "default"], check=True, capture_output=True, text=True).stdout
    assert 'root = "/var/lib/ketch"' in default and "[grpc]" in default and "shim_call_timeout" in default
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpc]\naddres = 'x'\n")
    r = subprocess.run([ketchd, "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown key grpc.addres" in r.stderr


def test_a_second_ketchd_on_the_same_socket_is_refused(kenv: Env) -> None:
    r = subprocess.run([f"{support.VENV_BIN}/ketchd", "--root", str(kenv.cd.base / "root2"),
                        "--state", str(kenv.cd.base / "state2"), "--address", kenv.cd.address],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is in use" in r.stderr, r.stderr
    assert "Server:" in kenv.ctr("default", "version").stdout  # the first one is unharmed


def test_idle_shared_shim_is_dismissed_after_a_restart(kenv: Env) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["brief"])
    shim = support.shim_pid(ns, "brief")
    kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "brief")
    _wait_status(kenv, ns, "brief", "STOPPED")
    kenv.ctr(ns, "tasks", "rm", "brief")
    assert os.path.exists(f"/proc/{shim}")  # idle, waiting for the namespace's next task
    kenv.cd.kill(signal.SIGKILL)
    kenv.cd.start()  # knows no task of that shim: it tells the shim to go
    deadline = time.monotonic() + 5  # well before the shim's own 10 s linger
    while time.monotonic() < deadline and os.path.exists(f"/proc/{shim}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{shim}")


def test_shared_shim_keeps_logging_after_its_first_task_is_gone(kenv: Env) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["first"])
    _run_detached(kenv, ns, ["second"])
    assert support.shim_pids(ns) == {support.shim_pid(ns, "first")}  # one shim serves both
    for cid in ("first", "second"):
        kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", cid)
        _wait_status(kenv, ns, cid, "STOPPED")
        if cid == "first":
            kenv.ctr(ns, "tasks", "rm", "first")  # the bundle the shim started in is gone
    def said() -> bool:  # the shim's line, relayed by ketchd with its fields
        return any(f.get("msg", "").startswith("process exited") and f.get("container") == "second"
                   and f.get("namespace") == ns for f in map(logfields.parse, kenv.cd.log.read_text().splitlines()))

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not said():
        time.sleep(0.05)
    assert said()


def test_log_lines_carry_the_call_s_namespace_container_and_exec(kenv: Env) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["web"])
    kenv.ctr(ns, "tasks", "exec", "--exec-id", "probe", "web", "true")
    kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "web")
    _wait_status(kenv, ns, "web", "STOPPED")
    fields = [logfields.parse(line) for line in kenv.cd.log.read_text().splitlines()]
    created = [f for f in fields if f.get("msg", "").startswith("task created")]
    assert [(f.get("namespace"), f.get("container")) for f in created] == [(ns, "web")], created
    exited = {(f.get("container"), f.get("exec", "")) for f in fields
              if f.get("msg", "").startswith("process exited") and f.get("namespace") == ns}
    assert exited == {("web", "probe"), ("web", "")}, exited


def test_calls_on_an_unstarted_exec_are_refused_and_touch_nothing_else(kenv: Env, channel: grpc.Channel) -> None:
    """Kill, ResizePty and CloseIO of an exec that has no pid yet: FailedPrecondition, and
    every container of the namespace (one shim group) keeps running."""
    ns = kenv.ns()
    _run_detached(kenv, ns, ["a", "b"])
    before = _pids(kenv, ns)
    tasks = tasks_pb2_grpc.TasksStub(channel)
    req = tasks_pb2.ExecProcessRequest(container_id="a", exec_id="never-started")
    req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    req.spec.value = json.dumps({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}).encode()
    tasks.Exec(req, metadata=md(ns))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with pytest.raises(grpc.RpcError) as info:
            tasks.Kill(tasks_pb2.KillRequest(container_id="a", exec_id="never-started", signal=sig), metadata=md(ns))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not started" in (info.value.details() or "")
    assert code_of(tasks.ResizePty, tasks_pb2.ResizePtyRequest(container_id="a", exec_id="never-started",
                                                               width=80, height=24),
                   metadata=md(ns)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(tasks.CloseIO, tasks_pb2.CloseIORequest(container_id="a", exec_id="never-started", stdin=True),
                   metadata=md(ns)) == grpc.StatusCode.FAILED_PRECONDITION
    time.sleep(0.3)
    assert _pids(kenv, ns) == before and {s for _, s in before.values()} == {"RUNNING"}
    # the unstarted exec can still be deleted, and the container goes on
    tasks.DeleteProcess(tasks_pb2.DeleteProcessRequest(container_id="a", exec_id="never-started"), metadata=md(ns))
    assert _pids(kenv, ns) == before


class Resubscriber:
    """A client that keeps its event subscription across ketchd restarts, as dockerd does:
    when the stream breaks it subscribes again at once, and collects every /tasks/exit."""

    def __init__(self, env: Env, ns: str) -> None:
        import threading

        from ketch.api.containerd.events import task_pb2 as task_events
        from ketch.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

        self.exits: list[tuple[str, int]] = []
        self._stop = threading.Event()
        # reconnect within 100 ms (gRPC's default backoff grows to minutes)
        self._channel = grpc.insecure_channel(f"unix://{env.cd.address}", options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100)])
        stub = events_pb2_grpc.EventsStub(self._channel)
        request = events_pb2.SubscribeRequest(filters=[f'namespace=={ns},topic=="/tasks/exit"'])

        def loop() -> None:
            while not self._stop.is_set():
                self._stream = stub.Subscribe(request, wait_for_ready=True)
                try:
                    for envelope in self._stream:
                        e = task_events.TaskExit.FromString(envelope.event.value)
                        self.exits.append((e.container_id, e.exit_status))
                except grpc.RpcError:
                    time.sleep(0.02)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._stream.cancel()
        self._channel.close()
        self._thread.join(5)


OUTAGE = float(os.environ.get("KETCH_TEST_OUTAGE", "60"))


def test_an_exit_during_a_long_ketchd_outage_arrives_once_after_the_restart(kenv: Env) -> None:
    ns = kenv.ns()
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "quitter",
             "sh", "-c", "sleep 2; exit 7")
    _run_detached(kenv, ns, ["stayer"])
    subscriber = Resubscriber(kenv, ns)
    try:
        time.sleep(0.3)
        kenv.cd.kill(signal.SIGKILL)
        time.sleep(OUTAGE)  # quitter exits 2 s in; its shim keeps the exit while nobody answers
        assert subscriber.exits == []
        kenv.cd.start()
        deadline = time.monotonic() + 15
        while not subscriber.exits and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2)  # room for a duplicate to show up
        assert subscriber.exits == [("quitter", 7)], (kenv.cd.base / "ketchd.log").read_text()[-5000:]
        tasks = _pids(kenv, ns)
        assert tasks["quitter"][1] == "STOPPED" and tasks["stayer"][1] == "RUNNING"
        # Wait, as a client that reconnects asks, gets the true status too
        wait = tasks_pb2_grpc.TasksStub(grpc.insecure_channel(f"unix://{kenv.cd.address}")).Wait(
            tasks_pb2.WaitRequest(container_id="quitter"), metadata=md(ns), timeout=10)
        assert wait.exit_status == 7
    finally:
        subscriber.close()


def test_every_wait_on_an_exec_ends(kenv: Env, channel: grpc.Channel) -> None:
    """Wait on an exec whose runc exec failed, and on one deleted before it ran, returns at once."""
    ns = kenv.ns()
    _run_detached(kenv, ns, ["host"])
    tasks = tasks_pb2_grpc.TasksStub(channel)
    for exec_id, args in (("broken", ["/no/such/binary"]), ("never", ["true"])):
        req = tasks_pb2.ExecProcessRequest(container_id="host", exec_id=exec_id)
        req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        req.spec.value = json.dumps({"args": args, "cwd": "/", "env": ["PATH=/bin"]}).encode()
        tasks.Exec(req, metadata=md(ns))
        wait = tasks.Wait.future(tasks_pb2.WaitRequest(container_id="host", exec_id=exec_id), metadata=md(ns),
                                 timeout=10)
        time.sleep(0.2)
        assert not wait.done()
        if exec_id == "broken":
            assert code_of(tasks.Start, tasks_pb2.StartRequest(container_id="host", exec_id=exec_id),
                           metadata=md(ns)) != grpc.StatusCode.OK
        else:
            tasks.DeleteProcess(tasks_pb2.DeleteProcessRequest(container_id="host", exec_id=exec_id),
                                metadata=md(ns))
        assert wait.result(timeout=5).exit_status == 0
    assert _pids(kenv, ns)["host"][1] == "RUNNING"


def test_ctr_events_filters_on_event_fields(kenv: Env) -> None:
    ns = kenv.ns()
    proc = subprocess.Popen(["ctr", "--address", kenv.cd.address, "--namespace", ns, "events",
                             "event.container_id==wanted"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.3)
        for name in ("other", "wanted"):
            kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs,
                     name, "true")
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and all('"container_id":"wanted"' in line for line in lines), out
    assert any("/tasks/exit" in line for line in lines), out


def test_exec_with_a_terminal_the_spec_does_not_ask_for(kenv: Env, channel: grpc.Channel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Exec with terminal=true gets a pty though its process spec says nothing of one (as ctr's
    would); it can be resized, and megabytes of output through it arrive complete."""
    import threading

    ns = kenv.ns()
    _run_detached(kenv, ns, ["host"])
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    received = bytearray()

    def read() -> None:
        fd = os.open(fifo, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 16):
                received.extend(chunk)
        finally:
            os.close(fd)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    size = 3 << 20
    tasks = tasks_pb2_grpc.TasksStub(channel)
    req = tasks_pb2.ExecProcessRequest(container_id="host", exec_id="tty", terminal=True, stdout=str(fifo))
    req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    # the resize lands during the sleep; stty then shows it
    script = f"stty raw; sleep 1; stty size; head -c {size} /dev/zero; echo end"
    req.spec.value = json.dumps({"args": ["sh", "-c", script],
                                 "cwd": "/", "env": ["PATH=/bin"]}).encode()
    tasks.Exec(req, metadata=md(ns))
    tasks.Start(tasks_pb2.StartRequest(container_id="host", exec_id="tty"), metadata=md(ns))
    tasks.ResizePty(tasks_pb2.ResizePtyRequest(container_id="host", exec_id="tty", width=100, height=40),
                    metadata=md(ns))
    assert tasks.Wait(tasks_pb2.WaitRequest(container_id="host", exec_id="tty"), metadata=md(ns),
                      timeout=60).exit_status == 0
    reader.join(30)
    assert not reader.is_alive()
    assert received.count(b"\0") == size and received.rstrip().endswith(b"end"), len(received)
    assert b"40 100" in received, "the resize reached the exec's terminal"


def test_a_task_created_with_a_terminal_gets_one(kenv: Env, channel: grpc.Channel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tasks.Create with terminal=true for a container whose spec has no terminal: the task
    gets a pty (runc would refuse the console socket otherwise), and ResizePty works on it."""
    ns = kenv.ns()
    kenv.ctr(ns, "containers", "create", "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "ttyless", "sleep",
             "1000")
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        tasks = tasks_pb2_grpc.TasksStub(channel)
        created = tasks.Create(tasks_pb2.CreateTaskRequest(container_id="ttyless", terminal=True, stdout=str(fifo)),
                               metadata=md(ns))
        tasks.Start(tasks_pb2.StartRequest(container_id="ttyless"), metadata=md(ns))
        assert os.readlink(f"/proc/{created.pid}/fd/0").startswith("/dev/pts/")
        tasks.ResizePty(tasks_pb2.ResizePtyRequest(container_id="ttyless", width=123, height=45), metadata=md(ns))
        tasks.Kill(tasks_pb2.KillRequest(container_id="ttyless", signal=9), metadata=md(ns))
        assert tasks.Wait(tasks_pb2.WaitRequest(container_id="ttyless"), metadata=md(ns), timeout=30).exit_status == 137
        tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id="ttyless"), metadata=md(ns))
        kenv.ctr(ns, "containers", "rm", "ttyless")
    finally:
        os.close(reader)


def test_the_v1_runtime_runs_on_the_v2_runc_path(kenv: Env) -> None:
    """io.containerd.runtime.v1.linux, which old clients name, runs (ctr's RuncOptions
    translated); a runtime binary that does not exist fails naming that binary."""
    ns = kenv.ns()
    r = kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", "io.containerd.runtime.v1.linux", *PATH,
                 "--rootfs", kenv.rootfs, "old", "echo", "v1 works")
    assert r.stdout == "v1 works\n"
    from ketch.api.containerd.linux.runctypes import runc_pb2

    channel = grpc.insecure_channel(f"unix://{kenv.cd.address}")
    container = containers_pb2.Container(id="missing")
    container.runtime.name = "io.containerd.runtime.v1.linux"
    container.runtime.options.type_url = "containerd.linux.runc.RuncOptions"
    container.runtime.options.value = runc_pb2.RuncOptions(runtime="/no/such/runc").SerializeToString()
    container.spec.type_url, container.spec.value = SPEC_TYPE, spec_for(kenv, "true")
    containers_pb2_grpc.ContainersStub(channel).Create(containers_pb2.CreateContainerRequest(container=container),
                                                       metadata=md(ns))
    with pytest.raises(grpc.RpcError) as info:
        tasks_pb2_grpc.TasksStub(channel).Create(tasks_pb2.CreateTaskRequest(container_id="missing"), metadata=md(ns))
    assert "/no/such/runc" in (info.value.details() or ""), info.value.details()
    assert "containerd-shim-v1-linux" not in (info.value.details() or "")
    kenv.ctr(ns, "containers", "rm", "missing")
    channel.close()


def test_kill_of_a_container_runc_no_longer_knows_is_not_found(kenv: Env, channel: grpc.Channel) -> None:
    ns = kenv.ns()
    _run_detached(kenv, ns, ["forgotten"])
    pid = int(_pids(kenv, ns)["forgotten"][0])
    state = kenv.cd.base / "runc" / ns / "forgotten"
    assert state.is_dir(), "runc's state for the container"
    try:
        import shutil

        shutil.rmtree(state)  # deleted behind the shim's back: the process runs on
        assert code_of(tasks_pb2_grpc.TasksStub(channel).Kill,
                       tasks_pb2.KillRequest(container_id="forgotten", signal=signal.SIGTERM),
                       metadata=md(ns)) == grpc.StatusCode.NOT_FOUND
    finally:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pids(kenv, ns)["forgotten"][1] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    tasks_pb2_grpc.TasksStub(channel).Delete(tasks_pb2.DeleteTaskRequest(container_id="forgotten"), metadata=md(ns))
    # runc's state gone, nobody can remove the container's cgroups (runc delete removes them;
    # containerd's runc shim is no wiser): they are ours to remove
    for d in support.cgroup_dirs(ns):
        if os.path.isdir(os.path.join(d, "forgotten")):
            os.rmdir(os.path.join(d, "forgotten"))


def test_leftover_snapshot_directories_are_reclaimed_at_startup(kenv: Env, tmp_path: Path) -> None:
    """A ketchd killed during a prepare leaves a ``new-*`` directory (or one named by an id with
    no record) under a snapshotter's root: the next ketchd reclaims it as it starts, with both
    snapshotters, but never a directory with something mounted in it."""
    ns = kenv.ns()
    roots = {name: kenv.cd.base / "root" / "snapshots" / name / "snapshots" for name in ("overlayfs", "native")}
    for name in roots:
        kenv.ctr(ns, "snapshots", "--snapshotter", name, "prepare", "kept")
        kenv.ctr(ns, "snapshots", "--snapshotter", name, "label", "kept", "containerd.io/gc.root=now")
    kenv.cd.kill(signal.SIGKILL)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "precious").write_text("keep me")
    leftovers = []
    for root in roots.values():
        for name in ("new-killed", "99"):
            (root / name / "fs").mkdir(parents=True)
            (root / name / "fs" / "half-copied").write_text("x")
            leftovers.append(root / name)
    mounted = roots["overlayfs"] / "98"
    (mounted / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(volume), str(mounted / "mnt")], check=True)
    try:
        kenv.cd.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(p.exists() for p in leftovers):
            time.sleep(0.05)
        assert not [p for p in leftovers if p.exists()]
        assert (mounted / "mnt" / "precious").read_text() == "keep me"
    finally:
        subprocess.run(["umount", str(mounted / "mnt")], check=True)
    for name in roots:
        assert "kept" in kenv.ctr(ns, "snapshots", "--snapshotter", name, "ls").stdout
        kenv.ctr(ns, "snapshots", "--snapshotter", name, "rm", "kept")
    assert (volume / "precious").read_text() == "keep me"
