"""ketch.client's pure parts: where it connects, the spec it builds, its IO pieces, metrics
decoding. (Everything that talks to a daemon is in tests/interop/test_client.py.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ketch import config, errdefs
from ketch.api.cgroups.v1 import metrics_pb2 as v1
from ketch.api.cgroups.v2 import metrics_pb2 as v2
from ketch.api.containerd.types import metrics_pb2
from ketch.client import Capture, LogURI, Stdio
from ketch.client._conn import default_address, default_namespace
from ketch.client._containers import SpecOptions, build_spec, merge_env, parse_mount
from ketch.client._io import ProcessIO
from ketch.client._metrics import decode_metrics


def test_address_comes_from_argument_then_environment_then_ketchd_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KETCH_ADDRESS", raising=False)
    monkeypatch.delenv("CONTAINERD_ADDRESS", raising=False)
    assert default_address() == config.load().grpc.address == "/run/ketch/ketchd.sock"
    monkeypatch.setenv("CONTAINERD_ADDRESS", "/c.sock")
    assert default_address() == "/c.sock"
    monkeypatch.setenv("KETCH_ADDRESS", "/k.sock")
    assert default_address() == "/k.sock"
    assert default_address("/arg.sock") == "/arg.sock"


def test_namespace_comes_from_argument_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KETCH_NAMESPACE", raising=False)
    monkeypatch.delenv("CONTAINERD_NAMESPACE", raising=False)
    assert default_namespace() == "default"
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "moby")
    assert default_namespace() == "moby"
    monkeypatch.setenv("KETCH_NAMESPACE", "k8s.io")
    assert default_namespace() == "k8s.io"
    assert default_namespace("mine") == "mine"
    with pytest.raises(errdefs.InvalidArgument):
        default_namespace("../bad")


def test_spec_from_a_rootfs_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    spec = build_spec("ns", "web", SpecOptions(
        args=["sh"], env={"A": "1"}, cwd="/srv", user="web", mounts=["/data:/mnt:ro"], memory=1 << 20, cpus=0.5,
        terminal=True, hostname="h"), rootfs=str(tmp_path))
    assert spec["root"] == {"path": str(tmp_path)}
    assert spec["linux"]["cgroupsPath"] == "/ns/web"
    p = spec["process"]
    assert p["args"] == ["sh"] and p["cwd"] == "/srv" and p["terminal"] is True
    assert p["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=1"]
    assert p["user"] == {"uid": 1000, "gid": 1001}
    assert spec["mounts"][-1] == {"destination": "/mnt", "type": "bind", "source": "/data", "options": ["rbind", "ro"]}
    assert spec["linux"]["resources"]["memory"] == {"limit": 1 << 20}
    assert spec["linux"]["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    assert spec["hostname"] == "h"
    assert build_spec("ns", "x", SpecOptions(args=["sh"], user="web:staff"), rootfs=str(tmp_path))["process"]["user"] \
        == {"uid": 1000, "gid": 50}
    with pytest.raises(errdefs.NotFound):
        build_spec("ns", "x", SpecOptions(args=["sh"], user="nobody"), rootfs=str(tmp_path))
    with pytest.raises(errdefs.InvalidArgument):
        build_spec("ns", "x", SpecOptions(), rootfs=str(tmp_path))


def test_spec_from_an_image_config() -> None:
    image = {"Env": ["PATH=/bin", "X=1"], "Entrypoint": ["/init"], "Cmd": ["serve"], "WorkingDir": "/app",
             "User": "10:20"}
    spec = build_spec("ns", "c", SpecOptions(env=["X=2"]), image_config=image)
    assert spec["process"]["args"] == ["/init", "serve"]
    assert spec["process"]["env"] == ["PATH=/bin", "X=2"]
    assert spec["process"]["cwd"] == "/app" and spec["process"]["user"] == {"uid": 10, "gid": 20}
    assert spec["root"] == {"path": "rootfs"}
    # args replace the image's Cmd and keep its Entrypoint
    assert build_spec("ns", "c", SpecOptions(args=["debug"]), image_config=image)["process"]["args"] == ["/init", "debug"]


def test_bad_options_are_invalid_arguments() -> None:
    for bad in ("relative:/x", "/a", "/a:/b:rx"):
        with pytest.raises(errdefs.InvalidArgument):
            parse_mount(bad)
    with pytest.raises(errdefs.InvalidArgument):
        build_spec("ns", "c", SpecOptions(args=["x"], env=["NOEQUALS"]), rootfs="/")
    with pytest.raises(errdefs.InvalidArgument):
        build_spec("ns", "c", SpecOptions(args=["x"], memory=-1), rootfs="/")
    assert merge_env(["A=1", "B=2"], ["A=3"]) == ["A=3", "B=2"]
    for uri in ("file:///var/log/x", "binary:///usr/bin/logger?a=b"):
        assert LogURI(uri).uri == uri
    for uri in ("file://relative", "syslog:///x", "/plain"):
        with pytest.raises(errdefs.InvalidArgument):
            LogURI(uri)


def test_capture_keeps_at_most_its_limit() -> None:
    c = Capture(5)
    c.feed(b"abc")
    c.feed(b"defg")
    c.feed(b"h")
    assert bytes(c) == b"abcde" and c.truncated
    assert not Capture().truncated


def test_output_fifo_delivers_what_was_written_before_a_writer_reopened(tmp_path: Path) -> None:
    """The client's held write end: a process that wrote and closed before the reader ran
    loses nothing, and EOF comes once the held end is dropped at start."""

    async def main() -> None:
        out = Capture()
        io = ProcessIO.create(Stdio(stdout=out), str(tmp_path), "p")
        assert io.stdout and io.stderr  # both outputs, as containerd's runc shim wants
        fd = os.open(io.stdout, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"early\n")
        os.close(fd)
        io.copy()
        assert not await io.wait(0.2)  # no EOF while the client holds a write end

        async def noop() -> None:
            pass

        io.started(noop)
        assert await io.wait(5)
        assert bytes(out) == b"early\n"
        await io.remove()
        assert os.listdir(tmp_path) == []

    asyncio.run(main())


def test_metrics_of_both_cgroup_versions_decode_to_one_shape() -> None:
    m1 = v1.Metrics()
    m1.cpu.usage.total = 5000
    m1.memory.usage.usage, m1.memory.usage.limit = 100, 1 << 63
    m1.pids.current = 3
    m2 = v2.Metrics()
    m2.cpu.usage_usec = 5
    m2.memory.usage, m2.memory.usage_limit = 100, 4096
    m2.pids.current = 3
    for version, raw, limit in ((1, m1, None), (2, m2, 4096)):
        metric = metrics_pb2.Metric(id="c")
        metric.data.type_url = raw.DESCRIPTOR.full_name
        metric.data.value = raw.SerializeToString()
        d = decode_metrics(metric)
        assert (d.cgroup, d.cpu_ns, d.memory_bytes, d.memory_limit, d.pids) == (version, 5000, 100, limit, 3)
    metric = metrics_pb2.Metric(id="c")
    metric.data.type_url = "something.Else"
    with pytest.raises(errdefs.Unimplemented):
        decode_metrics(metric)


def test_importing_ketch_stays_light() -> None:
    """``from ketch import Client`` loads the client lazily: the shim imports ``ketch``."""
    import subprocess
    import sys

    code = "import sys, ketch; print('grpc' in sys.modules, 'ketch.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


def test_a_checkpoint_index_is_told_apart_and_its_blobs_are_never_chosen_as_a_manifest() -> None:
    from ketch import errdefs
    from ketch.client._checkpoint import CONFIG, CRIU_TAR, is_checkpoint
    from ketch.distribution.manifests import OCI_MANIFEST, host_platform, select_manifest

    here = {"os": "linux", "architecture": host_platform()[1]}
    blobs = [{"mediaType": t, "digest": f"sha256:{i}", "size": 1, "platform": here} for i, t in enumerate((CRIU_TAR, CONFIG))]
    checkpoint = {"manifests": [*blobs, {"mediaType": OCI_MANIFEST, "digest": "sha256:m", "size": 1}]}
    assert is_checkpoint(checkpoint)
    with pytest.raises(errdefs.NotFound):
        select_manifest(checkpoint, "ck")  # the image's manifest names no platform
    image = {"manifests": [*blobs[:1], {"mediaType": OCI_MANIFEST, "digest": "sha256:m", "size": 1, "platform": here}]}
    assert not is_checkpoint(image)
    assert select_manifest(image, "img")["digest"] == "sha256:m"
