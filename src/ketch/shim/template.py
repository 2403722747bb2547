"""The shim template: a pre-imported process that forks new group shims.

A shim server started by exec spends ~60 ms importing asyncio, protobuf and ketch before it
answers its first call, and every new group (every pod, under CRI) pays it. The template pays
it once: it imports what the server needs, ``gc.freeze()``s, then serves requests on a unix
socket. For each shim it forks a child that becomes exactly what ``python -I -m ketch.shim …``
would have been (own session, stdio on /dev/null, fd 3 = the listening socket, the environment,
cwd, umask and command line of the request — /proc/PID/cmdline and environ too —, signals and
mask reset, no asyncio loop yet). The child's pages stay shared with the template until written.

It never starts a thread or an asyncio loop (fork would copy them half-alive), and it double
forks: the intermediate child exits at once, so the shim's parent is never the template.

Requests (the framing is :mod:`ketch.templatewire`'s; one message each way per connection):

    ping   executable version                              → ok PID | error REASON
    spawn  executable version cwd umask argc arg… K=V…   + SCM_RIGHTS [listening socket]
                                                           → ok PID | error REASON
    start  options-hex cwd umask argc arg… K=V…           → ok ADDRESS | error REASON
    exit                                                   → ok PID, then the template exits

``spawn`` is what ``start`` (main.py) sends when ``$KETCH_SHIM_TEMPLATE`` names a template: it
has bound the socket and asks only for the server. ``start`` is ketchd's: the whole start action
(``launch.start``: socket, files, server) run here, which also saves exec'ing an interpreter
for ``start`` itself. A spawn or ping from another interpreter or ketch version is refused, so a
caller never gets a shim of other code than its own (ketchd's ``start`` goes to the template its
own launch of the shim binary made or checked). Peers of another uid are refused (SO_PEERCRED).
This module is imported by the light ``start`` path: os, sys, socket, struct at import time.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Callable

from ketch import __version__
from ketch.shim import launch
from ketch.shim.common import LISTEN_FD, UsageError, parse_args
from ketch.templatewire import (HEADER, TIMEOUT, Refused, TemplateError, answer, call_fields, decode_body,
                                decode_header, encode, parse_call)

ENV = launch.TEMPLATE_ENV

#: how often an idle template checks that its socket is still its own (else it exits)
IDLE_CHECK = 10.0


def spawn_request(args: list[str], env: dict[str, str], cwd: str, umask: int) -> list[str]:
    return ["spawn", sys.executable, __version__, *call_fields(cwd, umask, args, env)]


def parse_spawn(fields: list[str]) -> tuple[str, int, list[str], dict[str, str]]:
    """(cwd, umask, args, env) of a spawn request whose verb, executable and version are checked."""
    return parse_call(fields[3:])


def _read(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    data = b""
    while len(data) < n:
        if fds is not None and not data:
            chunk, got, _flags, _addr = socket.recv_fds(sock, n, 4)
            fds.extend(got)
        else:
            chunk = sock.recv(n - len(data))
        if not chunk:
            raise TemplateError("connection closed mid-message")
        data += chunk
    return data


def receive(sock: socket.socket, fds: list[int] | None = None) -> list[str]:
    """One message's fields; file descriptors passed with it are appended to ``fds``."""
    header = _read(sock, HEADER.size, fds)
    return decode_body(_read(sock, decode_header(header)))


def send(sock: socket.socket, fields: list[str], fds: list[int] | None = None) -> None:
    data = encode(fields)
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    sock.sendall(data)


# --- the client (``start``, and the ``template`` launcher) ---------------------------------------

def _call(path: str, fields: list[str], fds: list[int] | None = None, timeout: float = TIMEOUT) -> int:
    """Send one request; the pid in the ``ok`` answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        send(sock, fields, fds)
        reply = receive(sock)
    except (OSError, ValueError, struct.error) as e:
        raise TemplateError(f"template {path}: {e}") from None
    finally:
        sock.close()
    try:
        pid = answer(reply)
    except Refused as e:
        raise Refused(f"template {path}: {e}") from None
    if not pid.isdigit():
        raise Refused(f"template {path}: answered {pid!r}, not a pid")
    return int(pid)


def spawn(path: str, args: list[str], env: dict[str, str], cwd: str, listen_fd: int,
          timeout: float = TIMEOUT) -> int:
    """Ask the template at ``path`` for a shim server with these flags, environment and cwd,
    serving ``listen_fd``; its pid. Raises TemplateError when that did not happen."""
    umask = os.umask(0o022)
    os.umask(umask)
    return _call(path, spawn_request(args, env, cwd, umask), [listen_fd], timeout)


def ping(path: str, timeout: float = TIMEOUT) -> int:
    """The pid of the template at ``path`` if it runs our interpreter and version."""
    return _call(path, ["ping", sys.executable, __version__], timeout=timeout)


def stop(path: str, timeout: float = TIMEOUT) -> int:
    """Ask the template at ``path`` to exit; its pid."""
    return _call(path, ["exit"], timeout=timeout)


# --- the template process ------------------------------------------------------------------------

#: what the server imports at startup or on its first Create, loaded before the fork
PRELOAD = ("ketch.shim.server", "ketch.shim.keeper", "ketch.shim.keeperlink", "ketch.api.containerd.runc.options.oci_pb2",
           "ketch.api.containerd.linux.runctypes.runc_pb2", "select", "urllib.parse")


def serve(path: str, entry: Callable[[list[str]], int]) -> int:
    """Be the template: serve on fd 3 (bound at ``path`` by the launcher) until the socket
    there is no longer ours or someone asks us to exit. ``entry`` is what a forked child runs
    with the server's arguments (main.main, as ``python -m ketch.shim`` would)."""
    import gc
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # everything imported so far stays shared with the children: no gc writes
    listener = socket.socket(fileno=LISTEN_FD)
    try:
        inode = os.stat(path).st_ino  # the file the launcher bound for us
    except OSError:
        return 1
    listener.settimeout(IDLE_CHECK)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if not _still_ours(path, inode):
                return 0
            continue
        try:
            if _handle(conn, listener, entry):
                return 0
        except Exception:  # one bad request must not end the template
            pass
        finally:
            conn.close()


def _still_ours(path: str, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _handle(conn: socket.socket, listener: socket.socket, entry: Callable[[list[str]], int]) -> bool:
    """Answer one request; True when asked to exit."""
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            send(conn, ["error", f"uid {uid} may not use this template"])
            return False
        conn.settimeout(TIMEOUT)
        try:
            fields = receive(conn, fds)
        except (OSError, TemplateError, struct.error) as e:
            send(conn, ["error", str(e)])
            return False
        verb = fields[0] if fields else ""
        if verb == "exit":
            send(conn, ["ok", str(os.getpid())])
            return True
        if verb == "start":  # ketchd's: the start action itself, run here rather than exec'd
            try:
                url = _start(fields, (conn, listener), entry)
            except (TemplateError, UsageError, OSError, ValueError) as e:
                send(conn, ["error", f"start: {e}"])
                return False
            send(conn, ["ok", url])
            return False
        if verb not in ("ping", "spawn"):
            send(conn, ["error", f"unknown request {verb!r}"])
            return False
        if fields[1:3] != [sys.executable, __version__]:
            send(conn, ["error", f"template runs {sys.executable} ketch {__version__}, not {' '.join(fields[1:3])}"])
            return False
        if verb == "ping":
            send(conn, ["ok", str(os.getpid())])
            return False
        try:
            cwd, umask, args, env = parse_spawn(fields)
        except TemplateError as e:
            send(conn, ["error", str(e)])
            return False
        if len(fds) != 1 or not _is_socket(fds[0]):
            send(conn, ["error", "a spawn request carries exactly one socket"])
            return False
        try:
            pid = _fork_server(fds[0], cwd, umask, args, env, entry, (conn, listener))
        except (OSError, TemplateError) as e:
            send(conn, ["error", f"fork: {e}"])
            return False
        send(conn, ["ok", str(pid)])
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _start(fields: list[str], sockets: tuple[socket.socket, ...], entry: Callable[[list[str]], int]) -> str:
    """Do what ``containerd-shim-ketch-v2 … start`` would (launch.start), forking the server
    from here; its address."""
    if len(fields) < 2:
        raise TemplateError("malformed start request")
    options = bytes.fromhex(fields[1])
    cwd, umask, argv, env = parse_call(fields[2:])
    flags, rest = parse_args(argv)
    if rest != ["start"]:
        raise UsageError(f"a start request runs start, not {rest!r}")

    def spawn(args: list[str], server_env: dict[str, str], bundle: str, sock: socket.socket) -> int:
        return _fork_server(sock.fileno(), bundle, umask, args, server_env, entry, (*sockets, sock))

    old = os.umask(umask)
    try:
        return launch.start(flags, env, cwd, options, spawn)
    finally:
        os.umask(old)


def _is_socket(fd: int) -> bool:
    import stat

    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _fork_server(listen_fd: int, cwd: str, umask: int, args: list[str], env: dict[str, str],
                 entry: Callable[[list[str]], int], sockets: tuple[socket.socket, ...]) -> int:
    """Double fork: the grandchild becomes the server; the pid it got."""
    template = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the intermediate: fork the server, tell its pid, exit (never return)
        code = 1
        try:
            os.close(r)
            server = os.fork()
            if server == 0:
                os.close(w)
                _become_server(listen_fd, cwd, umask, args, env, entry, sockets, template)
            os.write(w, str(server).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 64):
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data.isdigit():
        raise TemplateError("the forked server did not start")
    return int(data)


def _become_server(listen_fd: int, cwd: str, umask: int, args: list[str], env: dict[str, str],
                   entry: Callable[[list[str]], int], sockets: tuple[socket.socket, ...], template: int) -> None:
    """In the grandchild: become ``python -I -m ketch.shim ARGS`` with fd 3 = ``listen_fd``,
    then run the server and exit (never returns into the template's loop)."""
    code = 1
    try:
        import signal

        os.setsid()
        for sig in signal.valid_signals():  # as a fresh interpreter has them
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for s in sockets:
            s.detach()  # their objects must never close the fds that take these numbers
        os.dup2(listen_fd, LISTEN_FD)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(LISTEN_FD + 1, os.sysconf("SC_OPEN_MAX"))
        os.umask(umask)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        import ketch.shim

        sys.argv = [os.path.join(os.path.dirname(ketch.shim.__file__ or ""), "__main__.py"), *args]
        _show([sys.executable, *launch.SERVER_ARGV, *args], env)
        from ketch.shim import server

        server.ORIGIN = f"forked from template {template}"
        try:
            code = entry(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        os._exit(code)


#: the buffers /proc/PID/cmdline and environ show must live as long as the process
_SHOWN: list[object] = []
_PR_SET_MM, _PR_SET_MM_MAP = 35, 14


def _show(argv: list[str], env: dict[str, str]) -> bool:
    """Make /proc/PID/cmdline and /proc/PID/environ show ``argv`` and ``env`` as an exec would.
    prctl(PR_SET_MM_MAP) with the current bounds but new argument and environment areas: no
    capability needed (only for exe_fd, left alone), CONFIG_CHECKPOINT_RESTORE is. Best effort:
    without it the shim shows the template's command line."""
    import ctypes

    class MMMap(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
            "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
            ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]

    def area(strings: list[str]) -> tuple[object, int, int]:
        data = b"".join(os.fsencode(x) + b"\0" for x in strings) or b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        return buf, ctypes.addressof(buf), ctypes.addressof(buf) + len(data)

    try:
        with open("/proc/self/stat", "rb") as f:
            stat = [int(x) for x in f.read().rsplit(b") ", 1)[1].split()[1:]]
    except (OSError, ValueError):
        return False
    args_buf, arg_start, arg_end = area(argv)
    env_buf, env_start, env_end = area([f"{k}={v}" for k, v in env.items()])
    m = MMMap()
    # proc(5) numbers stat's fields from 1; the list starts at field 4
    for name, n in (("start_code", 26), ("end_code", 27), ("start_stack", 28), ("start_data", 45),
                    ("end_data", 46), ("start_brk", 47)):
        setattr(m, name, stat[n - 4])
    m.arg_start, m.arg_end, m.env_start, m.env_end = arg_start, arg_end, env_start, env_end
    m.exe_fd = 0xFFFFFFFF  # -1: keep /proc/PID/exe
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    size, zero = ctypes.c_ulong(ctypes.sizeof(m)), ctypes.c_ulong(0)
    for _ in range(3):  # the map carries brk: again if malloc moved it meanwhile
        m.brk = libc.sbrk(0) or 0
        if libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(m), size, zero) != 0:
            return False
        if (libc.sbrk(0) or 0) == m.brk:
            break
    _SHOWN.extend((args_buf, env_buf))
    return True
