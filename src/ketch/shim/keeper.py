"""The keeper: what lets a group's containers outlive the shim process that serves them.

At start-up, after its imports and before any asyncio, the shim server splits in two
(:func:`split`): the parent becomes the **keeper**, a small blocking loop, and the child goes
on as the **serving shim**. Splitting after the imports (rather than before) costs about the
same memory — the pages the serving shim dirties stay with the keeper, where imports made
before the split would be private to the shim — and lets a successor start without importing
anything; forked from a pre-imported template, the keeper shares its pages with it. Both are child subreapers, so:

* while the serving shim lives, the containers it starts are its children (runc's orphans
  reparent to the nearest subreaper): it reaps them itself, as before;
* when the serving shim dies (kill -9, OOM killer, a crash), its containers reparent to the
  keeper, which reaps them and keeps each exit (pid, status, time) until a shim acknowledges it.

The serving shim hands the keeper (over a SOCK_SEQPACKET pair, with SCM_RIGHTS) a record of
every container and process, with the fds whose loss would hurt: the pipes to the process's
stdio (with the read end of an output pipe still open, a process writing while no shim runs
blocks instead of dying of SIGPIPE), the client's FIFOs (a reader like ``ctr`` sees no EOF),
pty masters (no hangup). The listening socket stays open in the keeper, so clients that connect
meanwhile wait in its backlog.

When the serving shim dies, the keeper forks a new one (:class:`Takeover`): it inherits the
records, their fds and the exits kept, rebuilds its state from them, and serves on the same
socket, milliseconds after the death. Those containers stay the keeper's children: their exits reach the new shim as
messages. A shim that exits on purpose says ``bye`` first, and the keeper goes with it.

If the keeper dies while the shim serves, nothing is lost: the containers are the shim's
children. The group then has no keeper until it is next started; the shim logs it.

Messages (``marshal``ed dicts, one per datagram: no import needed, and both ends run the same
Python): shim → keeper ``{"op": "put", "key", "data", "fds": [names]}``
(the fds ride along, replacing the key's previous ones), ``{"op": "drop", "key"}`` (the key and
every key below it), ``{"op": "ack", "pid"}``, ``{"op": "bye"}``; keeper → shim
``{"op": "exit", "pid", "status", "at"}``.
"""

from __future__ import annotations

import array
import ctypes
import errno
import gc
import marshal
import os
import select
import signal
import socket
import time
from typing import Any

from ketch.shim.common import LISTEN_FD

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_MAX_MESSAGE = 1 << 16
_MAX_FDS = 32
#: a shim that dies this many times within RESTART_WINDOW seconds is not restarted again
MAX_RESTARTS = 5
RESTART_WINDOW = 30.0
#: the keeper's process name (comm), so tools and tests can tell it from the serving shim
KEEPER_NAME = b"ketch-keeper"


def _prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def parent_pid(pid: int) -> int:
    """``pid``'s parent, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def is_keeper(pid: int) -> bool:
    """Whether ``pid`` is a shim group's keeper (by its process name, KEEPER_NAME)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == KEEPER_NAME
    except OSError:
        return False


def become_subreaper() -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = marshal.dumps(message)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) at EOF. ``flags``: recvmsg's (MSG_DONTWAIT)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize), flags)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = marshal.loads(data)
    return (message if isinstance(message, dict) else {}), list(fds)


class Record:
    """What the serving shim told the keeper about one thing (a container, a process)."""

    __slots__ = ("data", "fds")

    def __init__(self, data: dict[str, Any], fds: dict[str, int]) -> None:
        self.data = data
        self.fds = fds


class Takeover:
    """What a serving shim forked by the keeper starts from: the records, by key, with their
    fds (open in this process); the exits the keeper reaped that no shim acknowledged
    (pid → (status, time)); how many shims served this group before this one."""

    __slots__ = ("records", "exits", "generation")

    def __init__(self, records: dict[str, Record], exits: dict[int, tuple[int, float]], generation: int) -> None:
        self.records = records
        self.exits = exits
        self.generation = generation


class Keeper:
    def __init__(self, sock: socket.socket, shim_pid: int) -> None:
        self.sock = sock
        self.shim_pid = shim_pid
        self.records: dict[str, Record] = {}
        self.exits: dict[int, tuple[int, float]] = {}
        self.generation = 0
        #: "serving", "restart" (fork another shim), "upgrade" (exec the installed ketch, then
        #: fork a shim of it) or "over" (the keeper goes)
        self.state = "serving"
        #: SIGHUP asked for a live upgrade: the serving shim is being ended for it
        self.upgrading = False
        self._bye = False
        self._restarts: list[float] = []

    # -- the serving shim's messages -------------------------------------------------------

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "put":
            names = list(message.get("fds", []))
            old = self.records.pop(str(message["key"]), None)
            self.records[str(message["key"])] = Record(dict(message.get("data", {})), dict(zip(names, fds)))
            for fd in fds[len(names):]:
                os.close(fd)
            if old is not None:
                _close_all(old)
            return
        for fd in fds:
            os.close(fd)
        if op == "drop":
            key = str(message["key"])
            for k in [k for k in self.records if k == key or k.startswith(key + "/")]:
                _close_all(self.records.pop(k))
        elif op == "ack":
            self.exits.pop(int(message["pid"]), None)
        elif op == "bye":
            self._bye = True

    # -- exits ---------------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child (the serving shim's exit sets ``state``)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.shim_pid:
                if self.upgrading:
                    self.shim_pid, self.state = 0, "upgrade"
                else:
                    self.state = "restart" if self._shim_died(_exit_status(status)) else "over"
                continue
            self.exits[pid] = (_exit_status(status), time.time())
            try:
                send(self.sock, {"op": "exit", "pid": pid, "status": self.exits[pid][0], "at": self.exits[pid][1]})
            except OSError:
                pass  # no shim to tell now: the next one inherits self.exits

    def upgrade(self) -> None:
        """Live upgrade (SIGHUP): end the serving shim; once it is reaped, the keeper execs the
        ketch installed now (same pid, so the containers stay its children) and forks a shim of
        the new version, which takes over like any successor."""
        if self.upgrading or not self.shim_pid:
            return
        self.upgrading = True
        try:
            os.kill(self.shim_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _shim_died(self, status: int) -> bool:
        """The serving shim exited: go too if it said bye, else fork the next one (True)."""
        self.shim_pid = 0
        if self._bye:
            return False
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            _say(f"the shim died {len(self._restarts)} times in {RESTART_WINDOW:.0f}s: giving the group up")
            return False
        self.generation += 1
        return True


def _close_all(record: Record) -> None:
    for fd in record.fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def split(argv: list[str]) -> tuple[socket.socket, Takeover | None]:
    """Become keeper + serving shim (see the module doc). Returns, in the serving shim only,
    its end of the keeper's socket and, after a takeover, what to start from. The keeper
    never returns: it exits when the group is over. ``argv`` is the command that starts this
    server: a live upgrade execs it."""
    become_subreaper()
    with open("/proc/self/comm", "rb") as f:
        name = f.read().strip()
    gc.collect()
    gc.freeze()  # the keeper's pages stay shared with the shims it forks
    keeper = _resumed()
    if keeper is not None:
        _become_keeper()
    while True:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            theirs.close()
            takeover = None
            if keeper is not None:
                keeper.sock.close()
                takeover = Takeover(keeper.records, keeper.exits, keeper.generation)
            _serving_shim(name)
            return mine, takeover
        mine.close()
        if keeper is None:
            keeper = Keeper(theirs, pid)
            _become_keeper()
        else:
            keeper.sock.close()
            keeper.sock, keeper.shim_pid, keeper.state = theirs, pid, "serving"
        outcome = _keep(keeper)
        if outcome == "upgrade":
            _reexec(keeper, argv)
        elif outcome != "restart":
            os._exit(0)


#: the environment variable that hands an exec'd keeper its predecessor's state (a memfd)
STATE_ENV = "KETCH_SHIM_KEEPER_STATE"


def _reexec(keeper: Keeper, argv: list[str]) -> None:
    """Exec the ketch installed now, keeping this pid (and so every container as a child), the
    listening socket and every fd the records hold; the state rides in a memfd."""
    state = {"records": {k: (r.data, r.fds) for k, r in keeper.records.items()}, "exits": keeper.exits,
             "generation": keeper.generation + 1}
    fd = os.memfd_create("ketch-keeper-state", 0)
    os.write(fd, marshal.dumps(state))
    os.lseek(fd, 0, os.SEEK_SET)
    for record in keeper.records.values():
        for held in record.fds.values():
            os.set_inheritable(held, True)
    os.set_inheritable(LISTEN_FD, True)
    keeper.sock.close()
    os.environ[STATE_ENV] = str(fd)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        _say(f"live upgrade: cannot exec {argv[0]}: {e}; going on with this version")
        os.environ.pop(STATE_ENV, None)
        os.close(fd)
        for record in keeper.records.values():
            for held in record.fds.values():
                os.set_inheritable(held, False)
        keeper.upgrading = False  # a later SIGHUP may try again; a death is a plain restart


def _resumed() -> Keeper | None:
    """The keeper a live upgrade exec'd into: its predecessor's state, from the memfd."""
    value = os.environ.pop(STATE_ENV, "")
    if not value:
        return None
    fd = int(value)
    with os.fdopen(fd, "rb") as f:
        state = marshal.loads(f.read())
    keeper = Keeper(socket.socket(), 0)  # a placeholder socket, replaced at the first fork
    keeper.records = {k: Record(data, dict(fds)) for k, (data, fds) in state["records"].items()}
    keeper.exits = dict(state["exits"])
    keeper.generation = int(state["generation"])
    for record in keeper.records.values():
        for held in record.fds.values():
            os.set_inheritable(held, False)
    return keeper


def _serving_shim(name: bytes) -> None:
    """The forked child: its own process group (a signal to the shim's group must not reach
    the keeper), a subreaper for the containers it starts, default signal handling."""
    os.setpgid(0, 0)
    become_subreaper()
    try:
        _prctl(_PR_SET_NAME, name)
    except OSError:
        pass
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    gc.unfreeze()


def _become_keeper() -> None:
    try:
        _prctl(_PR_SET_NAME, KEEPER_NAME)
    except OSError:
        pass
    for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def _keep(keeper: Keeper) -> str:
    """The keeper's loop until the serving shim dies: "restart" (fork another), "upgrade"
    (exec the installed ketch first) or "over"."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: keeper.upgrade())
    try:
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        poller.register(keeper.sock.fileno(), select.POLLIN)
        while True:
            keeper.reap()
            if keeper.state != "serving":
                return keeper.state
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            for fd, _events in ready:
                if fd == wake_r:
                    _drain(wake_r)
                    continue
                try:
                    message, fds = receive(keeper.sock)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    message, fds = None, []
                if message is None:
                    poller.unregister(keeper.sock.fileno())  # EOF: the shim is dying; SIGCHLD follows
                    continue
                keeper.handle(message, fds)
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def _say(line: str) -> None:
    """The keeper's rare words, on its stderr (the shim's log, if the daemon gave it one)."""
    try:
        os.write(2, f"ketch-keeper: {line}\n".encode())
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
