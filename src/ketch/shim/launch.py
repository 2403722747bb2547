"""What ``start`` does, as a function of its inputs: ``main.start`` runs it with the process's
environment, cwd and stdin; a shim template (``template.py``) runs it for ketchd in-process,
without the exec of a new interpreter. Kept light (os and socket only).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping

from ketch.files import write_atomic
from ketch.shim.common import UsageError, connectable, socket_path

#: seconds a shared shim with no task left waits for its group's next task before exiting
SHARED_LINGER = 10.0
#: the server's command line before its flags, as ``start`` execs it
SERVER_ARGV = ("-I", "-m", "ketch.shim")
#: tells ``start`` where a shim template listens (template.py)
TEMPLATE_ENV = "KETCH_SHIM_TEMPLATE"

#: launches the server: (its flags, its environment, the bundle, the listening socket) -> pid
Spawn = Callable[[list[str], dict[str, str], str, socket.socket], int]


def start(flags: dict[str, str], env: Mapping[str, str], cwd: str, options: bytes, spawn: Spawn) -> str:
    """Bind the shim's socket, have ``spawn`` launch the server on it (unless one serves there
    already), write ``address`` and ``shim.pid`` into the bundle; the address."""
    ns, id, address = flags.get("namespace", ""), flags.get("id", ""), flags.get("address", "")
    if not ns or not id:
        raise UsageError("start needs -namespace and -id")
    bundle = flags.get("bundle") or cwd
    # tasks of one group share one shim process (ketchd groups by namespace); alone otherwise
    group = env.get("KETCH_SHIM_GROUP") or id
    path = socket_path(address, ns, group, env)
    url = "unix://" + path

    if connectable(path):
        # a shim for this task is up already (containerd retried start): reuse it
        write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
        return url
    sock = bind(path)
    args = ["-namespace", ns, "-id", id, "-address", address, "-bundle", bundle]
    if flags.get("publish-binary"):
        args += ["-publish-binary", flags["publish-binary"]]
    if flags.get("debug") == "true":
        args.append("-debug")
    server_env = {k: v for k, v in env.items() if k != TEMPLATE_ENV}
    if group != id and "KETCH_SHIM_LINGER" not in server_env:
        server_env["KETCH_SHIM_LINGER"] = str(SHARED_LINGER)
    if options:
        server_env["KETCH_SHIM_OPTIONS"] = options.hex()
    try:
        pid = spawn(args, server_env, bundle, sock)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    sock.close()
    write_atomic(os.path.join(bundle, "shim.pid"), str(pid).encode(), durable=False)
    write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
    return url


def bind(path: str) -> socket.socket:
    """A listening socket at ``path`` (0600), replacing whatever file was there."""
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
    return sock


def spawn_process(argv: list[str], env: dict[str, str], sock: socket.socket) -> int:
    """posix_spawn ``argv`` in a new session, stdio on /dev/null and ``sock`` as fd 3."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    fd = sock.fileno()
    if fd == 3:
        os.set_inheritable(fd, True)
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
               (os.POSIX_SPAWN_DUP2, null, 2)]
    if fd != 3:
        actions.append((os.POSIX_SPAWN_DUP2, fd, 3))
    try:
        return os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    finally:
        os.close(null)
