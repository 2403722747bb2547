"""containerd-shim-ketch-v2: the entry point containerd (or ketchd) executes.

    containerd-shim-ketch-v2 -namespace NS -id ID -address DAEMON_SOCK [-publish-binary P]
                             [-bundle DIR] [-debug] (start | delete)
    containerd-shim-ketch-v2 -socket PATH template

``start`` runs on every new task, so it is kept light: this module imports only os, sys and
socket (no asyncio, no protobuf). It binds the shim's socket, launches the long-lived server
(``python -m ketch.shim``) with the listening socket as fd 3, writes ``address`` and
``shim.pid`` into the bundle, and prints the address (``launch.py`` holds that logic). With
``$KETCH_SHIM_TEMPLATE`` set it first asks the shim template there to fork the server
(``template.py``), and spawns it itself when that fails. ``template`` starts such a template at
PATH (or keeps the one there) and prints its pid; ketchd does so, then has the template run
``start`` itself. ``delete`` cleans up after a shim that
died (see ``cleanup.py``). Without an action the process is the server itself. Where state
goes: see ``common.py``, which this module, the server and ``delete`` share.
"""

from __future__ import annotations

import os
import socket
import sys

from ketch.shim import launch, template
from ketch.shim.common import LISTEN_FD, UsageError, parse_args
from ketch.templatewire import Refused, TemplateError


def start(flags: dict[str, str]) -> int:
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    template_path = os.environ.get(launch.TEMPLATE_ENV, "")

    def spawn(args: list[str], env: dict[str, str], bundle: str, sock: socket.socket) -> int:
        if template_path:
            try:
                return template.spawn(template_path, args, env, bundle, sock.fileno())
            except TemplateError as e:  # correctness never depends on the template
                sys.stderr.write(f"containerd-shim-ketch-v2: {e}; spawning the server\n")
        return launch.spawn_process([sys.executable, *launch.SERVER_ARGV, *args], env, sock)

    sys.stdout.write(launch.start(flags, os.environ, os.getcwd(), options, spawn))
    sys.stdout.flush()
    return 0


def start_template(flags: dict[str, str]) -> int:
    """``-socket PATH template``: make sure a shim template serves at PATH; print its pid.
    One that answers (same interpreter and version) is kept; one that refuses is told to exit."""
    path = flags.get("socket", "")
    if not path:
        raise UsageError("template needs -socket")
    try:
        pid = template.ping(path)
    except TemplateError as e:
        if isinstance(e, Refused):  # it answered, for other code: let it go
            try:
                template.stop(path)
            except TemplateError:
                pass
        pid = 0
    if not pid:
        sock = launch.bind(path)
        try:
            pid = launch.spawn_process([sys.executable, *launch.SERVER_ARGV, "-socket", path, "template-server"],
                                       dict(os.environ), sock)
        finally:
            sock.close()
    sys.stdout.write(f"{pid}\n")
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
    try:  # before the split, so that the keeper and every serving shim are in it
        launch.join_shim_cgroup(bytes.fromhex(os.environ.get(launch.OPTIONS_ENV, "")), os.getpid())
    except (UsageError, ValueError):
        pass  # ``start`` moved this process, or failed and ended it, saying why
    from ketch.shim.keeper import split
    from ketch.shim.server import run

    keeper_sock, takeover = split([sys.executable, *launch.SERVER_ARGV, *args])
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
        if action == "template":
            return start_template(flags)
        if action == "template-server":
            return template.serve(flags.get("socket", ""), main)
        if action == "delete":
            from ketch.shim.cleanup import delete

            return delete(flags)
        if action == "":
            return serve(flags, args)
        raise UsageError(f"unknown action {action!r} (want start, delete, template or none)")
    except UsageError as e:
        sys.stderr.write(f"containerd-shim-ketch-v2: {e}\n")
        return 2
