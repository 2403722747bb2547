"""The shim's stdio and runtime options against real runc, driven over containerd's gRPC API
(so that runtime options and stdio URIs reach the shim as a client sends them): under
Debian's containerd and under ketchd with the ketch shim, and with containerd's runc shim
under ketchd, which shows the ketch shim behaves as containerd's does (pkg/process/io.go)."""

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
from typing import Any

import grpc
import pytest

from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ketch.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ketch.testing.daemons import KETCH_RUNTIME
from tests.interop.conftest import KETCH_SHIM, Env
from tests.interop.test_ketchd import SPEC_TYPE, md, spec_for

OPTIONS_TYPE = "containerd.runc.v1.Options"


class Client:
    """containerd's Containers and Tasks services of ``env``'s daemon, for one namespace."""

    def __init__(self, env: Env, ns: str) -> None:
        self.env = env
        self.ns = ns
        self.channel = grpc.insecure_channel(f"unix://{env.cd.address}")
        self.containers = containers_pb2_grpc.ContainersStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksStub(self.channel)

    def container(self, id: str, spec: dict[str, Any], options: oci_pb2.Options | None = None) -> None:
        c = containers_pb2.Container(id=id, runtime=containers_pb2.Container.Runtime(name=self.env.runtime))
        c.spec.type_url, c.spec.value = SPEC_TYPE, json.dumps(spec).encode()
        if options is not None:
            c.runtime.options.type_url, c.runtime.options.value = OPTIONS_TYPE, options.SerializeToString()
        self.containers.Create(containers_pb2.CreateContainerRequest(container=c), metadata=md(self.ns))

    def create(self, id: str, **stdio: Any) -> int:
        return int(self.tasks.Create(tasks_pb2.CreateTaskRequest(container_id=id, **stdio), metadata=md(self.ns)).pid)

    def start(self, id: str, exec_id: str = "") -> None:
        self.tasks.Start(tasks_pb2.StartRequest(container_id=id, exec_id=exec_id), metadata=md(self.ns))

    def wait(self, id: str, exec_id: str = "") -> int:
        req = tasks_pb2.WaitRequest(container_id=id, exec_id=exec_id)
        return int(self.tasks.Wait(req, metadata=md(self.ns), timeout=60).exit_status)

    def exec(self, id: str, exec_id: str, process: dict[str, Any], **stdio: Any) -> None:
        req = tasks_pb2.ExecProcessRequest(container_id=id, exec_id=exec_id, **stdio)
        req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
        req.spec.value = json.dumps(process).encode()
        self.tasks.Exec(req, metadata=md(self.ns))

    def kill(self, id: str) -> None:
        self.tasks.Kill(tasks_pb2.KillRequest(container_id=id, signal=9), metadata=md(self.ns))

    def delete(self, id: str) -> None:
        """Delete the task (if any) and the container."""
        try:
            self.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id=id), metadata=md(self.ns))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        self.containers.Delete(containers_pb2.DeleteContainerRequest(id=id), metadata=md(self.ns))

    def run(self, id: str, **stdio: Any) -> int:
        """Create, start, wait for and delete the task; its exit status."""
        self.create(id, **stdio)
        self.start(id)
        status = self.wait(id)
        self.tasks.Delete(tasks_pb2.DeleteTaskRequest(container_id=id), metadata=md(self.ns))
        return status

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def client(env: Env) -> Iterator[Client]:
    c = Client(env, env.ns())
    try:
        yield c
    finally:
        c.close()


def _spec(env: Env, *args: str, terminal: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(spec_for(env, "true"))  # ctr cannot take args with dashes
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = terminal
    return spec


def _wait_for(path: Path, timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (path.exists() and path.read_bytes()):
        time.sleep(0.05)
    return path.read_bytes() if path.exists() else b""


def test_output_to_regular_files_is_appended(env: Env, client: Client) -> None:
    """Plain stdio paths naming regular files: each stream is appended to its file, never
    overwriting what was there. (One file for both streams loses output under containerd's
    runc shim, whose stdout copy closes the file the stderr copy still writes to.)"""
    earlier = "an earlier line, longer than what follows\n"
    logs = {name: env.cd.base / f"{name}.log" for name in ("out", "err")}
    for log in logs.values():
        log.write_text(earlier)
    client.container("appender", _spec(env, "sh", "-c", "echo out; echo err >&2"))
    assert client.run("appender", stdout=str(logs["out"]), stderr=str(logs["err"])) == 0
    for name, log in logs.items():
        deadline = time.monotonic() + 10
        while log.read_text() == earlier and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text() == f"{earlier}{name}\n"
    client.delete("appender")


def test_a_file_uri_makes_its_directories_and_appends(env: Env, client: Client) -> None:
    log = env.cd.base / "new" / "dir" / "app.log"
    uri = f"file://{log}"
    for word in ("one", "two"):
        client.container(word, _spec(env, "echo", word))
        assert client.run(word, stdout=uri, stderr=uri) == 0
        client.delete(word)
    deadline = time.monotonic() + 10
    while log.read_text() != "one\ntwo\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text() == "one\ntwo\n"


def test_a_stdout_path_that_does_not_exist_fails_the_create(env: Env, client: Client) -> None:
    """As containerd's runc shim: only file:// URIs are created; a plain path must exist. The
    error names it, and no task is left."""
    missing = env.cd.base / "no" / "such" / "stdout"
    client.container("nowhere", _spec(env, "echo", "lost"))
    with pytest.raises(grpc.RpcError) as info:
        client.create("nowhere", stdout=str(missing), stderr=str(missing))
    details = info.value.details() or ""
    assert str(missing) in details and "no such file or directory" in details.lower(), details
    if env.runtime == KETCH_RUNTIME:
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert not missing.parent.exists()
    assert client.env.ctr(client.ns, "tasks", "ls", "-q").stdout.strip() == ""
    client.delete("nowhere")


def test_binary_log_uri_with_a_terminal(env: Env, client: Client) -> None:
    """binary:// with a terminal: the logging binary reads the pty's output on its fd 3, and
    nothing is written into the binary itself (its path has no query here: nothing tells it
    from a file but its scheme)."""
    out_dir = env.cd.base / "logged"
    out_dir.mkdir()
    logger = env.cd.base / "logger"
    script = ("#!/bin/sh\n"
              "exec 5>&-\n"
              f'cat <&3 > "{out_dir}/$CONTAINER_NAMESPACE-$CONTAINER_ID.out"\n'
              f'cat <&4 > "{out_dir}/$CONTAINER_NAMESPACE-$CONTAINER_ID.err"\n')
    logger.write_text(script)
    logger.chmod(0o755)
    uri = f"binary://{logger}"
    client.container("tty", _spec(env, "sh", "-c", "echo through the pty", terminal=True))
    assert client.run("tty", terminal=True, stdout=uri, stderr=uri) == 0
    out = _wait_for(out_dir / f"{client.ns}-tty.out")
    assert logger.read_text() == script
    assert out.replace(b"\r\n", b"\n") == b"through the pty\n"
    err = out_dir / f"{client.ns}-tty.err"  # made once fd 3 ended: the logger saw EOF, not a kill
    deadline = time.monotonic() + 10
    while not err.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert err.exists() and err.read_bytes() == b""
    client.delete("tty")


@pytest.mark.parametrize("env", KETCH_SHIM, indirect=True)  # it counts the ketch shim's fds
def test_failed_exec_starts_leave_no_fd_in_the_shim(env: Env, client: Client) -> None:
    """Execs whose stdio or runc exec fails (a stdout path that does not exist; a binary runc
    cannot exec, after the pipes were made; a terminal exec that fails the same way): the
    serving shim holds as many fds afterwards as before."""
    from ketch.testing import system as support

    fifos = {}
    for name in ("in", "out"):
        fifos[name] = env.cd.base / f"exec-{name}"
        os.mkfifo(fifos[name])
    reader = os.open(fifos["out"], os.O_RDONLY | os.O_NONBLOCK)
    client.container("host", _spec(env, "sleep", "1000"))
    client.create("host")
    client.start("host")
    shim = support.shim_pid(client.ns, "host")
    try:
        before = sorted(os.listdir(f"/proc/{shim}/fd"))
        failing = [
            ({"args": ["true"]}, {"stdin": str(fifos["in"]), "stdout": str(env.cd.base / "gone" / "out")}),
            ({"args": ["/no/such/binary"]}, {"stdin": str(fifos["in"]), "stdout": str(fifos["out"]),
                                             "stderr": str(fifos["out"])}),
            ({"args": ["/no/such/binary"]}, {"stdin": str(fifos["in"]), "stdout": str(fifos["out"]),
                                             "terminal": True}),
        ]
        for i, (process, stdio) in enumerate(failing):
            client.exec("host", f"bad{i}", {"cwd": "/", "env": ["PATH=/bin"], **process}, **stdio)
            with pytest.raises(grpc.RpcError):
                client.start("host", f"bad{i}")
        after = sorted(os.listdir(f"/proc/{shim}/fd"))
        assert after == before, f"fds {sorted(set(after) - set(before))} left in the shim"
    finally:
        os.close(reader)
        client.kill("host")
        client.wait("host")
        client.delete("host")


@pytest.fixture
def remapped_rootfs(env: Env) -> Iterator[Path]:
    """A copy of the rootfs owned by 100000 (root of a user namespace mapped there), in a
    directory the remapped root can traverse."""
    top = Path(tempfile.mkdtemp(prefix="kt-userns-", dir="/tmp"))
    os.chmod(top, 0o711)
    try:
        rootfs = top / "rootfs"
        shutil.copytree(env.rootfs, rootfs, symlinks=True)
        subprocess.run(["chown", "-R", "-h", "100000:100000", str(rootfs)], check=True)
        yield rootfs
    finally:
        shutil.rmtree(top)


def test_an_exec_gets_stdio_its_user_namespace_can_reopen(env: Env, client: Client, remapped_rootfs: Path) -> None:
    """io_uid/io_gid own the pipes of every process, the init's and an exec's alike, so that the
    root of a user namespace (here mapped to 100000) can reopen them (/proc/self/fd/1, which
    is what /dev/stdout is): runc cannot chown them from inside the namespace."""
    spec = _spec(env, "sh", "-c", "echo init > /proc/self/fd/1; exec sleep 1000")
    spec["root"]["path"] = str(remapped_rootfs)
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in ("/sys", "/sys/fs/cgroup")]
    init_log, exec_log = env.cd.base / "init.log", env.cd.base / "exec.log"
    init_log.touch()
    exec_log.touch()
    client.container("userns", spec, oci_pb2.Options(io_uid=100000, io_gid=100000))
    client.create("userns", stdout=str(init_log), stderr=str(init_log))
    client.start("userns")
    try:
        assert _wait_for(init_log) == b"init\n"
        client.exec("userns", "reopen", {"args": ["sh", "-c", "echo exec > /proc/self/fd/1"], "cwd": "/",
                                         "env": ["PATH=/bin"]}, stdout=str(exec_log), stderr=str(exec_log))
        client.start("userns", "reopen")
        assert client.wait("userns", "reopen") == 0, _wait_for(exec_log, 2)
        assert _wait_for(exec_log) == b"exec\n"
    finally:
        client.kill("userns")
        client.wait("userns")
        client.delete("userns")


# -- shim_cgroup -----------------------------------------------------------------------------------

#: the hierarchies the tests make shim cgroups in (dir under /sys/fs/cgroup → its name in
#: /proc/PID/cgroup); the others lack them, and a shim skips those, as containerd's does
CGROUP_HIERARCHIES = {"memory": "memory", "pids": "pids", "systemd": "name=systemd"}


def _cgroup_of(pid: int, hierarchy: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if hierarchy in names.split(","):
                return path
    return ""


@pytest.fixture
def shim_cgroups(client: Client) -> Iterator[tuple[str, str]]:
    """Two cgroups for shims, under the namespace's, removed once the shims in them are gone."""
    paths = (f"/{client.ns}/shims-a", f"/{client.ns}/shims-b")
    for path in paths:
        for d in CGROUP_HIERARCHIES:
            os.makedirs(f"/sys/fs/cgroup/{d}{path}")
    try:
        yield paths
    finally:
        # a shared ketch shim lingers for its group's next task; ketchd, stopping, tells it to
        # exit now (a runc shim, or ours under containerd, exits with its task)
        client.env.cd.kill(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for path in paths:
            for d in CGROUP_HIERARCHIES:
                while True:
                    try:
                        os.rmdir(f"/sys/fs/cgroup/{d}{path}")
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)


def test_each_shim_runs_in_the_shim_cgroup_its_tasks_ask_for(env: Env, client: Client,
                                                             shim_cgroups: tuple[str, str]) -> None:
    """containerd.runc.v1.Options.shim_cgroup: the shim process (with the ketch shim, its
    group's keeper too) is moved into that cgroup; tasks asking for different ones never share
    a shim process, tasks asking for the same one (or none) still share one under ketchd."""
    from ketch.shim.keeper import is_keeper, parent_pid
    from ketch.testing import system as support

    cg_a, cg_b = shim_cgroups
    asked = {"a1": cg_a, "a2": cg_a, "b": cg_b, "n1": "", "n2": ""}
    for id, cgroup in asked.items():
        client.container(id, _spec(env, "sleep", "1000"), oci_pb2.Options(shim_cgroup=cgroup) if cgroup else None)
        client.create(id)
    try:
        address = {id: (env.cd.bundle(client.ns, id) / "address").read_text() for id in asked}
        assert len({address["a1"], address["b"], address["n1"]}) == 3
        shared = env.cd.name == "ketchd" and env.runtime == KETCH_RUNTIME
        assert (address["a1"] == address["a2"] and address["n1"] == address["n2"]) == shared
        for id in ("a1", "b") if shared else ("a1", "a2", "b"):
            pid = support.shim_pid(client.ns, id)
            pids = [pid, parent_pid(pid)] if is_keeper(parent_pid(pid)) else [pid]
            assert len(pids) == (2 if env.runtime == KETCH_RUNTIME else 1)
            for p in pids:
                for hierarchy in CGROUP_HIERARCHIES.values():
                    assert _cgroup_of(p, hierarchy) == asked[id], (id, p, hierarchy)
        assert _cgroup_of(support.shim_pid(client.ns, "n1"), "memory") not in shim_cgroups
    finally:
        for id in asked:
            client.delete(id)


def test_a_shim_cgroup_that_does_not_exist_fails_the_create(env: Env, client: Client) -> None:
    missing = f"/{client.ns}/no-such-cgroup"
    client.container("lost", _spec(env, "true"), oci_pb2.Options(shim_cgroup=missing))
    with pytest.raises(grpc.RpcError) as info:
        client.create("lost")
    assert missing in (info.value.details() or ""), info.value.details()
    assert client.env.ctr(client.ns, "tasks", "ls", "-q").stdout.strip() == ""
    client.delete("lost")
