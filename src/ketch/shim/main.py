"""containerd-shim-ketch-v2: the entry point containerd (or ketchd) executes.

    containerd-shim-ketch-v2 -namespace NS -id ID -address DAEMON_SOCK [-publish-binary P]
                             [-bundle DIR] [-debug] (start | delete)

``start`` runs on every new task, so it is kept light: this module imports only os, sys and
socket (no asyncio, no protobuf). It binds the shim's socket, launches the long-lived server
(``python -m ketch.shim``) with the listening socket as fd 3, writes ``address`` and
``shim.pid`` into the bundle, and prints the address. ``delete`` cleans up after a shim that
died (see ``cleanup.py``). Without an action the process is the server itself. Where state
goes: see ``common.py``, which this module, the server and ``delete`` share.
"""

from __future__ import annotations

import os
import socket
import sys

from ketch.files import write_atomic
from ketch.shim.common import LISTEN_FD, UsageError, connectable, socket_path

_BOOL_FLAGS = {"debug", "v", "version"}
_FLAGS = {"namespace", "id", "address", "publish-binary", "bundle", "socket"} | _BOOL_FLAGS
#: seconds a shared shim with no task left waits for its group's next task before exiting
SHARED_LINGER = 10.0


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Go-flag style: -name value, --name value, -name=value; booleans take no value."""
    flags: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            rest.append(arg)
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name not in _FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not eq:
            if name in _BOOL_FLAGS:
                value = "true"
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise UsageError(f"flag needs an argument: -{name}")
        flags[name] = value
    return flags, rest


def start(flags: dict[str, str]) -> int:
    ns, id, address = flags.get("namespace", ""), flags.get("id", ""), flags.get("address", "")
    if not ns or not id:
        raise UsageError("start needs -namespace and -id")
    bundle = flags.get("bundle") or os.getcwd()
    # tasks of one group share one shim process (ketchd groups by namespace); alone otherwise
    group = os.environ.get("KETCH_SHIM_GROUP") or id
    path = socket_path(address, ns, group)
    url = "unix://" + path
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""

    if connectable(path):
        # a shim for this task is up already (containerd retried start): reuse it
        write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
        sys.stdout.write(url)
        return 0
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)

    argv = [sys.executable, "-I", "-m", "ketch.shim", "-namespace", ns, "-id", id,
            "-address", address, "-bundle", bundle]
    if flags.get("publish-binary"):
        argv += ["-publish-binary", flags["publish-binary"]]
    if flags.get("debug") == "true":
        argv.append("-debug")
    env = dict(os.environ)
    if group != id and "KETCH_SHIM_LINGER" not in env:
        env["KETCH_SHIM_LINGER"] = str(SHARED_LINGER)
    if options:
        env["KETCH_SHIM_OPTIONS"] = options.hex()
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    fd = sock.fileno()
    if fd == 3:
        os.set_inheritable(fd, True)
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
               (os.POSIX_SPAWN_DUP2, null, 2)]
    if fd != 3:
        actions.append((os.POSIX_SPAWN_DUP2, fd, 3))
    try:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    finally:
        os.close(null)
    sock.close()
    write_atomic(os.path.join(bundle, "shim.pid"), str(pid).encode(), durable=False)
    write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
    sys.stdout.write(url)
    sys.stdout.flush()
    return 0


def serve(flags: dict[str, str], args: list[str]) -> int:
    """The long-lived server: check what ``start`` handed over, import the server, split into
    the group's keeper and the serving shim (see keeper.py), then serve."""
    if not flags.get("namespace") or not flags.get("id"):
        raise UsageError("the shim server needs -namespace and -id")
    try:
        os.fstat(LISTEN_FD)
    except OSError:
        raise UsageError("the shim server expects its listening socket on fd 3; run it with 'start'") from None
    os.chdir(flags.get("bundle") or os.getcwd())
    from ketch.shim.keeper import split
    from ketch.shim.server import run

    keeper_sock, takeover = split([sys.executable, "-I", "-m", "ketch.shim", *args])
    return run(flags, keeper_sock, takeover)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags, rest = parse_args(args)
        if "v" in flags or "version" in flags:
            from ketch import __version__

            print(f"containerd-shim-ketch-v2 {__version__}")
            return 0
        action = rest[0] if rest else ""
        if action == "start":
            return start(flags)
        if action == "delete":
            from ketch.shim.cleanup import delete

            return delete(flags)
        if action == "":
            return serve(flags, args)
        raise UsageError(f"unknown action {action!r} (want start, delete or none)")
    except UsageError as e:
        sys.stderr.write(f"containerd-shim-ketch-v2: {e}\n")
        return 2
