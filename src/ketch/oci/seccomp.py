"""Seccomp profiles for OCI specs: ketch's default one, and a profile read from a file.

The default profile (``runtime/default``, ``docker/default``) refuses, with EPERM, the system
calls that let a container reach past its namespaces and cgroups — load kernel modules, mount,
make or join namespaces, reboot, set the clock, touch kernel keyrings, bpf, userfaultfd, raw
IO ports, process accounting, NUMA policy… — except those its capabilities entitle it to,
as Docker's default profile does for each capability. Everything else is allowed.

This is a deny list, not Docker's allow list: a system call the kernel adds later is allowed
until it is listed here. It keeps every program that runs under Docker's profile working, and
closes the same doors for a container with the default capabilities.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ketch import errdefs

__all__ = ["default_profile", "load_profile"]

#: refused to every container without the capability that entitles it
_BY_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_SYS_ADMIN": ("mount", "umount", "umount2", "unshare", "setns", "pivot_root", "quotactl", "lookup_dcookie",
                      "fanotify_init", "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open",
                      "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr"),
    "CAP_SYS_MODULE": ("init_module", "finit_module", "delete_module", "create_module", "query_module",
                       "get_kernel_syms"),
    "CAP_SYS_BOOT": ("reboot", "kexec_load", "kexec_file_load"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64", "adjtimex", "clock_adjtime",
                     "clock_adjtime64"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_NICE": ("get_mempolicy", "set_mempolicy", "mbind", "move_pages"),
    "CAP_SYS_PTRACE": ("process_vm_readv", "process_vm_writev", "kcmp"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
}

#: refused to every container, whatever its capabilities (obsolete, or unsafe in a container)
_ALWAYS = ("add_key", "keyctl", "request_key", "userfaultfd", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
           "vm86", "vm86old", "swapon", "swapoff")


def default_profile(capabilities: Iterable[str]) -> dict[str, Any]:
    """The default profile for a container holding ``capabilities`` (``CAP_…`` names)."""
    held = set(capabilities)
    denied = list(_ALWAYS)
    for cap, calls in _BY_CAPABILITY.items():
        if cap not in held:
            denied.extend(calls)
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": sorted(denied), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


_KEYS = ("defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata", "syscalls")


def load_profile(path: str) -> dict[str, Any]:
    """The profile in the JSON file ``path`` (the OCI form, which Docker's profiles share);
    InvalidArgument naming what is wrong."""
    try:
        with open(path) as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise errdefs.NotFound(f"seccomp profile {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise errdefs.InvalidArgument(f"seccomp profile {path}: {e}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("defaultAction"), str):
        raise errdefs.InvalidArgument(f"seccomp profile {path}: needs a defaultAction")
    out = {k: v for k, v in profile.items() if k in _KEYS}
    for rule in out.get("syscalls") or []:
        if not isinstance(rule, dict) or not rule.get("action"):
            raise errdefs.InvalidArgument(f"seccomp profile {path}: every syscalls entry needs an action")
        if "name" in rule and "names" not in rule:  # Docker's older single-name form
            rule["names"] = [rule.pop("name")]
    return out
