"""ketchd under systemd, without systemd as pid 1: the notify protocol against a real datagram
socket (READY=1 once the gRPC socket answers, STOPPING=1 on SIGTERM, WATCHDOG=1 pings), socket
activation with an inherited listening socket that ctr is served through, and the unit files
`ketchd install-units` writes, checked by systemd-analyze."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ketch import systemd
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, Daemon, Ketchd
from tests.interop.conftest import Env, running
from tests.interop.test_ctr_shim import PATH


@dataclass
class Datagram:
    at: float
    fields: list[str]
    #: whether the gRPC socket accepted a connection the moment the datagram was read
    answering: bool
    #: for READY=1: ctr version's exit status, run right then (beside the receiving, which goes on)
    version: int | None = None
    checked: threading.Event = field(default_factory=threading.Event)

    def check_version(self, address: str) -> None:
        self.version = subprocess.run(["ctr", "--address", address, "version"], capture_output=True,
                                      timeout=30).returncode
        self.checked.set()


class Manager:
    """Plays systemd's side of the notify protocol: a datagram socket ketchd is told of by
    ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract one); it records what arrives."""

    def __init__(self, address: str | bytes, grpc_address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.env_value = address if isinstance(address, str) else "@" + address[1:].decode()
        self.grpc_address = grpc_address
        self.got: list[Datagram] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            d = Datagram(time.monotonic(), data.decode().split("\n"), support.listening(self.grpc_address))
            if "READY=1" in d.fields:
                threading.Thread(target=d.check_version, args=(self.grpc_address,), daemon=True).start()
            else:
                d.checked.set()
            self.got.append(d)

    def wait_for(self, field: str, timeout: float = 30, nth: int = 1) -> Datagram:
        """The ``nth`` datagram with ``field``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [d for d in list(self.got) if field in d.fields]
            if len(found) >= nth and found[nth - 1].checked.wait(timeout=max(0.0, deadline - time.monotonic())):
                return found[nth - 1]
            time.sleep(0.02)
        raise AssertionError(f"no {field} (#{nth}) from ketchd; got {[d.fields for d in self.got]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notified(rootfs: Path) -> Iterator[tuple[Env, Manager]]:
    """ketchd told to notify a manager on a path socket."""
    managers: list[Manager] = []

    def prepare(cd: Daemon) -> None:
        managers.append(Manager(str(cd.base / "notify"), cd.address))
        cd.env["NOTIFY_SOCKET"] = managers[0].env_value

    try:
        with running("ketchd", KETCH_RUNTIME, rootfs, prepare) as e:
            yield e, managers[0]
    finally:
        for m in managers:
            m.close()


def test_ready_only_once_the_grpc_socket_answers_and_stopping_on_sigterm(notified: tuple[Env, Manager]) -> None:
    kenv, manager = notified
    ready = manager.wait_for("READY=1")
    assert ready.answering and ready.version == 0, ready
    assert f"STATUS=serving on {kenv.cd.address}" in ready.fields
    assert f"MAINPID={kenv.cd.proc.pid}" in ready.fields  # type: ignore[union-attr]
    before = manager.got[: manager.got.index(ready)]
    # what comes before is progress (STATUS=), never readiness
    assert before and all(f.startswith("STATUS=") for d in before for f in d.fields), before
    assert not any("WATCHDOG=1" in d.fields for d in manager.got)  # no WATCHDOG_USEC: no pings

    kenv.cd.kill(signal.SIGTERM)
    stopping = manager.wait_for("STOPPING=1", timeout=5)
    assert stopping.at > ready.at
    assert [d.fields for d in manager.got if "READY=1" in d.fields] == [ready.fields]  # once
    assert not os.path.exists(kenv.cd.address)  # its own socket (not systemd's) is gone


def test_watchdog_pings_every_half_timeout_to_an_abstract_socket(rootfs: Path) -> None:
    name = f"\0ketch-notify-{uuid.uuid4().hex[:12]}".encode()
    managers: list[Manager] = []

    def prepare(cd: Daemon) -> None:
        managers.append(Manager(name, cd.address))
        cd.env.update(NOTIFY_SOCKET=managers[0].env_value, WATCHDOG_USEC="400000")  # a ping each 0.2 s

    try:
        with running("ketchd", KETCH_RUNTIME, rootfs, prepare) as kenv:
            manager = managers[0]
            ready = manager.wait_for("READY=1")
            time.sleep(2.0)
            pings = [d.at for d in manager.got if "WATCHDOG=1" in d.fields and d.at > ready.at]
            # 2 s of pings every 0.2 s: about 10; a loaded machine's loop may run a little late
            assert 7 <= len(pings) <= 12, pings
            gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
            assert 0.15 < gaps[len(gaps) // 2] < 0.3, gaps
            kenv.cd.kill(signal.SIGTERM)
            manager.wait_for("STOPPING=1", timeout=5)
    finally:
        for m in managers:
            m.close()


@pytest.fixture
def activated(rootfs: Path) -> Iterator[tuple[Env, socket.socket]]:
    """ketchd handed its gRPC socket as systemd's ketchd.socket hands it: bound and listening
    before ketchd starts, fd 3, LISTEN_PID/LISTEN_FDS; and told of a notify socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    managers: list[Manager] = []

    def prepare(cd: Daemon) -> None:
        assert isinstance(cd, Ketchd)
        listener.bind(cd.address)
        os.chmod(cd.address, 0o660)
        listener.listen(64)
        cd.activate(listener)
        managers.append(Manager(str(cd.base / "notify"), cd.address))
        cd.env["NOTIFY_SOCKET"] = managers[0].env_value

    try:
        with running("ketchd", KETCH_RUNTIME, rootfs, prepare) as e:
            yield e, listener
    finally:
        listener.close()
        for m in managers:
            m.close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_socket_activation_serves_ctr_through_the_inherited_socket(activated: tuple[Env, socket.socket]) -> None:
    kenv, listener = activated
    address = kenv.cd.address
    inode = os.stat(address).st_ino
    assert "Version:  v1.6.20+ketch" in kenv.ctr("default", "version").stdout
    ns = kenv.ns()
    r = kenv.ctr(ns, "run", "--rm", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "hello",
                 "echo", "served")
    assert r.stdout == "served\n"
    kenv.ctr(ns, "run", "-d", *kenv.fifo, "--runtime", kenv.runtime, *PATH, "--rootfs", kenv.rootfs, "sleeper",
             "sleep", "1000")
    # nothing ketchd starts inherits what systemd handed ketchd
    shims = support.shim_pids(ns)
    assert shims
    for pid in shims:
        shim_env = _environ(pid)
        assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"} & set(shim_env), shim_env
    # shims are told the inherited socket's path; ketchd's own ttrpc socket is beside it
    log = kenv.cd.log.read_text()
    assert f"serving on {address} (inherited)" in log and os.path.exists(address + ".ttrpc")

    kenv.cd.kill(signal.SIGTERM)
    # the socket is systemd's: still the same file, still listening; whoever connects now waits
    assert os.stat(address).st_ino == inode
    waiting = subprocess.Popen(["ctr", "--address", address, "--namespace", ns, "tasks", "ls"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert waiting.poll() is None  # in the backlog, not refused
    kenv.cd.start()  # the next ketchd, handed the same socket
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "sleeper" in out and "RUNNING" in out, err
    assert os.stat(address).st_ino == inode
    assert kenv.ctr(ns, "tasks", "exec", *kenv.fifo, "--exec-id", "e1", "sleeper", "echo", "again").stdout == "again\n"
    kenv.cd.kill(signal.SIGKILL)  # a crash leaves the private socket behind: the next one takes its place
    kenv.cd.start()
    assert os.stat(address).st_ino == inode
    assert "RUNNING" in kenv.ctr(ns, "tasks", "ls").stdout
    kenv.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "sleeper")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_install_units_writes_units_systemd_analyze_accepts(tmp_path: Path) -> None:
    ketchd = f"{support.VENV_BIN}/ketchd"
    r = subprocess.run([ketchd, "install-units", "--prefix", str(tmp_path / "units")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    service = (tmp_path / "units" / "ketchd.service").read_text()
    socket_unit = (tmp_path / "units" / "ketchd.socket").read_text()
    assert f"\nExecStart={ketchd}\n" in service
    for line in ("Type=notify", "KillMode=process", "Delegate=yes", "Restart=always", "LimitNOFILE=1048576",
                 "TasksMax=infinity", "OOMScoreAdjust=-999", "Requires=ketchd.socket"):
        assert f"\n{line}\n" in service, line
    for line in ("ListenStream=/run/ketch/ketchd.sock", "SocketMode=0660"):
        assert f"\n{line}\n" in socket_unit, line
    units = [str(tmp_path / "units" / u) for u in ("ketchd.service", "ketchd.socket")]
    checked = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
    # a ketchd whose path needs quoting
    spaced = tmp_path / "my ketch" / "ketchd"
    spaced.parent.mkdir()
    spaced.symlink_to(ketchd)
    r = subprocess.run([str(spaced), "install-units", "--prefix", str(tmp_path / "spaced")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert f'\nExecStart="{spaced}"\n' in (tmp_path / "spaced" / "ketchd.service").read_text()
    checked = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / "spaced" / u) for u in systemd.UNITS)],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
    # the check is not vacuous: a unit whose ExecStart is not there fails it
    Path(units[0]).write_text(service.replace(f"ExecStart={ketchd}", "ExecStart=/nonexistent/ketchd"))
    bad = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert bad.returncode != 0 and "/nonexistent/ketchd" in bad.stdout + bad.stderr
