"""The runtime options a task is created with: decoded from the request's ``options`` Any
(containerd.runc.v1.Options or containerd.linux.runc.CreateOptions), and kept in the bundle's
``options.json`` so that the ``delete`` action finds runc's state after the shim is gone."""

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
        elif name == "containerd.linux.runc.CreateOptions":
            from ketch.api.containerd.linux.runctypes import runc_pb2

            o = _decode(runc_pb2.CreateOptions, value, name)
        else:
            raise errdefs.InvalidArgument(f"unsupported runtime options type {type_url!r}")
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
