"""A container's cgroups, v1 or v2: where they are, their statistics, OOM notification.

Hosts differ: v1 (one hierarchy per controller under /sys/fs/cgroup/<controller>), hybrid
(v1 controllers plus an empty v2 tree at /sys/fs/cgroup/unified) and unified (v2 only, at
/sys/fs/cgroup). runc puts a container in v1 controllers unless the host is unified, so
"v2" here means a unified host. Nothing here does asyncio: OOM watches expose an fd to wait on.

Everything takes the cgroup filesystem's mount point as ``root`` (``/sys/fs/cgroup`` unless told
otherwise): the unit tests point it at trees recorded from real kernels (tests/data/cgroup1, cgroup2).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from typing import Any

ROOT = "/sys/fs/cgroup"


def unified(root: str = ROOT) -> bool:
    """True when the host runs cgroup v2 only."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def hierarchies() -> list[str]:
    """Where the hierarchies a process joins by path are mounted: every v1 hierarchy (named
    ones such as name=systemd too), or the v2 tree on a unified host. A hybrid host's v2 tree
    (``unified``, with no controllers) is left alone, as containerd's cgroups package does."""
    kind = "cgroup2" if unified() else "cgroup"
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == kind and fields[1] not in found:
                found.append(fields[1])
    return found


def locate(path: str) -> list[str]:
    """The directories of the cgroup ``path`` (as /proc/PID/cgroup names it) in the hierarchies
    that have it. FileNotFoundError when none has it, ValueError for a path with ``..``."""
    if ".." in path.split("/"):
        raise ValueError(f"cgroup path {path!r} may not contain '..'")
    dirs = [d for d in (os.path.join(h, path.strip("/")) for h in hierarchies()) if os.path.isdir(d)]
    if not dirs:
        raise FileNotFoundError(errno.ENOENT, f"no cgroup {path!r} in any hierarchy under {ROOT}")
    return dirs


def join(path: str, pid: int) -> None:
    """Move ``pid`` into the cgroup ``path`` of every hierarchy that has it (see :func:`locate`;
    the others are skipped, as containerd does for a static path). OSError naming the
    directory if one refuses it."""
    for d in locate(path):
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as e:
            raise OSError(e.errno, f"joining {d}: {e.strerror}") from None


@dataclass(frozen=True)
class Cgroup:
    """A process's cgroup: per-controller directories (v1) or one directory (v2)."""

    version: int
    #: v1: controller name → absolute directory; v2: {"": directory}
    paths: dict[str, str]

    @classmethod
    def of_pid(cls, pid: int, root: str = ROOT) -> Cgroup:
        with open(f"/proc/{pid}/cgroup") as f:
            return cls.parse(f.read(), root, f"pid {pid}")

    @classmethod
    def parse(cls, proc_cgroup: str, root: str = ROOT, whose: str = "a process") -> Cgroup:
        """The cgroup that ``proc_cgroup`` (the text of /proc/<pid>/cgroup) names, in the
        hierarchies mounted at ``root``."""
        lines = proc_cgroup.splitlines()
        if unified(root):
            for line in lines:
                hid, _, rest = line.partition(":")
                ctrls, _, path = rest.partition(":")
                if hid == "0":
                    return cls(2, {"": os.path.join(root, path.lstrip("/"))})
            raise FileNotFoundError(f"no cgroup v2 entry for {whose}")
        paths: dict[str, str] = {}
        for line in lines:
            _hid, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            for ctrl in ctrls.split(","):
                if not ctrl or ctrl.startswith("name="):
                    continue
                mount = os.path.join(root, ctrls)
                if not os.path.isdir(mount):
                    mount = os.path.join(root, ctrl)
                paths[ctrl] = os.path.join(mount, path.lstrip("/"))
        return cls(1, paths)

    def path(self, controller: str) -> str | None:
        return self.paths.get("" if self.version == 2 else controller)

    # -- statistics --------------------------------------------------------------------------

    def metrics(self) -> tuple[str, bytes]:
        """(type URL, marshalled metrics) as containerd's shims report them."""
        if self.version == 2:
            return "io.containerd.cgroups.v2.Metrics", self._metrics_v2().SerializeToString()
        return "io.containerd.cgroups.v1.Metrics", self._metrics_v1().SerializeToString()

    def _metrics_v1(self) -> Any:
        from ketch.api.cgroups.v1 import metrics_pb2 as m

        out = m.Metrics()
        mem = self.path("memory")
        if mem and os.path.isdir(mem):
            stat = _kv(os.path.join(mem, "memory.stat"))
            for name, value in stat.items():
                field = _V1_MEMORY_STAT.get(name, name)
                if field in m.MemoryStat.DESCRIPTOR.fields_by_name and field not in _V1_ENTRIES:
                    setattr(out.memory, field, value)
            for entry, prefix in (("usage", "memory."), ("swap", "memory.memsw."),
                                  ("kernel", "memory.kmem."), ("kernel_tcp", "memory.kmem.tcp.")):
                e = getattr(out.memory, entry)
                e.usage = _int(mem, prefix + "usage_in_bytes")
                e.max = _int(mem, prefix + "max_usage_in_bytes")
                e.limit = _int(mem, prefix + "limit_in_bytes")
                e.failcnt = _int(mem, prefix + "failcnt")
            oom = _kv(os.path.join(mem, "memory.oom_control"))
            out.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
            out.memory_oom_control.under_oom = oom.get("under_oom", 0)
            out.memory_oom_control.oom_kill = oom.get("oom_kill", 0)
        cpuacct = self.path("cpuacct")
        if cpuacct and os.path.isdir(cpuacct):
            out.cpu.usage.total = _int(cpuacct, "cpuacct.usage")
            per_cpu = _read(cpuacct, "cpuacct.usage_percpu").split()
            out.cpu.usage.per_cpu.extend(int(v) for v in per_cpu)
            ticks = _kv(os.path.join(cpuacct, "cpuacct.stat"))
            ns_per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            out.cpu.usage.user = ticks.get("user", 0) * ns_per_tick
            out.cpu.usage.kernel = ticks.get("system", 0) * ns_per_tick
        cpu = self.path("cpu")
        if cpu and os.path.isdir(cpu):
            thr = _kv(os.path.join(cpu, "cpu.stat"))
            out.cpu.throttling.periods = thr.get("nr_periods", 0)
            out.cpu.throttling.throttled_periods = thr.get("nr_throttled", 0)
            out.cpu.throttling.throttled_time = thr.get("throttled_time", 0)
        pids = self.path("pids")
        if pids and os.path.isdir(pids):
            out.pids.current = _int(pids, "pids.current")
            limit = _int(pids, "pids.max")
            out.pids.limit = 0 if limit == _UINT64_MAX else limit  # v1 says "no limit" with 0
        blkio = self.path("blkio")
        out.blkio.SetInParent()  # always there, if empty, as containerd's shims send it
        if blkio and os.path.isdir(blkio):
            for field, fname in (("io_service_bytes_recursive", "blkio.throttle.io_service_bytes"),
                                 ("io_serviced_recursive", "blkio.throttle.io_serviced")):
                for line in _read(blkio, fname).splitlines():
                    parts = line.split()
                    if len(parts) != 3 or ":" not in parts[0]:
                        continue
                    major, minor = parts[0].split(":")
                    getattr(out.blkio, field).add(op=parts[1], major=int(major), minor=int(minor),
                                                  value=int(parts[2]))
        return out

    def _metrics_v2(self) -> Any:
        from ketch.api.cgroups.v2 import metrics_pb2 as m

        out = m.Metrics()
        d = self.paths[""]
        out.pids.current = _int(d, "pids.current")
        out.pids.limit = _int(d, "pids.max")
        cpu = _kv(os.path.join(d, "cpu.stat"))
        for field in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec"):
            setattr(out.cpu, field, cpu.get(field, 0))
        stat = _kv(os.path.join(d, "memory.stat"))
        for name, value in stat.items():
            if name in m.MemoryStat.DESCRIPTOR.fields_by_name:
                setattr(out.memory, name, value)
        for name in ("workingset_refault", "workingset_activate"):  # split into _anon and _file since 5.9
            if name not in stat:
                setattr(out.memory, name, stat.get(f"{name}_anon", 0) + stat.get(f"{name}_file", 0))
        out.memory.usage = _int(d, "memory.current")
        out.memory.usage_limit = _int(d, "memory.max")
        out.memory.swap_usage = _int(d, "memory.swap.current")
        out.memory.swap_limit = _int(d, "memory.swap.max")
        events = _kv(os.path.join(d, "memory.events"))
        for field in ("low", "high", "max", "oom", "oom_kill"):
            setattr(out.memory_events, field, events.get(field, 0))
        for line in _read(d, "io.stat").splitlines():  # "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ..."
            device, _, rest = line.partition(" ")
            major, _, minor = device.partition(":")
            values = dict(p.split("=", 1) for p in rest.split() if "=" in p)
            with contextlib.suppress(ValueError):
                out.io.usage.add(major=int(major), minor=int(minor),
                                 **{k: int(values.get(k, 0)) for k in ("rbytes", "wbytes", "rios", "wios")})
        hugetlb: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            names = sorted(os.listdir(d))
            for name in names:  # hugetlb.<page size>.current and .max
                parts = name.split(".")
                if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] in ("current", "max"):
                    entry = hugetlb.get(parts[1])
                    if entry is None:
                        entry = hugetlb[parts[1]] = out.hugetlb.add(pagesize=parts[1])
                    setattr(entry, parts[2], _int(d, name))
        return out


@dataclass(frozen=True)
class Usage:
    """A container's resource use as cAdvisor reports it, from its cgroup metrics (what a
    shim's Stats answers, v1 or v2). Limits are 0 when there is none."""

    cpu_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    #: memory in use, page cache included
    memory: int = 0
    #: the highest use recorded (v1 only: None on v2)
    memory_max: int | None = None
    #: what cannot be reclaimed: memory less inactive file pages (kubelet's eviction signal)
    working_set: int = 0
    rss: int = 0
    cache: int = 0
    swap: int = 0
    memory_limit: int = 0
    threads: int = 0
    threads_limit: int = 0
    oom_kills: int = 0


def usage(type_url: str, value: bytes) -> Usage:
    """The :class:`Usage` in a shim's Stats (``io.containerd.cgroups.v1.Metrics`` or ``.v2.``);
    ValueError for another type, DecodeError for bytes that are not one."""
    name = type_url.rsplit("/", 1)[-1]
    if name == "io.containerd.cgroups.v1.Metrics":
        from ketch.api.cgroups.v1 import metrics_pb2 as m1

        v1 = m1.Metrics.FromString(value)
        mem = v1.memory
        return Usage(
            cpu_ns=v1.cpu.usage.total, cpu_user_ns=v1.cpu.usage.user, cpu_system_ns=v1.cpu.usage.kernel,
            memory=mem.usage.usage, memory_max=mem.usage.max,
            working_set=max(mem.usage.usage - mem.total_inactive_file, 0), rss=mem.total_rss,
            cache=mem.total_cache, swap=max(mem.swap.usage - mem.usage.usage, 0),
            memory_limit=_limit(mem.usage.limit),
            threads=v1.pids.current, threads_limit=v1.pids.limit, oom_kills=v1.memory_oom_control.oom_kill)
    if name == "io.containerd.cgroups.v2.Metrics":
        from ketch.api.cgroups.v2 import metrics_pb2 as m2

        v2 = m2.Metrics.FromString(value)
        mem2 = v2.memory
        return Usage(
            cpu_ns=v2.cpu.usage_usec * 1000, cpu_user_ns=v2.cpu.user_usec * 1000,
            cpu_system_ns=v2.cpu.system_usec * 1000, memory=mem2.usage,
            working_set=max(mem2.usage - mem2.inactive_file, 0), rss=mem2.anon, cache=mem2.file,
            swap=mem2.swap_usage, memory_limit=_limit(mem2.usage_limit),
            threads=v2.pids.current, threads_limit=_limit(v2.pids.limit), oom_kills=v2.memory_events.oom_kill)
    raise ValueError(f"not cgroup metrics: {type_url!r}")


def _limit(value: int) -> int:
    """0 for "no limit": v2's "max", v1's page counter maximum (2^63 rounded down to pages)."""
    return 0 if value >= 1 << 62 else value


# memory.stat names that differ from the proto's field names
_V1_MEMORY_STAT = {
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "total_pgpgin": "total_pg_pg_in", "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault", "total_pgmajfault": "total_pg_maj_fault",
}
_V1_ENTRIES = {"usage", "swap", "kernel", "kernel_tcp"}
_UINT64_MAX = (1 << 64) - 1


def _read(directory: str, name: str) -> str:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except OSError:
        return ""


def _int(directory: str, name: str) -> int:
    text = _read(directory, name).strip()
    if text == "max":
        return _UINT64_MAX
    try:
        return min(int(text), _UINT64_MAX)
    except ValueError:
        return 0


def _kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = int(v)
    except OSError:
        pass
    return out


class OOMWatch:
    """Counts OOM kills in a container's memory cgroup; ``fd`` becomes readable on a change.

    v1: an eventfd registered on memory.oom_control through cgroup.event_control.
    v2: an inotify watch on memory.events, whose oom_kill counter is compared on change.
    Call :meth:`check` when ``fd`` is readable: it returns how many new OOM events happened.
    """

    def __init__(self, cgroup: Cgroup) -> None:
        self.cgroup = cgroup
        mem = cgroup.path("memory")
        if not mem:
            raise FileNotFoundError("no memory cgroup")
        self._fds: list[int] = []
        self._seen = 0
        if cgroup.version == 1:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds.append(efd)
            ctl = os.open(os.path.join(mem, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(ctl)
            with open(os.path.join(mem, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ctl}")
            self.fd = efd
        else:
            self._events = os.path.join(mem, "memory.events")
            self._seen = _kv(self._events).get("oom_kill", 0)
            self.fd = _inotify_modify(self._events)
            self._fds.append(self.fd)

    def check(self) -> int:
        """Consume the notification; the number of new OOM kills (v1: OOM events)."""
        if self.cgroup.version == 1:
            try:
                return int.from_bytes(os.read(self.fd, 8), "little")
            except BlockingIOError:
                return 0
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)
        count = _kv(self._events).get("oom_kill", 0)
        new, self._seen = max(0, count - self._seen), count
        return new

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _inotify_modify(path: str) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    in_cloexec, in_nonblock, in_modify = 0o2000000, 0o4000, 0x2
    fd = libc.inotify_init1(in_cloexec | in_nonblock)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    if libc.inotify_add_watch(fd, os.fsencode(path), in_modify) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch {path}")
    return int(fd)
