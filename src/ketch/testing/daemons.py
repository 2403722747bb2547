"""Private daemons speaking containerd's API, for tests and benchmarks: Debian's containerd
(its own root, state, sockets and config with CRI disabled; never /run/containerd) and ketchd,
each with ketch's bin directory on PATH so that ``io.containerd.ketch.v2`` finds our shim."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import re
from pathlib import Path

from ketch import slowloop
from ketch.testing import system
from ketch.testing.leftovers import Scope

KETCH_RUNTIME = "io.containerd.ketch.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
#: the exec wrapper of socket activation: the inherited fd becomes fd 3 and LISTEN_PID names the
#: process that execs (what systemd does between its fork and exec)
ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='ketchd.socket'); "
            "os.execv(sys.argv[2], sys.argv[2:])")
#: asyncio's report of a slow callback in debug mode
SLOW_CALLBACK = re.compile(r"logger=asyncio msg=\"?Executing .* took \d+\.\d+ seconds")


class Daemon:
    """A private daemon speaking containerd's API: its own root, state and sockets under ``base``."""

    name = ""
    socket_name = ""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / self.socket_name)
        created = base / ".created"
        if not created.exists():
            created.write_text(repr(time.time()))
        self.log = base / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: added to the daemon's environment
        self.env: dict[str, str] = {}
        #: directories put first on the daemon's PATH (after ketch's bin directory)
        self.path: list[str] = []
        #: file descriptors the daemon inherits
        self.pass_fds: tuple[int, ...] = ()

    def argv(self) -> list[str]:
        raise NotImplementedError

    #: where the daemon keeps its tasks' bundles: ``<bundles>/<namespace>/<id>``
    bundles_dir = ""

    @property
    def bundles(self) -> Path:
        return self.base / "state" / self.bundles_dir

    def bundle(self, ns: str, id: str) -> Path:
        return self.bundles / ns / id

    def scope(self, namespaces: list[str], *, shared: tuple[str, ...] = (),
              cgroup_parents: tuple[str, ...] = ()) -> Scope:
        """What a run of this daemon owns, for :func:`ketch.testing.leftovers.check`:
        ``namespaces`` are its alone; ``shared`` ones (dockerd's ``moby``) are not."""
        return Scope(self.base, self.address, self.log, self.bundles, tuple(namespaces), shared, cgroup_parents)

    def end_template(self) -> None:
        """End what the daemon leaves running by design once it is stopped (ketchd's shim
        template), by PID."""

    def start(self) -> None:
        path = ":".join([str(system.VENV_BIN), *self.path, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        env = dict(os.environ, PATH=path, **self.env)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=logf, env=env, start_new_session=True,
                                     pass_fds=self.pass_fds)
        logf.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            if os.path.exists(self.address):
                r = subprocess.run(["ctr", "--address", self.address, "version"], capture_output=True)
                if r.returncode == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up: {self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def ctr(self, ns: str, *args: str, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["ctr", "--address", self.address, "--namespace", ns, *args],
                           input=input.decode() if input is not None else None, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def clean_namespace(self, ns: str) -> None:
        """Kill and remove every task and container of ``ns`` (best effort)."""
        if self.proc is None:
            return
        for line in self.ctr(ns, "tasks", "ls", "-q", check=False).stdout.split():
            self.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "--all", line, check=False)
        for _ in range(50):
            if not self.ctr(ns, "tasks", "ls", "-q", check=False).stdout.split():
                break
            for line in self.ctr(ns, "tasks", "ls", "-q", check=False).stdout.split():
                self.ctr(ns, "tasks", "rm", "-f", line, check=False)
            time.sleep(0.1)
        for line in self.ctr(ns, "containers", "ls", "-q", check=False).stdout.split():
            self.ctr(ns, "containers", "rm", line, check=False)
        self.ctr("default", "namespaces", "rm", ns, check=False)


class Containerd(Daemon):
    name = "containerd"
    socket_name = "containerd.sock"
    bundles_dir = "io.containerd.runtime.v2.task"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.config = base / "config.toml"
        self.config.write_text(
            f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
"""
        )

    def argv(self) -> list[str]:
        return ["containerd", "--config", str(self.config), "--log-level", "info"]


class Ketchd(Daemon):
    name = "ketchd"
    socket_name = "ketchd.sock"
    bundles_dir = "runtime/v2"
    #: asyncio's debug mode in tests: every callback that holds ketchd's event loop longer
    #: than this is logged, and :meth:`slow_callbacks` finds it (0: off, as for benchmarks)
    slow_callback = 0.1
    #: the text of a configuration file to start with ("": none)
    config_text = ""

    #: a listening socket's fd that ketchd inherits as systemd hands it over (socket activation)
    activation_fd: int | None = None

    def activate(self, listener: socket.socket) -> None:
        """Hand ketchd ``listener`` as systemd does: as fd 3, with ``LISTEN_FDS=1`` and
        ``LISTEN_PID`` its own PID (set by an exec wrapper); it serves gRPC there."""
        self.activation_fd = listener.fileno()
        self.pass_fds = (self.activation_fd,)

    def argv(self) -> list[str]:
        argv = self._argv()
        if self.activation_fd is not None:
            argv = [sys.executable, "-I", "-c", ACTIVATE, str(self.activation_fd), *argv]
        return argv

    def _argv(self) -> list[str]:
        argv = [f"{system.VENV_BIN}/ketchd", "--root", str(self.base / "root"), "--state", str(self.base / "state"),
                "--address", self.address, "--log-level", "debug"]
        if self.config_text:
            path = self.base / "config.toml"
            path.write_text(self.config_text)
            argv += ["--config", str(path)]
        if self.slow_callback > 0:
            argv += ["--slow-callback", str(self.slow_callback)]
        return argv

    def slow_callbacks(self) -> list[str]:
        """The log's reports (over every start) of a callback in ketch's code that held
        ketchd's event loop too long: asyncio's "Executing <...> took N seconds", where the
        time ketchd itself held the loop (on a CPU or blocked, see ketch.slowloop) is over the
        bound; the time its thread only waited for a CPU of a loaded machine does not count."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            if not SLOW_CALLBACK.search(line) or "/ketch/" not in line:
                continue
            held = slowloop.HELD.search(line)
            if held is None or float(held.group(1)) >= self.slow_callback:
                found.append(line)
        return found

    def end_template(self) -> None:
        """ketchd's shim template outlives ketchd, as shims do (README): end it."""
        system.kill_pids(system.shim_templates(str(self.base)))
