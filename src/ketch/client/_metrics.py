"""A task's metrics: the cgroup v1 or v2 statistics the shim sends, decoded, with the numbers a
person looks at (CPU time, memory use and limit, pids) in one shape for both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ketch import errdefs, timestamps

__all__ = ["Metrics", "decode_metrics"]

#: a cgroup limit this large means "no limit"
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Metrics:
    """``cgroup`` is 1 or 2; ``raw`` the decoded protobuf message of that version."""

    cgroup: int
    timestamp: float | None
    cpu_ns: int
    memory_bytes: int
    memory_limit: int | None
    pids: int
    raw: Any = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        from google.protobuf import json_format

        return {"cgroup": self.cgroup, "timestamp": self.timestamp, "cpu_ns": self.cpu_ns,
                "memory_bytes": self.memory_bytes, "memory_limit": self.memory_limit, "pids": self.pids,
                "raw": json_format.MessageToDict(self.raw, preserving_proto_field_name=True)}


def _limit(value: int) -> int | None:
    return value if 0 < value < UNLIMITED else None


def decode_metrics(metric: Any) -> Metrics:
    """A ``containerd.types.Metric`` (its data an Any of io.containerd.cgroups.v1/v2.Metrics)."""
    from ketch.api.cgroups.v1 import metrics_pb2 as v1
    from ketch.api.cgroups.v2 import metrics_pb2 as v2

    name = metric.data.type_url.rsplit("/", 1)[-1]
    when = timestamps.seconds(metric.timestamp) if metric.HasField("timestamp") else None
    if name == "io.containerd.cgroups.v1.Metrics":
        m1 = v1.Metrics.FromString(metric.data.value)
        return Metrics(1, when, m1.cpu.usage.total, m1.memory.usage.usage, _limit(m1.memory.usage.limit),
                       m1.pids.current, m1)
    if name == "io.containerd.cgroups.v2.Metrics":
        m2 = v2.Metrics.FromString(metric.data.value)
        return Metrics(2, when, m2.cpu.usage_usec * 1000, m2.memory.usage, _limit(m2.memory.usage_limit),
                       m2.pids.current, m2)
    raise errdefs.Unimplemented(f"metrics of type {metric.data.type_url!r}")
