"""The ketch shim under Debian's containerd 1.6, driven by Debian's ctr."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import shutil
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ketch import cgroups
from ketch.testing import leftovers
from ketch.testing import system as support
from ketch.testing.daemons import RUNC_RUNTIME
from tests.interop.conftest import Env


#: ctr gives a --rootfs container no environment at all (an image would bring PATH)
PATH = ("--env", "PATH=/usr/bin:/bin")


def run(env: Env, ns: str, cid: str, *cmd: str, extra: tuple[str, ...] = (), **kw: object) -> subprocess.CompletedProcess[str]:
    return env.ctr(ns, "run", "--rm", *env.fifo, "--runtime", env.runtime, *PATH, *extra, "--rootfs", env.rootfs, cid, *cmd,
                   **kw)


class Events:
    """``ctr events`` for one namespace, collected in the background."""

    def __init__(self, env: Env, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ctr", "--address", env.cd.address, "--namespace", ns, "events"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        time.sleep(0.3)  # let the subscription reach containerd

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def topics(self, ns: str) -> list[str]:
        out = []
        for line in self.lines:
            # "<date> <time> <zone> <zone name> <namespace> <topic> <json>"
            parts = line.split()
            if ns in parts:
                i = parts.index(ns)
                if i + 1 < len(parts):
                    out.append(parts[i + 1])
        return out

    def wait_for(self, topic: str, count: int = 1, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if f" {topic} " in line]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {topic} event within {timeout}s; saw: {self.lines}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._t.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_run_prints_output(env: Env) -> None:
    ns = env.ns()
    r = run(env, ns, "hello", "echo", "hi")
    assert r.stdout == "hi\n"
    assert env.ctr(ns, "containers", "ls", "-q").stdout.strip() == ""


def test_exit_code_propagates(env: Env) -> None:
    ns = env.ns()
    r = run(env, ns, "seven", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, r.stderr


def test_stdin_reaches_cat(env: Env) -> None:
    ns = env.ns()
    proc = subprocess.Popen(
        ["ctr", "--address", env.cd.address, "--namespace", ns, "run", "--rm", *env.fifo, "--runtime", env.runtime, *PATH,
         "--rootfs", env.rootfs, "catter", "cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # ctr 1.6 loses CloseIO when stdin hits EOF before the task is set up: give it a moment
    time.sleep(1.0)
    out, err = proc.communicate(b"through the fifo\n" * 1000, timeout=60)
    assert proc.returncode == 0, err
    assert out == b"through the fifo\n" * 1000


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def assert_resized(client: subprocess.Popen[bytes], master: int, size: bytes) -> None:
    """The client's terminal was resized: the container's ``stty size`` shows ``size``. The
    resize travels client → daemon → shim asynchronously, and the client may not be watching
    SIGWINCH yet: signal and ask until it shows."""
    seen = b""
    for _ in range(20):
        client.send_signal(signal.SIGWINCH)
        os.write(master, b"stty size\n")
        seen += _read_until(master, size, 0.5)
        if size in seen:
            return
    raise AssertionError(f"terminal never showed {size!r}: {seen!r}")


def test_run_with_terminal_and_resize(env: Env) -> None:
    ns = env.ns()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 101, 0, 0))
    proc = subprocess.Popen(
        ["ctr", "--address", env.cd.address, "--namespace", ns, "run", "--rm", "-t", *env.fifo, "--runtime", env.runtime, *PATH,
         "--rootfs", env.rootfs, "tty1", "sh"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        out = _read_until(master, b"#", 30)
        assert b"#" in out, out
        os.write(master, b"stty size; tty\n")
        out = _read_until(master, b"/dev/pts/", 10)
        assert b"31 101" in out, out
        # a resize reaches the container's terminal
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        assert_resized(proc, master, b"40 120")
        os.write(master, b"exit 3\n")
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _task_status(env: Env, ns: str, cid: str) -> str:
    for line in env.ctr(ns, "tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[2]
    return ""


def _wait_status(env: Env, ns: str, cid: str, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _task_status(env, ns, cid)
        if status == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"task {cid} is {status or 'gone'}, wanted {want}")


def test_detached_lifecycle(env: Env) -> None:
    ns = env.ns()
    events = Events(env, ns)
    try:
        env.ctr(ns, "run", "-d", *env.fifo, "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, "web", "sleep", "1000")
        _wait_status(env, ns, "web", "RUNNING")

        ps = env.ctr(ns, "tasks", "ps", "web").stdout.splitlines()
        assert ps[0].split()[0] == "PID"
        pids = [int(line.split()[0]) for line in ps[1:]]
        assert len(pids) == 1 and os.path.exists(f"/proc/{pids[0]}")

        r = env.ctr(ns, "tasks", "exec", *env.fifo, "--exec-id", "e1", "web", "sh", "-c", "echo from-exec; exit 4", check=False)
        assert r.returncode == 4, r.stderr
        assert r.stdout == "from-exec\n"

        env.ctr(ns, "tasks", "pause", "web")
        assert _task_status(env, ns, "web") == "PAUSED"
        env.ctr(ns, "tasks", "resume", "web")
        assert _task_status(env, ns, "web") == "RUNNING"

        metrics = env.ctr(ns, "tasks", "metrics", "web").stdout
        assert "memory.usage_in_bytes" in metrics, metrics
        usage = [line.split()[-1] for line in metrics.splitlines() if line.startswith("memory.usage_in_bytes")]
        assert int(usage[0]) > 0

        env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "web")
        _wait_status(env, ns, "web", "STOPPED")
        exits = events.wait_for("/tasks/exit", 2)
        assert '"exit_status":137' in exits[-1], exits

        env.ctr(ns, "tasks", "rm", "web")
        assert _task_status(env, ns, "web") == ""
        env.ctr(ns, "containers", "rm", "web")
        events.wait_for("/containers/delete")
        topics = [t for t in events.topics(ns) if t.startswith("/tasks/")]
        assert topics == [
            "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
            "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete",
        ], topics
    finally:
        events.close()


def test_metrics_read_as_containerd_s(env: Env) -> None:
    """``ctr tasks metrics``: the cgroup v1 fields as containerd's cgroups library fills them
    (the runc shim's, which dockerd and ctr read): usage within the limit, the hierarchy's
    memory and swap limits, no pids limit as 0."""
    import json

    ns = env.ns()
    env.ctr(ns, "run", "-d", *env.fifo, "--runtime", env.runtime, *PATH, "--memory-limit", str(64 << 20),
            "--rootfs", env.rootfs, "measured", "sleep", "1000")
    _wait_status(env, ns, "measured", "RUNNING")
    m = json.loads(env.ctr(ns, "tasks", "metrics", "--format", "json", "measured").stdout)
    if cgroups.unified():  # io.containerd.cgroups.v2.Metrics: no pids limit is 2^64-1 there
        mem = m["memory"]
        assert 16 << 10 < mem["usage"] < mem["usage_limit"] == 64 << 20, mem
        assert (m["pids"]["current"], m["pids"]["limit"]) == (1, (1 << 64) - 1), m["pids"]
        assert m["cpu"]["usage_usec"] > 0 and "memory_events" in m
    else:
        mem = m["memory"]
        assert 16 << 10 < mem["usage"]["usage"] < mem["usage"]["limit"] == 64 << 20, mem["usage"]
        assert mem["hierarchical_memory_limit"] == 64 << 20
        assert mem["hierarchical_swap_limit"] == mem["swap"]["limit"] > 0, mem
        assert m["pids"]["current"] == 1 and "limit" not in m["pids"], m["pids"]
        assert m["cpu"]["usage"]["total"] > 0 and "blkio" in m
    env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "measured")
    _wait_status(env, ns, "measured", "STOPPED")


def test_duplicate_exec_id_is_already_exists(env: Env) -> None:
    ns = env.ns()
    env.ctr(ns, "run", "-d", *env.fifo, "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, "dup", "sleep", "1000")
    env.ctr(ns, "tasks", "exec", *env.fifo, "-d", "--exec-id", "same", "dup", "sleep", "1000")
    r = env.ctr(ns, "tasks", "exec", *env.fifo, "--exec-id", "same", "dup", "true", check=False)
    assert r.returncode == 1
    assert "already exists" in r.stderr, r.stderr


def test_missing_binary_is_a_clear_error_and_leaves_nothing(env: Env) -> None:
    ns = env.ns()
    r = run(env, ns, "nobin", "/no/such/binary", check=False)
    assert r.returncode == 1
    assert "no such file or directory" in r.stderr.lower() or "not found" in r.stderr.lower(), r.stderr
    # the failed task is gone: no task, and no process or mount under the daemon's state
    assert env.ctr(ns, "tasks", "ls", "-q").stdout.strip() == ""
    env.ctr(ns, "containers", "rm", "nobin", check=False)
    def leftover() -> list[int]:
        daemon = {env.cd.proc.pid if env.cd.proc else -1, *support.shim_templates(str(env.cd.base))}
        return [p for p in support.pids_referencing(str(env.cd.base)) if p not in daemon]

    deadline = time.monotonic() + 10
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover() == []
    assert support.mounts_under(str(env.cd.base)) == []


@pytest.mark.parametrize("limit_mb", [16])
def test_oom_event(env: Env, limit_mb: int) -> None:
    ns = env.ns()
    events = Events(env, ns)
    try:
        r = run(env, ns, "hog", "sh", "-c", "tail /dev/zero", extra=("--memory-limit", str(limit_mb << 20)),
                check=False)
        assert r.returncode == 137, (r.returncode, r.stderr)
        oom = events.wait_for("/tasks/oom")
        assert '"container_id":"hog"' in oom[0]
        topics = events.topics(ns)
        assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    finally:
        events.close()


def test_containerd_killed_and_restarted_reconnects(env: Env) -> None:
    ns = env.ns()
    env.ctr(ns, "run", "-d", *env.fifo, "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, "survivor", "sleep", "1000")
    _wait_status(env, ns, "survivor", "RUNNING")
    pid_before = env.ctr(ns, "tasks", "ls").stdout.splitlines()[1].split()[1]
    env.cd.kill(signal.SIGKILL)
    env.cd.start()
    _wait_status(env, ns, "survivor", "RUNNING")
    assert env.ctr(ns, "tasks", "ls").stdout.splitlines()[1].split()[1] == pid_before
    r = env.ctr(ns, "tasks", "exec", *env.fifo, "--exec-id", "after", "survivor", "echo", "still-here")
    assert r.stdout == "still-here\n"
    env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "survivor")
    _wait_status(env, ns, "survivor", "STOPPED")
    env.ctr(ns, "tasks", "rm", "survivor")
    env.ctr(ns, "containers", "rm", "survivor")


def test_shim_killed_reports_exit(env: Env) -> None:
    """Everything supervising a task killed: the daemon cleans up after it (``shim delete``,
    which kills the container, still running: 137) and reports that exit. Under containerd
    that is the ketch shim's serving process alone, since containerd takes its closed
    connection for a dead shim; under ketchd the group's keeper would start a successor (see
    test_keeper.py), so the keeper dies too."""
    ns = env.ns()
    events = Events(env, ns)
    try:
        env.ctr(ns, "run", "-d", *env.fifo, "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, "orphan", "sleep", "1000")
        _wait_status(env, ns, "orphan", "RUNNING")
        if env.cd.name == "containerd":
            os.kill(support.shim_pid(ns, "orphan"), signal.SIGKILL)
        else:
            support.kill_shim_group(ns, "orphan")
        exits = events.wait_for("/tasks/exit")
        assert '"exit_status":137' in exits[0], exits
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _task_status(env, ns, "orphan") not in ("STOPPED", ""):
            time.sleep(0.1)
        env.ctr(ns, "tasks", "rm", "orphan", check=False)
        assert _task_status(env, ns, "orphan") == ""
        env.ctr(ns, "containers", "rm", "orphan")
        # the daemon's cleanup (``shim delete``) runs on its own: it leaves no shim behind
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (support.shim_pids(ns) or support.keeper_pids(ns)):
            time.sleep(0.1)
        assert not support.shim_pids(ns) and not support.keeper_pids(ns)
        if env.runtime == RUNC_RUNTIME:
            # containerd's runc shim removes its socket only when it exits of itself; after a
            # kill -9 nothing does (its ``shim delete`` neither, as under containerd): we do
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftovers.runc_shim_socket(env.cd.address, ns, "orphan"))
    finally:
        events.close()


def test_twenty_at_once(env: Env) -> None:
    ns = env.ns()
    procs = [
        subprocess.Popen(["ctr", "--address", env.cd.address, "--namespace", ns, "run", "--rm", *env.fifo,
                          "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, f"c{i}", "sh", "-c", f"echo n{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(20)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    # every output arrives: ctr 1.6 closes its FIFOs right after Wait, so Wait must wait for
    # the output to be read (ketch.delivery; the runc shim answers as soon as it reaps)
    assert [(p.returncode, out) for p, (out, _) in zip(procs, results)] == [(0, f"n{i}\n") for i in range(20)], [
        err for _, err in results]
    assert env.ctr(ns, "containers", "ls", "-q").stdout.strip() == ""


def test_a_large_output_reaches_ctr_whole(env: Env) -> None:
    """Megabytes written just before the exit: all of them reach ctr, which stops reading
    once Wait answered (the ketch shim buffers up to 1 MiB in the FIFO, the runc shim copies
    after it answered)."""
    ns = env.ns()
    size = 4 << 20
    procs = [
        subprocess.Popen(["ctr", "--address", env.cd.address, "--namespace", ns, "run", "--rm", *env.fifo,
                          "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, f"big{i}", "head", "-c", str(size),
                          "/dev/zero"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(3)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert [(p.returncode, len(out)) for p, (out, _) in zip(procs, results)] == [(0, size)] * 3, [
        err for _, err in results]


def test_binary_log_uri(env: Env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ctr --log-uri binary://…: the shim starts a logging binary that reads the process's
    stdout and stderr as fds 3 and 4 and says it is ready by closing fd 5."""
    logger = tmp_path / "logger"
    logger.write_text("#!/bin/sh\n"
                      "# argv: dir <where>; environment: CONTAINER_ID, CONTAINER_NAMESPACE\n"
                      "exec 5>&-\n"
                      'cat <&3 > "$2/$CONTAINER_NAMESPACE-$CONTAINER_ID.out" &\n'
                      'cat <&4 > "$2/$CONTAINER_NAMESPACE-$CONTAINER_ID.err"\n'
                      "wait\n")
    logger.chmod(0o755)
    ns = env.ns()
    r = env.ctr(ns, "run", "--rm", "--log-uri", f"binary://{logger}?dir={tmp_path}", "--runtime", env.runtime,
                *PATH, "--rootfs", env.rootfs, "logged", "sh", "-c", "echo to-out; echo to-err >&2")
    assert r.stdout == ""
    out, err = tmp_path / f"{ns}-logged.out", tmp_path / f"{ns}-logged.err"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (out.exists() and out.read_text() and err.exists() and err.read_text()):
        time.sleep(0.05)
    assert out.read_text() == "to-out\n" and err.read_text() == "to-err\n"


def test_a_user_namespaced_container_runs(env: Env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Root remapped to 100000 (user namespace, rootfs chowned as a client does): the state
    directories on the way to the rootfs must be traversable by it, as containerd makes them."""
    import json
    import tempfile

    # every directory on the way must be traversable by the remapped root (pytest's are 0700)
    top = Path(tempfile.mkdtemp(prefix="kt-userns-", dir="/tmp"))
    os.chmod(top, 0o711)
    try:
        _run_remapped(env, top, tmp_path, json)
    finally:
        shutil.rmtree(top)


def _run_remapped(env: Env, top: Path, tmp_path: Path, json: Any) -> None:
    rootfs = top / "rootfs"
    shutil.copytree(env.rootfs, rootfs, symlinks=True)
    subprocess.run(["chown", "-R", "-h", "100000:100000", str(rootfs)], check=True)
    ns = env.ns()
    env.ctr(ns, "containers", "create", *PATH, "--rootfs", str(rootfs), "template", "cat", "/proc/self/uid_map")
    spec = json.loads(env.ctr(ns, "containers", "info", "template").stdout)["Spec"]
    env.ctr(ns, "containers", "rm", "template")
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in ("/sys", "/sys/fs/cgroup")]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    r = env.ctr(ns, "run", "--rm", *env.fifo, "--runtime", env.runtime, "--config", str(config), "remapped",
                check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "100000", "65536"], r.stdout


def test_processes_left_in_a_shared_pid_namespace_end_with_the_init(env: Env) -> None:
    """A container without a pid namespace of its own (the host's): when its init exits, what it
    left running is killed (runc kill --all), as containerd's runc shim does."""
    import json

    ns = env.ns()
    marker = Path(env.rootfs, "tmp", support.unique("bg"))
    env.ctr(ns, "containers", "create", "--runtime", env.runtime, *PATH, "--rootfs", env.rootfs, "template", "true")
    spec = json.loads(env.ctr(ns, "containers", "info", "template").stdout)["Spec"]
    env.ctr(ns, "containers", "rm", "template")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    spec["process"]["args"] = ["sh", "-c", f"sleep 1000 & echo $! > /tmp/{marker.name}; exit 0"]
    config = Path(env.cd.base) / "hostpid.json"
    config.write_text(json.dumps(spec))
    try:
        r = env.ctr(ns, "run", "--rm", *env.fifo, "--runtime", env.runtime, "--config", str(config), "hostpid")
        assert r.returncode == 0
        pid = int(marker.read_text())
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the init's background child outlived the container"
    finally:
        marker.unlink(missing_ok=True)
