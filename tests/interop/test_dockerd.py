"""Docker's daemon (Debian's docker.io 20.10) using ketchd as its containerd.

One private ketchd and one private dockerd per shim: dockerd always asks for
io.containerd.runc.v2, so "with the ketch shim" means a ketchd configured with the runtime
alias io.containerd.runc.v2 → io.containerd.ketch.v2 (dockerd 20.10 cannot name another shim).
"""

from __future__ import annotations

import fcntl
import contextlib
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch.testing import leftovers
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, Ketchd
from tests.interop.test_ctr_shim import _read_until, assert_resized

DOCKER = "/usr/bin/docker"
IMAGE = "busybox:ketch"

pytestmark = pytest.mark.skipif(not shutil.which("dockerd") or not os.path.exists(DOCKER),
                                reason="needs Debian's docker.io (dockerd 20.10)")


class AliasedKetchd(Ketchd):
    """ketchd running dockerd's runc.v2 tasks with the ketch shim."""

    def argv(self) -> list[str]:
        config = self.base / "ketchd.toml"
        config.write_text(f'[runtime.aliases]\n"io.containerd.runc.v2" = "{KETCH_RUNTIME}"\n')
        return super().argv() + ["--config", str(config)]


class Docker:
    def __init__(self, base: Path, containerd: str) -> None:
        self.base = base
        self.containerd = containerd
        self.sock = str(base / "docker.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup_parent = base.name
        (base / "daemon.json").write_text(json.dumps({"live-restore": True}))

    def start(self) -> None:
        env = dict(os.environ, PATH=f"{support.VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
        logf = open(self.base / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", f"--containerd={self.containerd}", "--data-root", str(self.base / "data"),
             "--exec-root", str(self.base / "exec"), "--pidfile", str(self.base / "dockerd.pid"),
             "-H", f"unix://{self.sock}", "--bridge=none", "--iptables=false", "--ip6tables=false",
             "--config-file", str(self.base / "daemon.json"),
             # its containers' cgroups under a parent of its own (not the /docker other runs share)
             "--exec-opt", "native.cgroupdriver=cgroupfs", "--cgroup-parent", f"/{self.cgroup_parent}"],
            stdout=logf, stderr=logf, env=env, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(self.base / 'dockerd.log').read_text()[-3000:]}")
            if os.path.exists(self.sock) and self.run("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("dockerd did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], input=input, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def inspect(self, name: str, fmt: str) -> str:
        return self.run("inspect", "-f", fmt, name).stdout.strip()


class Stack:
    def __init__(self, ketchd: Ketchd, docker: Docker) -> None:
        self.ketchd = ketchd
        self.docker = docker

    def d(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.docker.run(*args, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def docker_on(ketchd: Ketchd, base: Path, **config: object) -> Iterator[Docker]:
    """ketchd and a dockerd on it (``config``: more of its daemon.json), started; at the end
    both stopped, and nothing of theirs may be left."""
    docker = Docker(base, ketchd.address)
    if config:
        (base / "daemon.json").write_text(json.dumps({"live-restore": True, **config}))
    try:
        ketchd.start()
        docker.start()
        yield docker
    finally:
        if docker.proc is not None:
            ids = docker.run("ps", "-aq", check=False).stdout.split()
            if ids:
                docker.run("rm", "-f", *ids, check=False)
        docker.stop()
        ketchd.kill(signal.SIGTERM)
        ketchd.end_template()
        # dockerd bind-mounts its data root onto itself (for mount propagation) and may leave it
        subprocess.run(["umount", str(base / "data")], capture_output=True, check=False)
        # dockerd's namespace "moby" is every dockerd's: only what is under base is ours
        left = leftovers.check(ketchd.scope([], shared=("moby",), cgroup_parents=(docker.cgroup_parent,)))
        slow = ketchd.slow_callbacks()
        if not left and not slow:
            shutil.rmtree(base, ignore_errors=True)
        assert not left, "left behind:\n  " + "\n  ".join(left) + f"\n(logs in {base})"
        assert not slow, "ketchd's event loop was blocked:\n" + "\n".join(slow)


@pytest.fixture(scope="module", params=["runcshim", "ketchshim"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    ketchd = (AliasedKetchd if request.param == "ketchshim" else Ketchd)(base)
    with docker_on(ketchd, base) as docker:
        rootfs = support.make_busybox_rootfs(tmp_path_factory.mktemp("dockerimg") / "rootfs")
        tar = rootfs.parent / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        docker.run("import", "-c", "ENV PATH=/usr/bin:/bin", str(tar), IMAGE)
        yield Stack(ketchd, docker)


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _bytes(text: str) -> float:
    """docker's "1.5MiB" as a number of bytes."""
    number = text.rstrip("BKMGTi")
    return float(number) * _UNITS[text[len(number):]]


def memory_usage(stack: Stack, name: str) -> tuple[float, float]:
    """``docker stats``' memory use and limit of a running container, in bytes."""
    shown = stack.d("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip()
    used, _, limit = shown.partition(" / ")
    return _bytes(used), _bytes(limit)


def test_run_output_exit_codes_and_stdin(stack: Stack) -> None:
    assert stack.d("run", "--rm", IMAGE, "echo", "hi").stdout == "hi\n"
    assert stack.d("run", "--rm", IMAGE, "sh", "-c", "exit 7", check=False).returncode == 7
    assert stack.d("run", "--rm", "-i", IMAGE, "cat", input="via stdin\n").stdout == "via stdin\n"


def test_detached_container_everyday_commands(stack: Stack) -> None:
    d = stack.d
    d("run", "-d", "--name", "web", IMAGE, "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done")
    assert "web" in d("ps", "--format", "{{.Names}}").stdout
    r = d("exec", "web", "sh", "-c", "echo from-exec; exit 3", check=False)
    assert (r.returncode, r.stdout) == (3, "from-exec\n")
    assert d("exec", "-i", "web", "cat", input="exec stdin\n").stdout == "exec stdin\n"
    top = d("top", "web").stdout
    assert "sleep" in top or "while" in top
    d("pause", "web")
    assert stack.docker.inspect("web", "{{.State.Status}}") == "paused"
    d("unpause", "web")
    assert stack.docker.inspect("web", "{{.State.Status}}") == "running"
    used, limit = memory_usage(stack, "web")  # no limit: the host's memory
    assert 64 << 10 < used < 64 << 20 and limit > 256 << 20, (used, limit)
    d("update", "--memory", "64m", "--memory-swap", "64m", "web")
    assert stack.docker.inspect("web", "{{.HostConfig.Memory}}") == str(64 << 20)
    used, limit = memory_usage(stack, "web")
    assert 64 << 10 < used < limit == 64 << 20, (used, limit)
    time.sleep(0.3)
    assert "tick 0" in d("logs", "web").stdout
    d("kill", "web")
    assert d("wait", "web").stdout.strip() == "137"
    d("start", "web")
    assert stack.docker.inspect("web", "{{.State.Running}}") == "true"
    d("rm", "-f", "web")
    assert "web" not in d("ps", "-a", "--format", "{{.Names}}").stdout


def test_stop_sends_term_then_kill(stack: Stack) -> None:
    d = stack.d
    # a shell that traps TERM exits at once with 143... one that ignores it is killed after -t
    d("run", "-d", "--name", "stubborn", IMAGE, "sh", "-c", "trap '' TERM; while true; do sleep 0.1; done")
    started = time.monotonic()
    d("stop", "-t", "1", "stubborn")
    assert time.monotonic() - started >= 0.9
    assert stack.docker.inspect("stubborn", "{{.State.ExitCode}}") == "137"
    d("run", "-d", "--name", "polite", IMAGE, "sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done")
    time.sleep(0.3)
    d("stop", "-t", "10", "polite")
    assert stack.docker.inspect("polite", "{{.State.ExitCode}}") == "0"
    d("rm", "stubborn", "polite")


def test_tty_with_resize_and_attach(stack: Stack) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 99, 0, 0))
    proc = subprocess.Popen([DOCKER, "-H", f"unix://{stack.docker.sock}", "run", "--rm", "-it", "--name", "tty1",
                             IMAGE, "sh"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        assert b"#" in _read_until(master, b"#", 30)
        os.write(master, b"stty size\n")
        assert b"33 99" in _read_until(master, b"33 99", 10)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 111, 0, 0))
        assert_resized(proc, master, b"44 111")
        os.write(master, b"exit 4\n")
        assert proc.wait(timeout=30) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    # attach to a running container's output
    stack.d("run", "-d", "--name", "talker", IMAGE, "sh", "-c", "while true; do echo chatter; sleep 0.1; done")
    attach = subprocess.Popen([DOCKER, "-H", f"unix://{stack.docker.sock}", "attach", "--no-stdin", "talker"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attach.stdout is not None
        assert b"chatter" in attach.stdout.readline()
    finally:
        attach.kill()
        attach.communicate()
    stack.d("rm", "-f", "talker")


def test_restart_policy_and_restart(stack: Stack) -> None:
    d = stack.d
    d("run", "-d", "--name", "flaky", "--restart", "on-failure:2", IMAGE, "sh", "-c", "exit 3")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = stack.docker.inspect("flaky", "{{.RestartCount}} {{.State.Running}} {{.State.Restarting}}")
        if state == "2 false false":
            break
        time.sleep(0.2)
    assert state == "2 false false"
    assert stack.docker.inspect("flaky", "{{.State.ExitCode}}") == "3"
    d("run", "-d", "--name", "again", IMAGE, "sleep", "1000")
    pid = stack.docker.inspect("again", "{{.State.Pid}}")
    d("restart", "-t", "1", "again")
    assert stack.docker.inspect("again", "{{.State.Running}}") == "true"
    assert stack.docker.inspect("again", "{{.State.Pid}}") != pid
    d("rm", "-f", "flaky", "again")


def test_rm_force_and_concurrent_runs(stack: Stack) -> None:
    stack.d("run", "-d", "--name", "doomed", IMAGE, "sleep", "1000")
    stack.d("rm", "-f", "doomed")
    procs = [subprocess.Popen([DOCKER, "-H", f"unix://{stack.docker.sock}", "run", "--rm", IMAGE, "echo", f"n{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(10)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out == f"n{i}\n"


def test_oom_killed(stack: Stack) -> None:
    stack.d("run", "--name", "hog", "-m", "16m", "--memory-swap", "16m", IMAGE, "sh", "-c", "tail /dev/zero",
            check=False)
    assert stack.docker.inspect("hog", "{{.State.OOMKilled}} {{.State.ExitCode}}") == "true 137"
    stack.d("rm", "hog")


def test_live_restore_of_dockerd(stack: Stack) -> None:
    stack.d("run", "-d", "--name", "lasting", IMAGE, "sh", "-c", "while true; do echo alive; sleep 0.2; done")
    pid = stack.docker.inspect("lasting", "{{.State.Pid}}")
    stack.docker.stop()
    assert os.path.exists(f"/proc/{pid}")
    stack.docker.start()
    assert stack.docker.inspect("lasting", "{{.State.Running}} {{.State.Pid}}") == f"true {pid}"
    assert stack.d("exec", "lasting", "echo", "exec-after").stdout == "exec-after\n"
    time.sleep(0.5)
    assert "alive" in stack.d("logs", "--tail", "2", "lasting").stdout
    stack.d("stop", "-t", "1", "lasting")
    stack.d("rm", "lasting")


def test_ketchd_killed_and_restarted(stack: Stack) -> None:
    d = stack.d
    d("run", "-d", "--name", "survivor", IMAGE, "sleep", "1000")
    d("run", "-d", "--name", "later", IMAGE, "sh", "-c", "sleep 4; exit 5")
    pid = stack.docker.inspect("survivor", "{{.State.Pid}}")
    stack.ketchd.kill(signal.SIGKILL)
    stack.ketchd.start()
    # dockerd reconnects by itself: a new container runs
    deadline = time.monotonic() + 30
    while True:
        r = d("run", "--rm", IMAGE, "echo", "after-restart", check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.stdout == "after-restart\n", r.stderr
    assert stack.docker.inspect("survivor", "{{.State.Running}} {{.State.Pid}}") == f"true {pid}"
    assert d("exec", "survivor", "echo", "ok").stdout == "ok\n"
    # an exit after the restart reaches docker with its code
    assert d("wait", "later", timeout=60).stdout.strip() == "5"
    d("rm", "-f", "survivor", "later")
