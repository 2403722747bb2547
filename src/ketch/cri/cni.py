"""Container networking through CNI plugins (the CNI 1.0 protocol, as libcni runs it): a pod's
network namespace is attached to the first network configuration of the conf dir.

- The configuration is the first ``*.conflist`` / ``*.conf`` / ``*.json`` by name; a single
  ``.conf`` is a list of one plugin.
- ADD runs the plugins in order, each getting the previous one's result as ``prevResult``;
  the last result is the attachment's and is cached (as libcni does) so that CHECK and DEL get it.
- DEL runs them in reverse with the cached result, and succeeds when there is nothing to delete.
- Capabilities the runtime offers (``portMappings``, ``dns``…) reach the plugins that declare
  them, as ``runtimeConfig``.
- A plugin that fails gives its CNI error (code and msg) in a FailedPrecondition naming it.

Plugins are executables found in ``bin_dir``; they get ``CNI_COMMAND``, ``CNI_CONTAINERID``,
``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` and ``CNI_PATH``, and the configuration on stdin.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ketch import errdefs, files

__all__ = ["CNI", "Attachment", "Network", "load"]

DEFAULT_IFNAME = "eth0"


@dataclass
class Network:
    """One network configuration list."""

    name: str
    version: str
    plugins: list[dict[str, Any]]
    source: str


@dataclass
class Attachment:
    """A container's attachment to a network: what ADD returned."""

    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ips(self) -> list[str]:
        """The addresses, without their prefix length; IPv4 first."""
        out = [ip["address"].split("/")[0] for ip in self.result.get("ips") or [] if "address" in ip]
        return sorted(out, key=lambda a: ":" in a)


def load(conf_dir: str) -> Network:
    """The first network configuration of ``conf_dir``; NotFound when there is none."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith((".conflist", ".conf", ".json")))
    except FileNotFoundError:
        names = []
    if not names:
        raise errdefs.NotFound(f"no network config found in {conf_dir}: cni plugin not initialized")
    path = os.path.join(conf_dir, names[0])
    try:
        with open(path) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise errdefs.InvalidArgument(f"CNI config {path}: {e}") from None
    if "plugins" not in conf:  # a single plugin's .conf
        conf = {"cniVersion": conf.get("cniVersion", ""), "name": conf.get("name", ""), "plugins": [conf]}
    if not conf.get("name") or not isinstance(conf.get("plugins"), list) or not conf["plugins"]:
        raise errdefs.InvalidArgument(f"CNI config {path}: needs a name and at least one plugin")
    for plugin in conf["plugins"]:
        if not isinstance(plugin, dict) or not plugin.get("type"):
            raise errdefs.InvalidArgument(f"CNI config {path}: every plugin needs a type")
    return Network(conf["name"], conf.get("cniVersion", "1.0.0"), conf["plugins"], path)


class CNI:
    """Runs ``network``'s plugins from ``bin_dir``; results cached under ``cache_dir``."""

    def __init__(self, bin_dir: str, cache_dir: str) -> None:
        self._bin_dirs = [d for d in bin_dir.split(":") if d]
        self._cache_dir = cache_dir

    async def add(self, network: Network, container_id: str, netns: str, *, ifname: str = DEFAULT_IFNAME,
                  args: Mapping[str, str] | None = None, capabilities: Mapping[str, Any] | None = None) -> Attachment:
        prev: dict[str, Any] | None = None
        for plugin in network.plugins:
            prev = await self._run("ADD", network, plugin, container_id, netns, ifname, args, capabilities, prev)
        result = prev or {}
        self._cache(network, container_id, ifname, result, capabilities)
        return Attachment(result)

    async def check(self, network: Network, container_id: str, netns: str, *, ifname: str = DEFAULT_IFNAME,
                    args: Mapping[str, str] | None = None) -> None:
        cached = self._cached(network, container_id, ifname)
        if cached is None:
            raise errdefs.NotFound(f"no CNI result cached for {container_id} on {network.name}")
        result, capabilities = cached
        for plugin in network.plugins:
            await self._run("CHECK", network, plugin, container_id, netns, ifname, args, capabilities, result)

    async def delete(self, network: Network, container_id: str, netns: str, *, ifname: str = DEFAULT_IFNAME,
                     args: Mapping[str, str] | None = None, capabilities: Mapping[str, Any] | None = None) -> None:
        """Detach; plugins are told even when the netns is gone (to release IPAM leases)."""
        cached = self._cached(network, container_id, ifname)
        result, cached_caps = cached if cached is not None else (None, None)
        caps = capabilities if capabilities is not None else cached_caps
        for plugin in reversed(network.plugins):
            await self._run("DEL", network, plugin, container_id, netns, ifname, args, caps, result)
        try:
            os.unlink(self._cache_path(network, container_id, ifname))
        except FileNotFoundError:
            pass

    # -- running a plugin -----------------------------------------------------------------

    def _find(self, kind: str) -> str:
        for d in self._bin_dirs:
            path = os.path.join(d, kind)
            if os.access(path, os.X_OK):
                return path
        raise errdefs.NotFound(f"CNI plugin {kind!r} not found in {':'.join(self._bin_dirs)}")

    async def _run(self, command: str, network: Network, plugin: dict[str, Any], container_id: str, netns: str,
                   ifname: str, args: Mapping[str, str] | None, capabilities: Mapping[str, Any] | None,
                   prev: dict[str, Any] | None) -> dict[str, Any] | None:
        conf = dict(plugin)
        conf["cniVersion"] = network.version
        conf["name"] = network.name
        wanted = {k for k, on in (plugin.get("capabilities") or {}).items() if on}
        runtime_config = {k: v for k, v in (capabilities or {}).items() if k in wanted}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        conf.pop("capabilities", None)
        if prev is not None:
            conf["prevResult"] = prev
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in (args or {}).items()), "CNI_PATH": ":".join(self._bin_dirs),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        proc = await asyncio.create_subprocess_exec(
            self._find(plugin["type"]), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await proc.communicate(json.dumps(conf).encode())
        if proc.returncode != 0:
            raise errdefs.FailedPrecondition(
                f"CNI plugin {plugin['type']} {command} on network {network.name}: {_error(out, err)}")
        if command != "ADD":
            return prev
        try:
            result: dict[str, Any] = json.loads(out) if out.strip() else (prev or {})
        except ValueError:
            raise errdefs.FailedPrecondition(f"CNI plugin {plugin['type']} ADD: output is not JSON: {out[:200]!r}") from None
        return result

    # -- the result cache -----------------------------------------------------------------

    def _cache_path(self, network: Network, container_id: str, ifname: str) -> str:
        return os.path.join(self._cache_dir, f"{network.name}-{container_id}-{ifname}")

    def _cache(self, network: Network, container_id: str, ifname: str, result: dict[str, Any],
               capabilities: Mapping[str, Any] | None) -> None:
        os.makedirs(self._cache_dir, mode=0o700, exist_ok=True)
        data = json.dumps({"result": result, "capabilities": dict(capabilities or {})}).encode()
        files.write_atomic(self._cache_path(network, container_id, ifname), data)

    def _cached(self, network: Network, container_id: str,
                ifname: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            with open(self._cache_path(network, container_id, ifname)) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        return data.get("result") or {}, data.get("capabilities") or {}


def _error(out: bytes, err: bytes) -> str:
    try:
        e = json.loads(out)
        msg = f"{e.get('msg', '')}" + (f": {e['details']}" if e.get("details") else "")
        return f"{msg} (CNI error {e.get('code', '?')})"
    except (ValueError, AttributeError):
        return (err or out).decode(errors="replace").strip()[-500:] or "failed"

