"""``containerd-shim-ketch-v2 … delete``: clean up after a shim that is gone.

The daemon runs this when a shim died (or after it shut down): force-delete the container
from runc's state (which kills whatever is left of it), unmount the bundle's rootfs, remove a
dead shim's socket, and print a containerd.task.v2.DeleteResponse on stdout — exit status 137
(SIGKILL), as containerd's runc shim reports, since the real status died with the shim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ketch import mount
from ketch.shim.main import UsageError, runc_root

RUNC_TIMEOUT = 30.0


def delete(flags: dict[str, str]) -> int:
    ns, id = flags.get("namespace", ""), flags.get("id", "")
    if not ns or not id:
        raise UsageError("delete needs -namespace and -id")
    bundle = flags.get("bundle") or os.getcwd()
    warnings: list[str] = []
    binary, root = "runc", runc_root(flags.get("address", ""), ns)
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            opts = json.load(f)
        binary, root = opts.get("binary_name") or binary, opts.get("root") or root
    except (OSError, ValueError):
        pass
    try:
        res = subprocess.run([binary, "--root", root, "delete", "--force", id],
                             capture_output=True, timeout=RUNC_TIMEOUT, check=False)
        err = res.stderr.decode(errors="replace").strip()
        if res.returncode != 0 and "does not exist" not in err:
            warnings.append(f"runc delete: {err}")
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
    now = time.time()
    resp.exited_at.seconds, resp.exited_at.nanos = int(now), int((now % 1) * 1e9)
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    for w in warnings:
        sys.stderr.write(w + "\n")
    return 0


def _remove_dead_socket(bundle: str) -> None:
    from ketch.shim.main import _connectable

    try:
        with open(os.path.join(bundle, "address")) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return
    if path and os.path.exists(path) and not _connectable(path):
        try:
            os.unlink(path)
        except OSError:
            pass
