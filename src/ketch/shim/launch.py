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
from ketch.shim.common import UsageError, connectable, shim_cgroup, socket_path

#: seconds a shared shim with no task left waits for its group's next task before exiting
SHARED_LINGER = 10.0
#: the server's command line before its flags, as ``start`` execs it
SERVER_ARGV = ("-I", "-m", "ketch.shim")
#: tells ``start`` where a shim template listens (template.py)
TEMPLATE_ENV = "KETCH_SHIM_TEMPLATE"

#: the environment variable that hands the server the runtime options ``start`` was given (hex)
OPTIONS_ENV = "KETCH_SHIM_OPTIONS"
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
    cgroup = join_shim_cgroup(options)  # a cgroup that does not exist fails before a server runs
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
        server_env[OPTIONS_ENV] = options.hex()
    try:
        pid = spawn(args, server_env, bundle, sock)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    sock.close()
    if cgroup:
        try:
            join_shim_cgroup(options, pid)
        except UsageError:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            os.unlink(path)
            raise
    write_atomic(os.path.join(bundle, "shim.pid"), str(pid).encode(), durable=False)
    write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
    return url


def join_shim_cgroup(options: bytes, pid: int = 0) -> str:
    """Move ``pid`` into the shim_cgroup the runtime options ask for, if any, as containerd's
    runc shim does with its shim (with ``pid`` 0, only check that the cgroup exists); the
    cgroup, "" for none. ``start`` moves the server it spawned; the server moves itself too,
    before it splits into keeper and serving shim, so that both are in it whichever comes
    first. UsageError naming the cgroup when it cannot."""
    cgroup = shim_cgroup(options)
    if cgroup:
        from ketch import cgroups

        try:
            if pid:
                cgroups.join(cgroup, pid)
            else:
                cgroups.locate(cgroup)
        except (OSError, ValueError) as e:
            raise UsageError(f"shim_cgroup {cgroup!r}: {e.strerror if isinstance(e, OSError) else e}") from None
    return cgroup


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
