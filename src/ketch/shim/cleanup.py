"""``containerd-shim-ketch-v2 … delete``: clean up after a shim that is gone.

The daemon runs this when a shim died (or after it shut down): force-delete the container
from runc's state (which kills whatever is left of it), unmount the bundle's rootfs, remove a
dead shim's socket, and print a containerd.task.v2.DeleteResponse on stdout. Its exit status is
137 (SIGKILL) when the container was still alive, since the force-delete killed it (what
containerd's runc shim always reports); when it had stopped already, its status died with the
shim, and we say so: 255.

A ketch shim that dies is replaced by its group's keeper (``keeper.py``), but containerd
takes a closed connection for a dead shim and runs this at once. So when a successor answers
on the task's socket, it is told to forget the task too (Delete, then Shutdown): it exits
at once if it serves nothing else, and its keeper with it, leaving nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ketch import errdefs, mount, timestamps
from ketch.oci.runc import classify
from ketch.shim.common import UsageError, connectable, runc_root
from ketch.shim.options import RuntimeOptions

RUNC_TIMEOUT = 30.0


def delete(flags: dict[str, str]) -> int:
    ns, id = flags.get("namespace", ""), flags.get("id", "")
    if not ns or not id:
        raise UsageError("delete needs -namespace and -id")
    bundle = flags.get("bundle") or os.getcwd()
    warnings: list[str] = []
    default_root = runc_root(flags.get("address", ""), ns)
    opts = RuntimeOptions.load(bundle, default_root)
    binary, root = opts.binary_name or "runc", opts.root or default_root
    status = 128 + 9 if _alive(binary, root, id) else 255
    try:
        res = subprocess.run([binary, "--root", root, "delete", "--force", id],
                             capture_output=True, timeout=RUNC_TIMEOUT, check=False)
        if res.returncode != 0:
            error = classify(res.stderr.decode(errors="replace").strip(), res.returncode)
            if not isinstance(error, errdefs.NotFound):  # already gone is what we want
                warnings.append(f"runc delete: {error.message}")
    except (OSError, subprocess.TimeoutExpired) as e:
        warnings.append(f"runc delete: {e}")
    try:
        mount.unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as e:
        warnings.append(str(e))
    _remove_dead_socket(bundle)
    _forget_in_successor(bundle, ns, id, warnings)

    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    from ketch.api.containerd.task.v2 import shim_pb2

    resp = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    timestamps.stamp(resp.exited_at, time.time())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    for w in warnings:
        sys.stderr.write(w + "\n")
    return 0


def _alive(binary: str, root: str, id: str) -> bool:
    """Whether runc has the container with a live init (created, running or paused)."""
    import json

    try:
        res = subprocess.run([binary, "--root", root, "state", id], capture_output=True, timeout=RUNC_TIMEOUT,
                             check=False)
        return res.returncode == 0 and json.loads(res.stdout).get("status") in ("created", "running", "paused")
    except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
        return False


def _forget_in_successor(bundle: str, namespace: str, id: str, warnings: list[str]) -> None:
    try:
        with open(os.path.join(bundle, "address")) as f:
            address = f.read().strip()
    except OSError:
        return
    if not address or not connectable(address.removeprefix("unix://")):
        return
    import asyncio

    from google.protobuf import empty_pb2

    from ketch import identifiers, ttrpc
    from ketch.api.containerd.task.v2 import shim_pb2

    service = "containerd.task.v2.Task"
    md: dict[str, str | list[str]] = {identifiers.TTRPC_NAMESPACE_KEY: namespace}

    async def forget() -> None:
        async with await ttrpc.connect(address, timeout=5.0) as client:
            deadline = time.monotonic() + 5.0
            while True:  # the successor may not have seen the kill's exit yet
                try:
                    await client.call(service, "Delete", shim_pb2.DeleteRequest(id=id), shim_pb2.DeleteResponse,
                                      timeout=5.0, metadata=md)
                    break
                except errdefs.NotFound:
                    break
                except errdefs.FailedPrecondition:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            # no task named: "exit now if you serve nothing", as to an idle shim nobody claims
            await client.call(service, "Shutdown", shim_pb2.ShutdownRequest(), empty_pb2.Empty,
                              timeout=5.0, metadata=md)

    try:
        asyncio.run(forget())
    except (errdefs.KetchError, OSError) as e:
        warnings.append(f"telling the group's shim to forget task {id}: {e}")


def _remove_dead_socket(bundle: str) -> None:
    try:
        with open(os.path.join(bundle, "address")) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return
    if path and os.path.exists(path) and not connectable(path):
        try:
            os.unlink(path)
        except OSError:
            pass
