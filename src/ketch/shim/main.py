"""containerd-shim-ketch-v2: the entry point containerd (or ketchd) executes.

    containerd-shim-ketch-v2 -namespace NS -id ID -address DAEMON_SOCK [-publish-binary P]
                             [-bundle DIR] [-debug] (start | delete)
    containerd-shim-ketch-v2 -socket PATH template

``start`` runs on every new task, so it is kept light: this module imports only os, sys and
socket (no asyncio, no protobuf). It binds the shim's socket, launches the long-lived server
(``python -m ketch.shim``) with the listening socket as fd 3, writes ``address`` and
``shim.pid`` into the bundle, and prints the address. With ``$KETCH_SHIM_TEMPLATE`` set (ketchd
sets it) it first asks the shim template there to fork the server (``template.py``), and
spawns it itself when that fails. ``template`` starts such a template at PATH (or keeps the
one there) and prints its pid. ``delete`` cleans up after a shim that
died (see ``cleanup.py``). Without an action the process is the server itself. Where state
goes: see ``common.py``, which this module, the server and ``delete`` share.
"""

from __future__ import annotations

import os
import socket
import sys

from ketch.files import write_atomic
from ketch.shim import template
from ketch.shim.common import UsageError, connectable, socket_path

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
    sock = _bind(path)
    args = ["-namespace", ns, "-id", id, "-address", address, "-bundle", bundle]
    if flags.get("publish-binary"):
        args += ["-publish-binary", flags["publish-binary"]]
    if flags.get("debug") == "true":
        args.append("-debug")
    env = dict(os.environ)
    template_path = env.pop(template.ENV, "")
    if group != id and "KETCH_SHIM_LINGER" not in env:
        env["KETCH_SHIM_LINGER"] = str(SHARED_LINGER)
    if options:
        env["KETCH_SHIM_OPTIONS"] = options.hex()
    try:
        pid = 0
        if template_path:
            try:
                pid = template.spawn(template_path, args, env, bundle, sock.fileno())
            except template.TemplateError as e:  # correctness never depends on the template
                sys.stderr.write(f"containerd-shim-ketch-v2: {e}; spawning the server\n")
        if not pid:
            pid = _spawn([sys.executable, *template.SERVER_ARGV, *args], env, sock)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    sock.close()
    write_atomic(os.path.join(bundle, "shim.pid"), str(pid).encode(), durable=False)
    write_atomic(os.path.join(bundle, "address"), url.encode(), durable=False)
    sys.stdout.write(url)
    sys.stdout.flush()
    return 0


def _bind(path: str) -> socket.socket:
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


def _spawn(argv: list[str], env: dict[str, str], sock: socket.socket) -> int:
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


def start_template(flags: dict[str, str]) -> int:
    """``-socket PATH template``: make sure a shim template serves at PATH; print its pid.
    One that answers (same interpreter and version) is kept; one that refuses is told to exit."""
    path = flags.get("socket", "")
    if not path:
        raise UsageError("template needs -socket")
    try:
        pid = template.ping(path)
    except template.TemplateError as e:
        if isinstance(e, template.Refused):  # it answered, for other code: let it go
            try:
                template.stop(path)
            except template.TemplateError:
                pass
        pid = 0
    if not pid:
        sock = _bind(path)
        try:
            pid = _spawn([sys.executable, *template.SERVER_ARGV, "-socket", path, "template-server"],
                         dict(os.environ), sock)
        finally:
            sock.close()
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    return 0


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
        if action == "template":
            return start_template(flags)
        if action == "template-server":
            return template.serve(flags.get("socket", ""), main)
        if action == "delete":
            from ketch.shim.cleanup import delete

            return delete(flags)
        if action == "":
            from ketch.shim.server import run

            return run(flags)
        raise UsageError(f"unknown action {action!r} (want start, delete, template or none)")
    except UsageError as e:
        sys.stderr.write(f"containerd-shim-ketch-v2: {e}\n")
        return 2
