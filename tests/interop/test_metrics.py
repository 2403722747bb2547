"""ketchd's Prometheus metrics (``[metrics] address``), scraped from a real ketchd while ctr runs
containers on our shim and on containerd's runc shim, parsed by prometheus_client's parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ketch.shim.keeper import parent_pid
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME
from tests.interop.conftest import running
from tests.interop.test_ctr_shim import PATH, _wait_status

TASKS = "containerd.services.tasks.v1.Tasks"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint, by (name, labels)."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def calls(samples: Any, method: str, code: str = "OK") -> float:
    return value(samples, "ketchd_grpc_server_handled_total", grpc_service=TASKS, grpc_method=method, grpc_code=code)


@pytest.mark.parametrize("runtime", [KETCH_RUNTIME, RUNC_RUNTIME], ids=["ketchshim", "runcshim"])
def test_the_metrics_move_as_containers_run_and_exit(rootfs: Path, runtime: str) -> None:
    port = _free_port()
    with running("ketchd", runtime, rootfs, config=f'[metrics]\naddress = "127.0.0.1:{port}"\n') as env:
        url = f"http://127.0.0.1:{port}"
        before = scrape(url + "/v1/metrics")
        ns = env.ns()
        run = ("run", "--runtime", runtime, *PATH, *env.fifo)
        env.ctr(ns, *run, "--rm", "--rootfs", env.rootfs, "quick", "true")  # runs, exits, is removed
        env.ctr(ns, *run, "-d", "--rootfs", env.rootfs, "short", "true")  # exits, stays STOPPED
        env.ctr(ns, *run, "-d", "--rootfs", env.rootfs, "long", "sleep", "300")
        _wait_status(env, ns, "short", "STOPPED")
        _wait_status(env, ns, "long", "RUNNING")
        after = scrape(url + "/metrics")  # the same metrics at both paths

        # gRPC calls, by method and code, and timed
        assert calls(after, "Create") - calls(before, "Create") == 3
        assert calls(after, "Start") - calls(before, "Start") == 3
        assert calls(after, "Delete") - calls(before, "Delete") >= 1
        assert calls(after, "Get", "NotFound") >= 1  # ctr run asks whether the task exists first
        assert value(after, "ketchd_grpc_server_handling_seconds_count", grpc_service=TASKS, grpc_method="Create") \
            - value(before, "ketchd_grpc_server_handling_seconds_count", grpc_service=TASKS, grpc_method="Create") == 3
        # tasks by state, as the shims say
        assert value(after, "ketchd_tasks", namespace=ns, state="running") == 1
        assert value(after, "ketchd_tasks", namespace=ns, state="stopped") == 1
        assert value(after, "ketchd_tasks", namespace=ns, state="created") == 0
        assert value(after, "ketchd_shims") >= 1
        if runtime == KETCH_RUNTIME:
            assert value(after, "ketchd_shim_groups") == 1  # one shim serves the namespace's tasks
        # events
        for topic, n in (("/tasks/create", 3), ("/tasks/start", 3), ("/tasks/exit", 2)):
            published = value(after, "ketchd_events_published_total", topic=topic)
            assert published - value(before, "ketchd_events_published_total", topic=topic) == n, topic
        # the running container's cgroup, in cAdvisor's names; nothing for the stopped one
        long = {"namespace": ns, "id": "long"}
        assert value(after, "container_memory_usage_bytes", **long) > 0
        assert 0 < value(after, "container_memory_working_set_bytes", **long) <= \
            value(after, "container_memory_usage_bytes", **long)
        assert value(after, "container_cpu_usage_seconds_total", **long) > 0
        assert value(after, "container_threads", **long) >= 1
        assert ("container_oom_events_total", frozenset(long.items())) in after
        assert not [k for k in after if dict(k[1]).get("id") == "short"]
        # ketchd itself
        assert value(after, "process_resident_memory_bytes") > 0

        env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "long")
        _wait_status(env, ns, "long", "STOPPED")
        final = scrape(url + "/v1/metrics")
        assert value(final, "ketchd_tasks", namespace=ns, state="running") == 0
        assert value(final, "ketchd_tasks", namespace=ns, state="stopped") == 2
        assert value(final, "ketchd_events_published_total", topic="/tasks/exit") - \
            value(after, "ketchd_events_published_total", topic="/tasks/exit") == 1
        assert not [k for k in final if dict(k[1]).get("id") == "long"]
        for cid in ("short", "long"):
            env.ctr(ns, "tasks", "rm", cid)
            env.ctr(ns, "containers", "rm", cid)
        assert not [k for k in scrape(url + "/v1/metrics") if k[0] == "ketchd_tasks" and dict(k[1])["namespace"] == ns]


def _until(url: str, ready: Callable[[Any], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_oom_kills_and_a_shim_takeover_are_counted(rootfs: Path) -> None:
    """A process of a running container is OOM-killed (the container goes on); then its group's
    serving shim is killed and its keeper's successor takes the group over."""
    port = _free_port()
    with running("ketchd", KETCH_RUNTIME, rootfs, config=f'[metrics]\naddress = "127.0.0.1:{port}"\n') as env:
        url = f"http://127.0.0.1:{port}/v1/metrics"
        ns = env.ns()
        hog = {"namespace": ns, "id": "hog"}
        env.ctr(ns, "run", "-d", *env.fifo, "--runtime", KETCH_RUNTIME, *PATH, "--memory-limit", str(16 << 20),
                "--rootfs", env.rootfs, "hog", "sh", "-c", "tail /dev/zero; sleep 300")
        samples = _until(url, lambda s: value(s, "container_oom_events_total", **hog) >= 1)
        assert value(samples, "container_oom_events_total", **hog) >= 1
        assert value(samples, "container_spec_memory_limit_bytes", **hog) == 16 << 20
        assert value(samples, "ketchd_tasks", namespace=ns, state="running") == 1  # its sh goes on
        assert (value(samples, "ketchd_shims_lost_total"), value(samples, "ketchd_shim_takeovers_total")) == (0, 0)

        init = int(env.ctr(ns, "tasks", "ls").stdout.splitlines()[1].split()[1])
        os.kill(parent_pid(init), signal.SIGKILL)  # the serving shim: its keeper starts a successor
        samples = _until(url, lambda s: value(s, "ketchd_shim_takeovers_total") >= 1)
        assert (value(samples, "ketchd_shims_lost_total"), value(samples, "ketchd_shim_takeovers_total"),
                value(samples, "ketchd_tasks_buried_total")) == (1, 1, 0)
        assert value(samples, "ketchd_tasks", namespace=ns, state="running") == 1
        assert value(samples, "container_memory_usage_bytes", **hog) > 0, "the successor answers Stats"
        env.ctr(ns, "tasks", "kill", "-s", "SIGKILL", "hog")
        _wait_status(env, ns, "hog", "STOPPED")


def test_content_and_garbage_collection_are_counted(rootfs: Path) -> None:
    import hashlib

    port = _free_port()
    with running("ketchd", KETCH_RUNTIME, rootfs, config=f'[metrics]\naddress = "127.0.0.1:{port}"\n') as env:
        url = f"http://127.0.0.1:{port}/v1/metrics"
        # once, just after ketchd serves
        before = _until(url, lambda s: value(s, "ketchd_gc_duration_seconds_count", kind="reclaim") >= 1)
        assert value(before, "ketchd_gc_duration_seconds_count", kind="reclaim") == 1
        ns = env.ns()
        data = os.urandom(1500).hex().encode()  # ctr() passes text
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        env.ctr(ns, "content", "ingest", "blob1", input=data)
        after = scrape(url)
        assert value(after, "ketchd_content_stored_bytes", namespace=ns) == 3000
        assert value(after, "ketchd_content_blobs", namespace=ns) == 1
        assert value(after, "ketchd_content_ingested_bytes_total") - \
            value(before, "ketchd_content_ingested_bytes_total") == 3000
        collected = value(after, "ketchd_gc_duration_seconds_count", kind="collect")
        env.ctr(ns, "content", "rm", digest)
        final = _until(url, lambda s: value(s, "ketchd_gc_removed_total", resource="blobs") >= 1)
        assert value(final, "ketchd_gc_duration_seconds_count", kind="collect") > collected
        assert value(final, "ketchd_gc_removed_total", resource="blobs") == 1
        assert value(final, "ketchd_content_blobs", namespace=ns) == 0


def test_a_metrics_address_without_a_port_stops_ketchd_at_start(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text('[metrics]\naddress = "127.0.0.1"\n')
    r = subprocess.run([f"{support.VENV_BIN}/ketchd", "--config", str(config), "--root", str(tmp_path / "root"),
                        "--state", str(tmp_path / "state"), "--address", str(tmp_path / "k.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "metrics.address '127.0.0.1' must be host:port" in r.stderr, r.stderr
    assert not (tmp_path / "k.sock").exists()


def test_a_metrics_port_in_use_stops_ketchd_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "k.toml"
        config.write_text(f'[metrics]\naddress = "127.0.0.1:{port}"\n[runtime]\nshim_template = false\n')
        r = subprocess.run([f"{support.VENV_BIN}/ketchd", "--config", str(config), "--root", str(tmp_path / "root"),
                            "--state", str(tmp_path / "state"), "--address", str(tmp_path / "k.sock")],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"metrics.address '127.0.0.1:{port}': cannot listen: Address already in use" in r.stderr, r.stderr
    assert not (tmp_path / "k.sock").exists(), "it never served"
