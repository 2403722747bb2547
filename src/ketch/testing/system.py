"""What tests and benchmarks need from the host: a busybox rootfs, finding shims, keepers,
mounts and cgroups, and ending processes by PID (what a run left behind: ketch.testing.leftovers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ketch.shim.keeper import is_keeper, parent_pid

BUSYBOX = "/bin/busybox"
#: where ketch's console scripts are: beside the interpreter running ketch
VENV_BIN = os.path.dirname(sys.executable)


def need_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("runc", BUSYBOX):
        if not shutil.which(tool):
            return f"needs {tool}"
    return None


def make_busybox_rootfs(dest: Path) -> Path:
    """A minimal root filesystem: busybox-static and a symlink per applet."""
    bin_dir = dest / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp", "etc", "root", "run", "usr"):
        (dest / d).mkdir(exist_ok=True)
    (dest / "usr" / "bin").symlink_to("../bin")
    (dest / "sbin").symlink_to("bin")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(dest / "tmp", 0o1777)
    return dest


def listening(address: str) -> bool:
    """Whether something accepts connections on the unix socket ``address`` now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pids_referencing(marker: str, *, also: str = "") -> list[int]:
    """PIDs whose command line or cwd mentions ``marker`` (a test's private directory); with
    ``also``, only those whose command line mentions that too."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = ""
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                pass
        except OSError:
            continue
        if (marker in cmd or cwd.startswith(marker)) and also in cmd:
            found.append(int(entry))
    return found


def shim_templates(marker: str) -> list[int]:
    """PIDs of the ketch shim templates serving under ``marker`` (their command line names
    their socket). A template outlives its ketchd by design, as shims do."""
    return pids_referencing(marker, also=" template-server")


def kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        break
            except OSError:
                break
            time.sleep(0.02)


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or under the directory ``prefix``."""
    prefix = prefix.rstrip("/")
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    return [t for t in targets if t == prefix or t.startswith(prefix + "/")]


def unmount_under(prefix: str) -> None:
    for target in sorted(mounts_under(prefix), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def cgroup_mounts() -> list[str]:
    """Where every cgroup hierarchy is mounted, v1 and v2 (hybrid hosts have both)."""
    with open("/proc/self/mounts") as f:
        return [parts[1] for parts in (line.split() for line in f) if parts[2] in ("cgroup", "cgroup2")]


def cgroup_dirs(name: str) -> list[str]:
    """cgroup directories named ``name`` directly under any hierarchy's root (runc creates
    /<namespace>/<id> for containers started by containerd)."""
    return [d for d in (os.path.join(m, name) for m in cgroup_mounts()) if os.path.isdir(d)]


def _shims(namespace: str, keepers: bool = False) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
    """(pid, flag pairs) of every long-lived shim process of ``namespace`` (ours or runc's):
    the serving ones, or with ``keepers`` the keepers of ketch shim groups."""
    want = (b"-namespace", namespace.encode())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            keeper = is_keeper(int(entry))
        except OSError:
            continue
        if not any(b"shim" in a for a in args[:4]) or args[-2:-1] in ([b"start"], [b"delete"]):
            continue
        pairs = list(zip(args, args[1:]))
        if want in pairs and keeper == keepers:
            yield int(entry), pairs


def keeper_pids(namespace: str) -> set[int]:
    """The keeper of every ketch shim group serving tasks of ``namespace``."""
    return {pid for pid, _ in _shims(namespace, keepers=True)}


def kill_shim_group(namespace: str, id: str) -> None:
    """kill -9 of everything that supervises task ``id``: the keeper of its ketch shim group
    first (else it would start a successor), then the serving shim (ours or runc's)."""
    pid = shim_pid(namespace, id)
    with contextlib.suppress(OSError):
        parent = parent_pid(pid)
        if parent in keeper_pids(namespace):
            os.kill(parent, signal.SIGKILL)
            time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def shim_pids(namespace: str) -> set[int]:
    """Every long-lived shim process serving tasks of ``namespace``."""
    return {pid for pid, _ in _shims(namespace)}


def shim_pid(namespace: str, id: str) -> int:
    """The PID of the long-lived shim started for task ``id`` of ``namespace`` (a shared
    shim is named after the first task of its group)."""
    for pid, pairs in _shims(namespace):
        if (b"-id", id.encode()) in pairs:
            return pid
    raise LookupError(f"no shim for {namespace}/{id}")
