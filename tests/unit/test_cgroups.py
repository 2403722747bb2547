"""Cgroup metrics decoded as containerd's cgroups library does (what dockerd and ctr read)."""

from __future__ import annotations

from pathlib import Path

from ketch.api.cgroups.v1 import metrics_pb2 as v1
from ketch.cgroups import Cgroup

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
