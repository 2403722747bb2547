"""ketchd's configuration: TOML, every key with a default; flags override the file.

``ketchd config default`` prints :data:`DEFAULT_TOML`, which is parsed by the same code, so
the printed defaults are the defaults. containerd's flags (--root, --state, --address,
--config, --log-level) mean the same here.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ketch import errdefs

DEFAULT_TOML = """\
# ketchd configuration. Every key is shown with its default.
version = 1

# persistent data: meta.db, content, snapshots
root = "/var/lib/ketch"
# runtime state: sockets, task bundles; lost at reboot
state = "/run/ketch"

[grpc]
# containerd's gRPC API on a unix socket
address = "/run/ketch/ketchd.sock"
# owner and group of the socket (mode 0660)
uid = 0
gid = 0
max_recv_message_size = 16777216
max_send_message_size = 16777216

[ttrpc]
# the socket shims forward their events to; empty: "<grpc.address>.ttrpc"
address = ""

[log]
# debug, info, warn, error
level = "info"
# "text" or "json"
format = "text"
# seconds; above 0, asyncio's debug mode is on and every callback that holds ketchd's event
# loop longer than this is logged ("Executing <...> took N seconds"): for finding blocking work
slow_callback = 0.0

[runtime]
# seconds allowed for a shim's start, for each call to it, and for its delete
shim_start_timeout = 30.0
shim_call_timeout = 30.0
shim_delete_timeout = 30.0
# start shims with -debug
shim_debug = false
# one ketch shim process serves all the tasks of a namespace (far less memory and no process
# start per task); false: one shim per task, as containerd does
shim_grouping = true
# keep a pre-imported ketch shim (a "template", <state>/shim-template.sock) that forks the shim
# of each new group: a new group's first task starts as fast as the next ones. It outlives
# ketchd, like shims, and a restarted ketchd reuses it
shim_template = true

[runtime.aliases]
# runtime name asked for = runtime ketchd runs instead. dockerd 20.10 always asks for
# io.containerd.runc.v2; to run its containers with the ketch shim, set:
# "io.containerd.runc.v2" = "io.containerd.ketch.v2"

[cri]
# the Kubernetes CRI (runtime.v1 RuntimeService and ImageService) on the gRPC socket, for a
# kubelet or crictl; its images, pods and containers live in the "k8s.io" namespace
enabled = true
# the image of every pod's sandbox (pause) container
sandbox_image = "registry.k8s.io/pause:3.6"
# the snapshotter images are unpacked for
snapshotter = "overlayfs"
# the runtime pods run with (one shim group per pod)
runtime = "io.containerd.ketch.v2"
# CNI network configuration (the first .conf/.conflist/.json by name) and plugin binaries
cni_conf_dir = "/etc/cni/net.d"
cni_bin_dir = "/usr/lib/cni"
# where the streaming server (exec, attach, port-forward) listens; port 0: any free port
stream_server_address = "127.0.0.1"
stream_server_port = 0
# never ask for an oom_score_adj below ketchd's own (needed where root lacks CAP_SYS_RESOURCE)
restrict_oom_score_adj = false

[metrics]
# where Prometheus scrapes ketchd over HTTP (/v1/metrics, as containerd, and /metrics), as
# host:port, e.g. "127.0.0.1:1338"; empty: off, as containerd's
address = ""
"""


@dataclass
class GRPC:
    address: str = ""
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = 0
    max_send_message_size: int = 0


@dataclass
class TTRPC:
    address: str = ""


@dataclass
class Log:
    level: str = ""
    format: str = ""
    slow_callback: float = 0.0


@dataclass
class Runtime:
    shim_start_timeout: float = 0.0
    shim_call_timeout: float = 0.0
    shim_delete_timeout: float = 0.0
    shim_debug: bool = False
    shim_grouping: bool = False
    shim_template: bool = False
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class CRI:
    enabled: bool = False
    sandbox_image: str = ""
    snapshotter: str = ""
    runtime: str = ""
    cni_conf_dir: str = ""
    cni_bin_dir: str = ""
    stream_server_address: str = ""
    stream_server_port: int = 0
    restrict_oom_score_adj: bool = False


@dataclass
class Metrics:
    address: str = ""


@dataclass
class Config:
    version: int = 1
    root: str = ""
    state: str = ""
    grpc: GRPC = field(default_factory=GRPC)
    ttrpc: TTRPC = field(default_factory=TTRPC)
    log: Log = field(default_factory=Log)
    runtime: Runtime = field(default_factory=Runtime)
    cri: CRI = field(default_factory=CRI)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def ttrpc_address(self) -> str:
        return self.ttrpc.address or f"{self.grpc.address}.ttrpc"


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise errdefs.InvalidArgument(f"config: unknown key {where}{key}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise errdefs.InvalidArgument(f"config: {where}{key} must be a table")
            _apply(current, value, f"{where}{key}.")
            continue
        if isinstance(current, dict):
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise errdefs.InvalidArgument(f"config: {where}{key} must be a table of strings")
            setattr(obj, key, dict(value))
            continue
        want = type(current)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise errdefs.InvalidArgument(f"config: {where}{key} must be {want.__name__}, not {value!r}")
        setattr(obj, key, value)


def load(path: str | None = None) -> Config:
    """The defaults, overlaid with ``path`` when given."""
    cfg = Config()
    _apply(cfg, tomllib.loads(DEFAULT_TOML), "")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise errdefs.NotFound(f"config file {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise errdefs.InvalidArgument(f"config file {path}: {e}") from None
        _apply(cfg, data, "")
    if cfg.log.level not in ("debug", "info", "warn", "warning", "error", "trace"):
        raise errdefs.InvalidArgument(f"config: log.level {cfg.log.level!r} is not one of debug, info, warn, error")
    if cfg.log.slow_callback < 0:
        raise errdefs.InvalidArgument(f"config: log.slow_callback {cfg.log.slow_callback} is negative")
    if cfg.metrics.address:
        host_port(cfg.metrics.address, "metrics.address")
    return cfg


def host_port(address: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port``; an empty host is every interface) as (host, port);
    InvalidArgument naming ``key`` otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: where would its port be?
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise errdefs.InvalidArgument(
            f"config: {key} {address!r} must be host:port, the port 1 to 65535 (e.g. \"127.0.0.1:1338\")")
    return host, int(port)
