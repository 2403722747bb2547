"""What the shim's entry point (main.py), its server and its ``delete`` action share: where
state goes, the shim socket's name, and the usage error. Kept light (os and socket only), as
``start`` imports it on every new task.

Where state goes: ``$KETCH_SHIM_STATE_DIR`` if set, else the directory of the daemon's socket
(``/run/containerd`` for a stock containerd, ``/run/ketch`` for ketchd): sockets in ``s/``, runc
state in ``runc/<namespace>`` — the same places containerd's runc shim uses.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

#: room for "/<32 hex>" in sun_path (108 bytes with the terminating NUL)
_SUN_PATH_MAX = 107


#: the fd ``start`` hands the server its listening socket on
LISTEN_FD = 3


class UsageError(Exception):
    pass


def state_dir(address: str, environ: Mapping[str, str] | None = None) -> str:
    env = (os.environ if environ is None else environ).get("KETCH_SHIM_STATE_DIR")
    if env:
        return env
    address = address.removeprefix("unix://")
    return os.path.dirname(address) if address else "/run/ketch"


def runc_root(address: str, namespace: str) -> str:
    return os.path.join(state_dir(address), "runc", namespace)


def socket_path(address: str, namespace: str, group: str, environ: Mapping[str, str] | None = None) -> str:
    """The shim's socket for (daemon, namespace, group): short, stable, private to root."""
    import _sha256

    digest = _sha256.sha256(f"{address}\0{namespace}\0{group}".encode()).hexdigest()[:32]
    path = os.path.join(state_dir(address, environ), "s", digest)
    if len(path.encode()) > _SUN_PATH_MAX:
        raise UsageError(f"shim socket path {path!r} is longer than a unix socket allows; "
                         "set KETCH_SHIM_STATE_DIR to a shorter directory")
    return path


#: the runtime options type whose shim_cgroup a shim joins (containerd's runc shim reads only it)
RUNC_OPTIONS = "containerd.runc.v1.Options"
_SHIM_CGROUP_FIELD = 3


def _bytes_fields(message: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a marshalled protobuf message, by number (the last of a
    repeated number wins); other fields are skipped. ``start`` reads runtime options with this
    rather than import protobuf. IndexError or ValueError when ``message`` is malformed."""
    fields: dict[int, bytes] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = message[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while i < len(message):
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            n = varint()
            if i + n > len(message):
                raise ValueError("truncated field")
            fields[key >> 3] = message[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return fields


def shim_cgroup(options: bytes) -> str:
    """The shim_cgroup of runtime options as ``start`` reads them on stdin (a marshalled Any):
    set only in containerd.runc.v1.Options; "" otherwise, and for options that do not decode
    (the Create that follows says what is wrong with them)."""
    try:
        fields = _bytes_fields(options)
        if fields.get(1, b"").decode().rsplit("/", 1)[-1] != RUNC_OPTIONS:
            return ""
        return _bytes_fields(fields.get(2, b"")).get(_SHIM_CGROUP_FIELD, b"").decode()
    except (IndexError, ValueError):
        return ""


def connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


_BOOL_FLAGS = {"debug", "v", "version"}
_FLAGS = {"namespace", "id", "address", "publish-binary", "bundle", "socket"} | _BOOL_FLAGS


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
