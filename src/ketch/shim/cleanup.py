"""``containerd-shim-ketch-v2 … delete``: clean up after a shim that is gone.

The daemon runs this when a shim died (or after it shut down): force-delete the container
from runc's state (which kills whatever is left of it), unmount the bundle's rootfs, remove a
dead shim's socket, and print a containerd.task.v2.DeleteResponse on stdout — exit status 137
(SIGKILL), as containerd's runc shim reports, since the real status died with the shim.
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

    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    from ketch.api.containerd.task.v2 import shim_pb2

    resp = shim_pb2.DeleteResponse(pid=pid, exit_status=128 + 9)
    timestamps.stamp(resp.exited_at, time.time())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    for w in warnings:
        sys.stderr.write(w + "\n")
    return 0


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
