"""The generated protobuf modules under ketch.api and ketch.ttrpc: fresh, and wire-compatible with containerd 1.6."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ketch.api.cgroups.v1 import metrics_pb2 as cg1
from ketch.api.cgroups.v2 import metrics_pb2 as cg2
from ketch.api.containerd.events import container_pb2, content_pb2, image_pb2
from ketch.api.containerd.events import namespace_pb2, snapshot_pb2
from ketch.api.containerd.events import task_pb2 as ev_task
from ketch.api.containerd.linux.runctypes import runc_pb2
from ketch.api.containerd.runc.options import oci_pb2
from ketch.api.containerd.services.containers.v1 import containers_pb2
from ketch.api.containerd.services.content.v1 import content_pb2 as content_svc
from ketch.api.containerd.services.diff.v1 import diff_pb2
from ketch.api.containerd.services.events.v1 import events_pb2 as events_svc
from ketch.api.containerd.services.images.v1 import images_pb2
from ketch.api.containerd.services.introspection.v1 import introspection_pb2
from ketch.api.containerd.services.leases.v1 import leases_pb2
from ketch.api.containerd.services.namespaces.v1 import namespace_pb2 as namespaces_svc
from ketch.api.containerd.services.snapshots.v1 import snapshots_pb2
from ketch.api.containerd.services.tasks.v1 import tasks_pb2
from ketch.api.containerd.services.ttrpc.events.v1 import events_pb2
from ketch.api.containerd.services.version.v1 import version_pb2
from ketch.api.containerd.task.v2 import shim_pb2
from ketch.api.containerd.types import descriptor_pb2, metrics_pb2, mount_pb2, platform_pb2
from ketch.api.containerd.types.task import task_pb2 as types_task
from ketch.api.google.rpc import status_pb2
from ketch.api.grpc.health.v1 import health_pb2
from ketch.ttrpc import ttrpc_pb2

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
API = SRC / "ketch" / "api"
GEN = ROOT / "scripts" / "gen-protos"


GENERATED_UNDER = ("api", "ttrpc")  # ketch/ttrpc holds the protocol's own envelope messages


def _generated(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for under in GENERATED_UNDER
        for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
        for p in (base / "ketch" / under).rglob(pattern)
    }


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(GEN), str(tmp_path)], check=True, env=env, capture_output=True)
    fresh = _generated(tmp_path)
    committed = _generated(SRC)
    assert fresh, "scripts/gen-protos produced nothing"
    missing = sorted(fresh - committed)
    extra = sorted(committed - fresh)
    differing = sorted(
        name for name in fresh & committed if (tmp_path / name).read_bytes() != (SRC / name).read_bytes()
    )
    problems = []
    if missing:
        problems.append(f"missing from src/: {missing}")
    if extra:
        problems.append(f"no .proto generates these (stale): {extra}")
    if differing:
        problems.append(f"out of date: {differing}")
    assert not problems, "generated protobuf code is stale; run scripts/gen-protos. " + "; ".join(problems)


def test_every_generated_module_imports() -> None:
    modules = sorted(
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for under in GENERATED_UNDER
        for pattern in ("*_pb2.py", "*_pb2_grpc.py")
        for p in (SRC / "ketch" / under).rglob(pattern)
    )
    assert len(modules) >= 43
    for name in modules:
        importlib.import_module(name)


GRPC_SERVICE_PROTOS = {
    "ketch/api/containerd/services/containers/v1/containers.proto",
    "ketch/api/containerd/services/content/v1/content.proto",
    "ketch/api/containerd/services/diff/v1/diff.proto",
    "ketch/api/containerd/services/events/v1/events.proto",
    "ketch/api/containerd/services/images/v1/images.proto",
    "ketch/api/containerd/services/introspection/v1/introspection.proto",
    "ketch/api/containerd/services/leases/v1/leases.proto",
    "ketch/api/containerd/services/namespaces/v1/namespace.proto",
    "ketch/api/containerd/services/snapshots/v1/snapshots.proto",
    "ketch/api/containerd/services/tasks/v1/tasks.proto",
    "ketch/api/containerd/services/version/v1/version.proto",
    "ketch/api/grpc/health/v1/health.proto",
    "ketch/api/k8s/cri/runtime/v1/api.proto",
}


def test_grpc_stubs_only_for_daemon_services() -> None:
    # The ttrpc-only protos (shim API, ttrpc events) must get no gRPC stubs: the shim never imports grpc.
    stubs = {str(p.relative_to(SRC)).replace("_pb2_grpc.py", ".proto") for p in API.rglob("*_pb2_grpc.py")}
    assert stubs == GRPC_SERVICE_PROTOS


def test_ttrpc_protos_do_not_import_grpc() -> None:
    code = (
        "import sys\n"
        "import ketch.api.containerd.task.v2.shim_pb2\n"
        "import ketch.api.containerd.services.ttrpc.events.v1.events_pb2\n"
        "assert 'grpc' not in sys.modules, 'grpc was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    ("descriptor", "full_name"),
    [
        (ev_task.TaskExit.DESCRIPTOR, "containerd.events.TaskExit"),
        (ev_task.TaskCreate.DESCRIPTOR, "containerd.events.TaskCreate"),
        (ev_task.TaskIO.DESCRIPTOR, "containerd.events.TaskIO"),
        (ev_task.TaskOOM.DESCRIPTOR, "containerd.events.TaskOOM"),
        (container_pb2.ContainerCreate.Runtime.DESCRIPTOR, "containerd.events.ContainerCreate.Runtime"),
        (content_pb2.ContentDelete.DESCRIPTOR, "containerd.events.ContentDelete"),
        (namespace_pb2.NamespaceDelete.DESCRIPTOR, "containerd.events.NamespaceDelete"),
        (snapshot_pb2.SnapshotPrepare.DESCRIPTOR, "containerd.events.SnapshotPrepare"),
        (image_pb2.ImageCreate.DESCRIPTOR, "containerd.services.images.v1.ImageCreate"),
        (shim_pb2.CreateTaskRequest.DESCRIPTOR, "containerd.task.v2.CreateTaskRequest"),
        (shim_pb2.DESCRIPTOR.services_by_name["Task"], "containerd.task.v2.Task"),
        (events_pb2.Envelope.DESCRIPTOR, "containerd.services.events.ttrpc.v1.Envelope"),
        (events_pb2.DESCRIPTOR.services_by_name["Events"], "containerd.services.events.ttrpc.v1.Events"),
        (oci_pb2.Options.DESCRIPTOR, "containerd.runc.v1.Options"),
        (oci_pb2.ProcessDetails.DESCRIPTOR, "containerd.runc.v1.ProcessDetails"),
        (runc_pb2.CreateOptions.DESCRIPTOR, "containerd.linux.runc.CreateOptions"),
        (runc_pb2.RuncOptions.DESCRIPTOR, "containerd.linux.runc.RuncOptions"),
        (cg1.Metrics.DESCRIPTOR, "io.containerd.cgroups.v1.Metrics"),
        (cg2.Metrics.DESCRIPTOR, "io.containerd.cgroups.v2.Metrics"),
        (types_task.DESCRIPTOR.enum_types_by_name["Status"], "containerd.v1.types.Status"),
        (types_task.ProcessInfo.DESCRIPTOR, "containerd.v1.types.ProcessInfo"),
        (mount_pb2.Mount.DESCRIPTOR, "containerd.types.Mount"),
        (metrics_pb2.Metric.DESCRIPTOR, "containerd.types.Metric"),
        (descriptor_pb2.Descriptor.DESCRIPTOR, "containerd.types.Descriptor"),
        (platform_pb2.Platform.DESCRIPTOR, "containerd.types.Platform"),
        (version_pb2.DESCRIPTOR.services_by_name["Version"], "containerd.services.version.v1.Version"),
        (version_pb2.VersionResponse.DESCRIPTOR, "containerd.services.version.v1.VersionResponse"),
        (namespaces_svc.DESCRIPTOR.services_by_name["Namespaces"], "containerd.services.namespaces.v1.Namespaces"),
        (namespaces_svc.Namespace.DESCRIPTOR, "containerd.services.namespaces.v1.Namespace"),
        (containers_pb2.DESCRIPTOR.services_by_name["Containers"], "containerd.services.containers.v1.Containers"),
        (containers_pb2.Container.DESCRIPTOR, "containerd.services.containers.v1.Container"),
        (containers_pb2.Container.Runtime.DESCRIPTOR, "containerd.services.containers.v1.Container.Runtime"),
        (containers_pb2.ListContainerMessage.DESCRIPTOR, "containerd.services.containers.v1.ListContainerMessage"),
        (tasks_pb2.DESCRIPTOR.services_by_name["Tasks"], "containerd.services.tasks.v1.Tasks"),
        (tasks_pb2.CreateTaskRequest.DESCRIPTOR, "containerd.services.tasks.v1.CreateTaskRequest"),
        (tasks_pb2.WaitResponse.DESCRIPTOR, "containerd.services.tasks.v1.WaitResponse"),
        (tasks_pb2.MetricsResponse.DESCRIPTOR, "containerd.services.tasks.v1.MetricsResponse"),
        (events_svc.DESCRIPTOR.services_by_name["Events"], "containerd.services.events.v1.Events"),
        (events_svc.Envelope.DESCRIPTOR, "containerd.services.events.v1.Envelope"),
        (events_svc.SubscribeRequest.DESCRIPTOR, "containerd.services.events.v1.SubscribeRequest"),
        (
            introspection_pb2.DESCRIPTOR.services_by_name["Introspection"],
            "containerd.services.introspection.v1.Introspection",
        ),
        (introspection_pb2.Plugin.DESCRIPTOR, "containerd.services.introspection.v1.Plugin"),
        (introspection_pb2.ServerResponse.DESCRIPTOR, "containerd.services.introspection.v1.ServerResponse"),
        (leases_pb2.DESCRIPTOR.services_by_name["Leases"], "containerd.services.leases.v1.Leases"),
        (leases_pb2.Lease.DESCRIPTOR, "containerd.services.leases.v1.Lease"),
        (content_svc.DESCRIPTOR.services_by_name["Content"], "containerd.services.content.v1.Content"),
        (content_svc.DESCRIPTOR.enum_types_by_name["WriteAction"], "containerd.services.content.v1.WriteAction"),
        (images_pb2.DESCRIPTOR.services_by_name["Images"], "containerd.services.images.v1.Images"),
        (images_pb2.Image.DESCRIPTOR, "containerd.services.images.v1.Image"),
        (snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"], "containerd.services.snapshots.v1.Snapshots"),
        (snapshots_pb2.DESCRIPTOR.enum_types_by_name["Kind"], "containerd.services.snapshots.v1.Kind"),
        (diff_pb2.DESCRIPTOR.services_by_name["Diff"], "containerd.services.diff.v1.Diff"),
        (diff_pb2.DiffResponse.DESCRIPTOR, "containerd.services.diff.v1.DiffResponse"),
        (health_pb2.DESCRIPTOR.services_by_name["Health"], "grpc.health.v1.Health"),
        (health_pb2.HealthCheckResponse.DESCRIPTOR, "grpc.health.v1.HealthCheckResponse"),
        (ttrpc_pb2.Request.DESCRIPTOR, "ttrpc.Request"),
        (ttrpc_pb2.Response.DESCRIPTOR, "ttrpc.Response"),
        (ttrpc_pb2.KeyValue.DESCRIPTOR, "ttrpc.KeyValue"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_full_names(descriptor, full_name: str) -> None:
    assert descriptor.full_name == full_name


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (shim_pb2.StateResponse, "status", 4),
        (shim_pb2.StateResponse, "exit_status", 9),
        (shim_pb2.StateResponse, "exited_at", 10),
        (shim_pb2.StateResponse, "exec_id", 11),
        (shim_pb2.CreateTaskRequest, "rootfs", 3),
        (shim_pb2.CreateTaskRequest, "options", 10),
        (shim_pb2.DeleteResponse, "exited_at", 3),
        (shim_pb2.ConnectResponse, "task_pid", 2),
        (shim_pb2.ExecProcessRequest, "spec", 7),
        (ev_task.TaskExit, "exit_status", 4),
        (ev_task.TaskExit, "exited_at", 5),
        (ev_task.TaskDelete, "id", 5),
        (ev_task.TaskCreate, "io", 4),
        (events_pb2.Envelope, "event", 4),
        (oci_pb2.Options, "binary_name", 6),
        (oci_pb2.Options, "root", 7),
        (oci_pb2.Options, "systemd_cgroup", 9),
        (runc_pb2.CreateOptions, "shim_cgroup", 9),
        (runc_pb2.CreateOptions, "criu_image_path", 13),
        (runc_pb2.CheckpointOptions, "work_path", 8),
        (oci_pb2.CheckpointOptions, "work_path", 9),
        (cg1.Metrics, "memory", 4),
        (cg1.Metrics, "memory_oom_control", 9),
        (cg1.MemoryStat, "total_inactive_file", 30),
        (cg1.MemoryStat, "usage", 33),
        (cg1.MemoryEntry, "failcnt", 4),
        (cg2.Metrics, "memory", 4),
        (cg2.Metrics, "memory_events", 8),
        (cg2.MemoryStat, "usage", 32),
        (descriptor_pb2.Descriptor, "annotations", 5),
        (tasks_pb2.CreateTaskRequest, "container_id", 1),
        (tasks_pb2.CreateTaskRequest, "rootfs", 3),
        (tasks_pb2.CreateTaskRequest, "stdin", 4),
        (tasks_pb2.CreateTaskRequest, "stdout", 5),
        (tasks_pb2.CreateTaskRequest, "stderr", 6),
        (tasks_pb2.CreateTaskRequest, "terminal", 7),
        (tasks_pb2.CreateTaskRequest, "checkpoint", 8),
        (tasks_pb2.CreateTaskRequest, "options", 9),
        (tasks_pb2.CreateTaskRequest, "runtime_path", 10),
        (tasks_pb2.DeleteResponse, "exited_at", 4),
        (tasks_pb2.ExecProcessRequest, "spec", 6),
        (tasks_pb2.ExecProcessRequest, "exec_id", 7),
        (tasks_pb2.WaitResponse, "exited_at", 2),
        (containers_pb2.Container, "image", 3),
        (containers_pb2.Container, "runtime", 4),
        (containers_pb2.Container, "spec", 5),
        (containers_pb2.Container, "snapshot_key", 7),
        (containers_pb2.Container, "created_at", 8),
        (containers_pb2.Container, "updated_at", 9),
        (containers_pb2.Container, "extensions", 10),
        (containers_pb2.UpdateContainerRequest, "update_mask", 2),
        (events_svc.SubscribeRequest, "filters", 1),
        (events_svc.PublishRequest, "event", 2),
        (events_svc.Envelope, "event", 4),
        (introspection_pb2.Plugin, "init_err", 7),
        (introspection_pb2.ServerResponse, "uuid", 1),
        (leases_pb2.CreateRequest, "labels", 3),
        (images_pb2.Image, "created_at", 7),
        (content_svc.WriteContentRequest, "labels", 7),
        (snapshots_pb2.UpdateSnapshotRequest, "update_mask", 3),
        (diff_pb2.DiffResponse, "diff", 3),
        (health_pb2.HealthCheckResponse, "status", 1),
    ],
    ids=lambda v: v if isinstance(v, (str, int)) else v.DESCRIPTOR.name,
)
def test_field_numbers(message, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_ttrpc_status_is_wire_identical_to_google_rpc_status() -> None:
    # Go's ttrpc v1.1 (containerd 1.6) puts a google.rpc.Status in its Response; ours is ttrpc.Status.
    google = status_pb2.Status(code=5, message="not found")
    google.details.add(type_url="type.googleapis.com/x", value=b"\x01")
    ours = ttrpc_pb2.Status.FromString(google.SerializeToString())
    assert (ours.code, ours.message, ours.details[0].value) == (5, "not found", b"\x01")
    assert ours.SerializeToString() == google.SerializeToString()
    response = ttrpc_pb2.Response(payload=b"p")
    response.status.SetInParent()
    assert response.SerializeToString() == b"\x0a\x00\x12\x01p"  # an empty status, always present


def test_status_enum_values() -> None:
    status = types_task.DESCRIPTOR.enum_types_by_name["Status"]
    assert [(v.name, v.number) for v in status.values] == [
        ("UNKNOWN", 0), ("CREATED", 1), ("RUNNING", 2), ("STOPPED", 3), ("PAUSED", 4), ("PAUSING", 5),
    ]


def test_task_service_methods() -> None:
    service = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert [m.name for m in service.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
        "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
    ]
    assert service.methods_by_name["Delete"].output_type.full_name == "containerd.task.v2.DeleteResponse"
    assert service.methods_by_name["Kill"].output_type.full_name == "google.protobuf.Empty"
    forward = events_pb2.DESCRIPTOR.services_by_name["Events"].methods_by_name["Forward"]
    assert forward.input_type.full_name == "containerd.services.events.ttrpc.v1.ForwardRequest"


def test_grpc_service_methods() -> None:
    def shape(service):
        return [(m.name, m.client_streaming, m.server_streaming) for m in service.methods]

    tasks = tasks_pb2.DESCRIPTOR.services_by_name["Tasks"]
    assert [m.name for m in tasks.methods] == [
        "Create", "Start", "Delete", "DeleteProcess", "Get", "List", "Kill", "Exec", "ResizePty",
        "CloseIO", "Pause", "Resume", "ListPids", "Checkpoint", "Update", "Metrics", "Wait",
    ]
    assert tasks.methods_by_name["Delete"].output_type.full_name == "containerd.services.tasks.v1.DeleteResponse"
    assert tasks.methods_by_name["Kill"].output_type.full_name == "google.protobuf.Empty"
    assert shape(containers_pb2.DESCRIPTOR.services_by_name["Containers"]) == [
        ("Get", False, False), ("List", False, False), ("ListStream", False, True),
        ("Create", False, False), ("Update", False, False), ("Delete", False, False),
    ]
    assert shape(events_svc.DESCRIPTOR.services_by_name["Events"]) == [
        ("Publish", False, False), ("Forward", False, False), ("Subscribe", False, True),
    ]
    subscribe = events_svc.DESCRIPTOR.services_by_name["Events"].methods_by_name["Subscribe"]
    assert subscribe.output_type.full_name == "containerd.services.events.v1.Envelope"
    assert shape(introspection_pb2.DESCRIPTOR.services_by_name["Introspection"]) == [
        ("Plugins", False, False), ("Server", False, False),
    ]
    assert shape(version_pb2.DESCRIPTOR.services_by_name["Version"]) == [("Version", False, False)]
    assert shape(health_pb2.DESCRIPTOR.services_by_name["Health"]) == [("Check", False, False), ("Watch", False, True)]
    assert content_svc.DESCRIPTOR.services_by_name["Content"].methods_by_name["Write"].client_streaming
    init_err = introspection_pb2.Plugin.DESCRIPTOR.fields_by_name["init_err"]
    assert init_err.message_type.full_name == "google.rpc.Status"


def test_health_serving_status_values() -> None:
    status = health_pb2.HealthCheckResponse.DESCRIPTOR.enum_types_by_name["ServingStatus"]
    assert [(v.name, v.number) for v in status.values] == [
        ("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3),
    ]


def test_decode_runc_shim_delete_output() -> None:
    # Start of what containerd-shim-runc-v2 printed on stdout for its "delete" action.
    response = shim_pb2.DeleteResponse.FromString(b"\x08\xed\x7e\x10\x89\x01")
    assert response.pid == 16237
    assert response.exit_status == 137
    assert not response.HasField("exited_at")
    # and back
    assert shim_pb2.DeleteResponse(pid=16237, exit_status=137).SerializeToString() == b"\x08\xed\x7e\x10\x89\x01"


def test_json_names_follow_proto_names() -> None:
    assert cg1.MemoryStat.DESCRIPTOR.fields_by_name["total_inactive_file"].json_name == "totalInactiveFile"
    assert cg1.CPUUsage.DESCRIPTOR.fields_by_name["per_cpu"].json_name == "perCpu"
    assert ev_task.TaskExit.DESCRIPTOR.fields_by_name["container_id"].json_name == "containerId"
