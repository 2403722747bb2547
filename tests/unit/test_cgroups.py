"""ketch.cgroups and the shim's OOM watch against cgroup trees recorded as Debian 12's kernel (6.1)
writes them (tests/data): v2 (Debian 12's default; this project's test host runs v1) and v1.

The files are those of a container ``web`` of namespace ``default`` (cgroupsPath /default/web,
as ctr gives it) with a 64 MiB memory limit that has had one OOM kill. The code reads them
through its ``root`` parameter, as it reads /sys/fs/cgroup."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
from pathlib import Path

import pytest

from ketch.api.cgroups.v1 import metrics_pb2 as v1
from ketch.api.cgroups.v2 import metrics_pb2 as v2
from ketch import cgroups
from ketch.cgroups import Cgroup, OOMWatch
from ketch.shim.core import Container, Core
from ketch.shim.process import Process, State
from ketch.shim.reaper import Monitor
from ketch.shim.stdio import Stdio

from .test_reaper import child, run

DATA = Path(__file__).resolve().parents[1] / "data"
UINT64_MAX = (1 << 64) - 1
#: /proc/<pid>/cgroup of the container's init on each kind of host
V2_PROC = "0::/default/web\n"
V1_PROC = """12:misc:/
11:blkio:/default/web
10:net_cls,net_prio:/default/web
9:hugetlb:/default/web
8:memory:/default/web
7:pids:/default/web
6:cpuset:/default/web
5:perf_event:/default/web
4:freezer:/default/web
3:devices:/default/web
2:cpu,cpuacct:/default/web
1:name=systemd:/default/web
0::/default/web
"""


@pytest.fixture
def tree2(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "cgroup2", tmp_path / "cgroup2"))


@pytest.fixture
def tree1(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "cgroup1", tmp_path / "cgroup1"))


def _readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _bump_oom_kill(events: Path, oom_kill: int) -> None:
    """Rewrite memory.events as the kernel does after one more OOM kill."""
    events.write_text(f"low 0\nhigh 0\nmax {167 + oom_kill}\noom {oom_kill}\noom_kill {oom_kill}\noom_group_kill 0\n")


# -- v2 ----------------------------------------------------------------------------------------

def test_v2_paths(tree2: Path) -> None:
    cg = Cgroup.parse(V2_PROC, str(tree2))
    assert cg.version == 2
    assert cg.path("memory") == cg.path("pids") == str(tree2 / "default" / "web")


def test_v2_metrics(tree2: Path) -> None:
    type_url, value = Cgroup.parse(V2_PROC, str(tree2)).metrics()
    assert type_url == "io.containerd.cgroups.v2.Metrics"
    m = v2.Metrics.FromString(value)
    assert (m.pids.current, m.pids.limit) == (2, UINT64_MAX)  # pids.max "max"
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (1873401, 1215820, 657581)
    assert (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec) == (0, 0, 0)
    mem = m.memory
    assert (mem.usage, mem.usage_limit, mem.swap_usage, mem.swap_limit) == (36261888, 64 << 20, 0, 0)
    assert (mem.anon, mem.file, mem.kernel_stack, mem.slab, mem.sock, mem.shmem) == (
        33251328, 2162688, 65536, 589960, 0, 0)
    assert (mem.file_mapped, mem.inactive_anon, mem.active_anon, mem.inactive_file, mem.active_file) == (
        1216512, 33226752, 24576, 1830912, 331776)
    assert (mem.slab_reclaimable, mem.slab_unreclaimable) == (228016, 361944)
    assert (mem.pgfault, mem.pgmajfault, mem.pgrefill, mem.pgscan, mem.pgsteal) == (20718, 12, 274, 2381, 1694)
    assert (mem.pgactivate, mem.pgdeactivate) == (91, 264)
    # the kernel splits these into _anon and _file (since 5.9): reported summed
    assert (mem.workingset_refault, mem.workingset_activate) == (43, 5)
    ev = m.memory_events
    assert (ev.low, ev.high, ev.max, ev.oom, ev.oom_kill) == (0, 0, 167, 1, 1)
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in m.io.usage] == [
        (254, 0, 1798144, 4096, 57, 1), (8, 0, 0, 1048576, 0, 4)]
    # hugetlb.<size>.current and .max; the .rsvd.* files are not these
    assert sorted((h.pagesize, h.current, h.max) for h in m.hugetlb) == [
        ("1GB", 0, UINT64_MAX), ("2MB", 4194304, 8388608)]


def test_v2_a_cgroup_without_the_files_reports_zeros(tree2: Path) -> None:
    """A container whose cgroup is gone (it just exited): zeros, no error."""
    shutil.rmtree(tree2 / "default" / "web")
    m = v2.Metrics.FromString(Cgroup.parse(V2_PROC, str(tree2)).metrics()[1])
    assert m.memory.usage == 0 and not m.io.usage and not m.hugetlb


def test_v2_oom_watch_reports_an_oom_kill_increment(tree2: Path) -> None:
    events = tree2 / "default" / "web" / "memory.events"
    watch = OOMWatch(Cgroup.parse(V2_PROC, str(tree2)))
    try:
        # the kill recorded before the watch began (e.g. before a takeover) is not new
        assert not _readable(watch.fd)
        assert watch.check() == 0
        _bump_oom_kill(events, 2)
        assert _readable(watch.fd, 5)
        assert watch.check() == 1
        assert not _readable(watch.fd) and watch.check() == 0
        # the limit hit again, nobody killed: the file changes, no OOM kill is reported
        events.write_text(events.read_text().replace("max 169", "max 180"))
        assert _readable(watch.fd, 5)
        assert watch.check() == 0
        # two kills between two looks count as two
        _bump_oom_kill(events, 4)
        assert _readable(watch.fd, 5) and watch.check() == 2
    finally:
        watch.close()


def test_the_shim_publishes_an_oom_and_reports_v2_metrics(tmp_path: Path) -> None:
    """The shim's core on a v2 host: it finds the container's cgroup from its init's
    /proc/<pid>/cgroup under its cgroup root, publishes TaskOOM when oom_kill grows, and its
    Stats are that cgroup's v2 metrics."""

    async def scenario(monitor: Monitor) -> tuple[list[str], v2.Metrics]:
        pid = child("import time; time.sleep(60)")
        # lay the recorded cgroup where this process's v2 entry says it is (under the root)
        with open(f"/proc/{pid}/cgroup") as f:
            v2_path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        root = tmp_path / "cgroup"
        root.mkdir()
        shutil.copy(DATA / "cgroup2" / "cgroup.controllers", root)
        shutil.copytree(DATA / "cgroup2" / "default" / "web", root / v2_path.lstrip("/"), dirs_exist_ok=True)
        events: list[str] = []

        class Publisher:
            def publish(self, event: object) -> None:
                events.append(type(event).__name__)

        core = Core(namespace="default", monitor=monitor, publisher=Publisher(),  # type: ignore[arg-type]
                    runc_root=str(tmp_path), cgroup_root=str(root))
        init = Process("web", "", Stdio(), state=State.RUNNING, pid=pid)
        container = Container("web", str(tmp_path), None, init)  # type: ignore[arg-type]
        core.containers["web"] = container
        try:
            core._watch_oom(container)
            assert container.oom is not None, "no OOM watch"
            await asyncio.sleep(0.2)
            assert events == []
            _bump_oom_kill(root / v2_path.lstrip("/") / "memory.events", 2)
            for _ in range(100):
                if events:
                    break
                await asyncio.sleep(0.05)
            type_url, value = core.stats("web")
            assert type_url == "io.containerd.cgroups.v2.Metrics"
            return events, v2.Metrics.FromString(value)
        finally:
            core._stop_oom(container)
            os.kill(pid, signal.SIGKILL)

    events, metrics = run(scenario)
    assert events == ["TaskOOM"]
    assert metrics.memory_events.oom_kill == 2 and metrics.memory.usage_limit == 64 << 20


# -- v1 ----------------------------------------------------------------------------------------

def test_v1_paths(tree1: Path) -> None:
    cg = Cgroup.parse(V1_PROC, str(tree1))
    assert cg.version == 1
    assert cg.path("memory") == str(tree1 / "memory" / "default" / "web")
    # a co-mounted hierarchy is found by its mount's name
    assert cg.path("cpu") == cg.path("cpuacct") == str(tree1 / "cpu,cpuacct" / "default" / "web")
    assert cg.path("systemd") is None  # name=systemd is no controller


def test_v1_metrics(tree1: Path) -> None:
    type_url, value = Cgroup.parse(V1_PROC, str(tree1)).metrics()
    assert type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1.Metrics.FromString(value)
    mem = m.memory
    assert (mem.cache, mem.rss, mem.mapped_file, mem.pg_pg_in, mem.pg_pg_out, mem.pg_fault, mem.pg_maj_fault) == (
        2162688, 33251328, 1216512, 17895, 9249, 20718, 12)
    assert (mem.total_cache, mem.total_rss, mem.total_pg_fault, mem.total_inactive_anon) == (
        2162688, 33251328, 20718, 33226752)
    assert (mem.hierarchical_memory_limit, mem.hierarchical_swap_limit) == (64 << 20, 64 << 20)
    assert (mem.usage.usage, mem.usage.max, mem.usage.limit, mem.usage.failcnt) == (36261888, 64 << 20, 64 << 20, 167)
    assert (mem.swap.usage, mem.swap.limit) == (36261888, 64 << 20)
    assert (mem.kernel.usage, mem.kernel.max, mem.kernel.limit) == (847872, 1253376, 9223372036854771712)
    assert mem.kernel_tcp.limit == 9223372036854771712
    oom = m.memory_oom_control
    assert (oom.oom_kill_disable, oom.under_oom, oom.oom_kill) == (0, 0, 1)
    assert m.cpu.usage.total == 1873401562
    assert list(m.cpu.usage.per_cpu) == [1012034113, 861367449]
    assert (m.cpu.usage.user, m.cpu.usage.kernel) == (1_210_000_000, 650_000_000)  # USER_HZ ticks (100 a second)
    assert (m.cpu.throttling.periods, m.cpu.throttling.throttled_periods, m.cpu.throttling.throttled_time) == (
        40, 3, 51802411)
    assert (m.pids.current, m.pids.limit) == (2, 64)
    assert [(e.op, e.major, e.minor, e.value) for e in m.blkio.io_service_bytes_recursive] == [
        ("Read", 254, 0, 1798144), ("Write", 254, 0, 4096), ("Sync", 254, 0, 1802240), ("Async", 254, 0, 0),
        ("Discard", 254, 0, 0), ("Total", 254, 0, 1802240)]
    assert [(e.op, e.value) for e in m.blkio.io_serviced_recursive][:2] == [("Read", 57), ("Write", 1)]


# -- v1 as containerd's cgroups library fills it (hand-made trees) -----------------------------

NO_LIMIT = 9223372036854771712


def _v1_tree(tmp_path: Path) -> Cgroup:
    mem, pids, cpu = tmp_path / "memory", tmp_path / "pids", tmp_path / "cpuacct"
    for d in (mem, pids, cpu):
        d.mkdir()
    (mem / "memory.stat").write_text(
        "cache 16384\nrss 57344\ninactive_file 4096\npgfault 628\nhierarchical_memory_limit 67108864\n"
        f"hierarchical_memsw_limit {NO_LIMIT}\ntotal_cache 16384\ntotal_inactive_file 4096\ntotal_pgmajfault 2\n")
    for prefix, usage, limit in (("memory.", 311296, 67108864), ("memory.memsw.", 400000, NO_LIMIT),
                                 ("memory.kmem.", 237568, NO_LIMIT), ("memory.kmem.tcp.", 0, NO_LIMIT)):
        (mem / f"{prefix}usage_in_bytes").write_text(f"{usage}\n")
        (mem / f"{prefix}max_usage_in_bytes").write_text(f"{usage * 2}\n")
        (mem / f"{prefix}limit_in_bytes").write_text(f"{limit}\n")
        (mem / f"{prefix}failcnt").write_text("0\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (pids / "pids.current").write_text("3\n")
    (pids / "pids.max").write_text("max\n")
    (cpu / "cpuacct.usage").write_text("9238361\n")
    (cpu / "cpuacct.usage_percpu").write_text("1407562 7830799 \n")
    (cpu / "cpuacct.stat").write_text("user 1\nsystem 2\n")
    return Cgroup(1, {"memory": str(mem), "pids": str(pids), "cpuacct": str(cpu), "blkio": str(tmp_path / "none")})


def test_v1_metrics_carry_what_docker_reads(tmp_path: Path) -> None:
    type_url, value = _v1_tree(tmp_path).metrics()
    assert type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1.Metrics.FromString(value)
    # docker stats: usage minus total_inactive_file, against the limit
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.usage.max) == (311296, 67108864, 622592)
    assert (m.memory.total_inactive_file, m.memory.cache, m.memory.rss, m.memory.pg_fault) == (4096, 16384, 57344, 628)
    assert (m.memory.hierarchical_memory_limit, m.memory.hierarchical_swap_limit) == (67108864, NO_LIMIT)
    assert (m.memory.swap.usage, m.memory.swap.limit, m.memory.kernel.usage) == (400000, NO_LIMIT, 237568)
    assert m.memory.total_pg_maj_fault == 2 and m.memory_oom_control.oom_kill == 1
    # pids.max "max" is no limit: 0 in v1 metrics
    assert (m.pids.current, m.pids.limit) == (3, 0)
    assert (m.cpu.usage.total, list(m.cpu.usage.per_cpu)) == (9238361, [1407562, 7830799])
    # no blkio stats to read: the message is there, empty, as containerd sends it
    assert m.HasField("blkio") and not m.blkio.io_service_bytes_recursive


def test_a_v1_pids_limit_is_reported(tmp_path: Path) -> None:
    cgroup = _v1_tree(tmp_path)
    (tmp_path / "pids" / "pids.max").write_text("64\n")
    assert v1.Metrics.FromString(cgroup.metrics()[1]).pids.limit == 64


# -- cAdvisor's terms, for ketchd's metrics and the CRI's stats -----------------------------------


def test_usage_reads_both_kinds_of_metrics_in_cadvisors_terms(tree1: Path, tree2: Path) -> None:
    """The same container recorded on a v1 and on a v2 host: the same usage, but for what each
    kernel counts its own way (CPU time in ticks or microseconds; v1's pids.max of 64)."""
    u1 = cgroups.usage(*Cgroup.parse(V1_PROC, str(tree1)).metrics())
    u2 = cgroups.usage(*Cgroup.parse(V2_PROC, str(tree2)).metrics())
    for u in (u1, u2):
        assert (u.memory, u.rss, u.cache, u.swap, u.memory_limit) == (36261888, 33251328, 2162688, 0, 64 << 20)
        assert u.working_set == 36261888 - 1830912  # less the inactive file pages
        assert u.oom_kills == 1 and u.threads == 2
    assert (u1.cpu_ns, u1.cpu_user_ns, u1.cpu_system_ns) == (1873401562, 1_210_000_000, 650_000_000)
    assert (u2.cpu_ns, u2.cpu_user_ns, u2.cpu_system_ns) == (1873401000, 1215820000, 657581000)
    assert (u1.threads_limit, u2.threads_limit) == (64, 0)  # v2's pids.max "max": no limit
    assert (u1.memory_max, u2.memory_max) == (64 << 20, None)  # v2 records no peak
    with pytest.raises(ValueError, match="not cgroup metrics"):
        cgroups.usage("types.containerd.io/other", b"")


def test_usage_of_v1_without_a_memory_limit_and_with_swap(tmp_path: Path) -> None:
    cgroup = _v1_tree(tmp_path)
    (Path(cgroup.paths["memory"]) / "memory.limit_in_bytes").write_text(f"{NO_LIMIT}\n")
    u = cgroups.usage(*cgroup.metrics())
    assert (u.memory, u.working_set, u.swap, u.memory_limit) == (311296, 311296 - 4096, 400000 - 311296, 0)
    assert (u.threads, u.threads_limit, u.oom_kills) == (3, 0, 1)
