"""Pod network namespaces that outlive any process: ``/run/netns/cni-<uuid>``, made and
removed with iproute2 (``ip netns add|delete``), where containerd's CRI keeps its own
(``/var/run/netns/cni-<uuid>``). A pod's netns is bind-mounted there until the pod is removed,
so that its network survives the pause container and a ketchd restart."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from ketch import errdefs

log = logging.getLogger("ketch.cri")

__all__ = ["NETNS_DIR", "create", "remove"]

NETNS_DIR = "/run/netns"


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("ip", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def create() -> str:
    """A new network namespace; its path."""
    name = f"cni-{uuid.uuid4()}"
    code, out = await _ip("netns", "add", name)
    if code != 0:
        raise errdefs.Unavailable(f"cannot create network namespace {name}: {out}")
    path = os.path.join(NETNS_DIR, name)
    log.info("network namespace %s created", path)
    return path


async def remove(path: str) -> None:
    """Remove the namespace at ``path``; nothing when it is gone already."""
    if not path:
        return
    if os.path.dirname(path) != NETNS_DIR or not os.path.basename(path).startswith("cni-"):
        raise errdefs.InvalidArgument(f"{path} is not a pod network namespace")
    if not os.path.exists(path):
        return
    code, out = await _ip("netns", "delete", os.path.basename(path))
    if code != 0 and os.path.exists(path):
        raise errdefs.Unavailable(f"cannot remove network namespace {path}: {out}")
