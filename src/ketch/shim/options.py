"""The runtime options a task is created with: decoded from the request's ``options`` Any
(containerd.runc.v1.Options or containerd.linux.runc.CreateOptions), and kept in the bundle's
``options.json`` so that the ``delete`` action finds runc's state after the shim is gone; and
the options of a checkpoint (containerd.runc.v1.CheckpointOptions or
containerd.linux.runc.CheckpointOptions), with the ``runc checkpoint`` flags they mean."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ketch import errdefs
from ketch.files import write_atomic


def _decode(message_type: Any, value: bytes, name: str) -> Any:
    from google.protobuf.message import DecodeError

    try:
        return message_type.FromString(value)
    except DecodeError as e:
        raise errdefs.InvalidArgument(f"runtime options {name} do not decode: {e}") from None


@dataclass
class RuntimeOptions:
    """What the shim takes from containerd.runc.v1.Options / containerd.linux.runc.CreateOptions."""

    binary_name: str = "runc"
    root: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    io_uid: int = -1
    io_gid: int = -1
    #: runc --criu: the criu binary ("" = runc's default, ``criu`` on PATH)
    criu_path: str = ""
    #: where criu works on restore ("" = the bundle's ``work`` directory)
    criu_work_path: str = ""

    @classmethod
    def from_any(cls, type_url: str, value: bytes, default_root: str) -> RuntimeOptions:
        opts = cls(root=default_root)
        name = type_url.rsplit("/", 1)[-1]
        if not type_url:
            return opts
        if name == "containerd.runc.v1.Options":
            from ketch.api.containerd.runc.options import oci_pb2

            o: Any = _decode(oci_pb2.Options, value, name)
            opts.binary_name = o.binary_name or opts.binary_name
            opts.root = o.root or opts.root
            opts.systemd_cgroup = o.systemd_cgroup
            opts.criu_path = o.criu_path
        elif name == "containerd.linux.runc.CreateOptions":
            from ketch.api.containerd.linux.runctypes import runc_pb2

            o = _decode(runc_pb2.CreateOptions, value, name)
        else:
            raise errdefs.InvalidArgument(f"unsupported runtime options type {type_url!r}")
        opts.criu_work_path = o.criu_work_path
        opts.no_pivot_root = o.no_pivot_root
        opts.no_new_keyring = o.no_new_keyring
        if o.io_uid or o.io_gid:
            opts.io_uid, opts.io_gid = o.io_uid, o.io_gid
        return opts

    def save(self, bundle: str) -> None:
        """options.json in the bundle: what the ``delete`` action needs to find runc's state."""
        write_atomic(os.path.join(bundle, "options.json"), json.dumps(self.__dict__).encode(), durable=False)

    @classmethod
    def load(cls, bundle: str, default_root: str) -> RuntimeOptions:
        try:
            with open(os.path.join(bundle, "options.json")) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return cls(root=default_root)


#: criu's cgroup modes (runc checkpoint --manage-cgroups-mode)
CGROUP_MODES = ("soft", "full", "strict", "ignore")


@dataclass
class CheckpointOptions:
    """What a Checkpoint asks of criu (containerd.runc.v1.CheckpointOptions; the v1 shim's
    containerd.linux.runc.CheckpointOptions has the same fields)."""

    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    image_path: str = ""
    work_path: str = ""

    @classmethod
    def from_any(cls, type_url: str, value: bytes) -> CheckpointOptions:
        name = type_url.rsplit("/", 1)[-1]
        if not type_url:
            return cls()
        if name == "containerd.runc.v1.CheckpointOptions":
            from ketch.api.containerd.runc.options import oci_pb2

            o: Any = _decode(oci_pb2.CheckpointOptions, value, name)
        elif name == "containerd.linux.runc.CheckpointOptions":
            from ketch.api.containerd.linux.runctypes import runc_pb2

            o = _decode(runc_pb2.CheckpointOptions, value, name)
        else:
            raise errdefs.InvalidArgument(f"unsupported checkpoint options type {type_url!r}")
        if o.cgroups_mode and o.cgroups_mode not in CGROUP_MODES:
            raise errdefs.InvalidArgument(
                f"checkpoint cgroups mode {o.cgroups_mode!r}: expected one of {', '.join(CGROUP_MODES)}")
        return cls(exit=o.exit, open_tcp=o.open_tcp, external_unix_sockets=o.external_unix_sockets,
                   terminal=o.terminal, file_locks=o.file_locks, empty_namespaces=tuple(o.empty_namespaces),
                   cgroups_mode=o.cgroups_mode, image_path=o.image_path, work_path=o.work_path)

    def runc_args(self, image: str, work: str) -> list[str]:
        """The flags of ``runc checkpoint`` writing the image into ``image``, criu working (and
        logging) in ``work``: those of containerd's runc shim, ``--leave-running`` unless the
        task is to exit."""
        args = ["--image-path", image, "--work-path", work]
        for wanted, flag in ((self.open_tcp, "--tcp-established"), (self.external_unix_sockets, "--ext-unix-sk"),
                             (self.terminal, "--shell-job"), (self.file_locks, "--file-locks")):
            if wanted:
                args.append(flag)
        if self.cgroups_mode:
            args += ["--manage-cgroups-mode", self.cgroups_mode]
        for ns in self.empty_namespaces:
            args += ["--empty-ns", ns]
        if not self.exit:
            args.append("--leave-running")
        return args
