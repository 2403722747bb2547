"""CNI as ketchd's CRI runs it: Debian's plugins (bridge, host-local, portmap, loopback) on a
real network namespace; ADD, CHECK and DEL, and nothing left after DEL (no veth, no IPAM lease,
no cached result)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.cri import cni, netns

BIN = "/usr/lib/cni"


def _conflist(tmp: Path, bridge: str) -> Path:
    conf = tmp / "net.d"
    conf.mkdir()
    (conf / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "ketch-test",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.232.0.0/24"}]], "dataDir": str(tmp / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"},
        ]}))
    return conf


def _links(ns: str | None = None) -> str:
    cmd = ["ip", "-o", "link"] if ns is None else ["ip", "-n", os.path.basename(ns), "-o", "addr"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_add_check_del_leave_nothing(tmp_path: Path) -> None:
    if not os.path.exists(f"{BIN}/bridge"):
        pytest.fail("containernetworking-plugins is not installed (scripts/setup installs it)")
    bridge = f"kt{uuid.uuid4().hex[:8]}"
    network = cni.load(str(_conflist(tmp_path, bridge)))
    runner = cni.CNI(BIN, str(tmp_path / "cache"))

    async def scenario() -> None:
        path = await netns.create()
        try:
            got = await runner.add(network, "pod1", path, capabilities={
                "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
            (ip,) = got.ips
            assert ip.startswith("10.232.0.")
            inside = _links(path)
            assert f"inet {ip}/24" in inside and "inet 127.0.0.1/8" in inside
            assert list((tmp_path / "ipam" / "ketch-test").glob("10.232.0.*"))
            await runner.delete(network, "pod1", path)
            # CHECK (portmap 1.1's CHECK fails for IPv4-only port mappings: none here)
            await runner.add(network, "pod1", path)
            await runner.check(network, "pod1", path)
            await runner.delete(network, "pod1", path)
            assert not list((tmp_path / "ipam" / "ketch-test").glob("10.232.0.*"))
            assert not list((tmp_path / "cache").iterdir())
            # DEL again (a retried removal) succeeds
            await runner.delete(network, "pod1", path)
        finally:
            await netns.remove(path)
        assert not os.path.exists(path)
        await netns.remove(path)  # gone already: nothing to do

    try:
        asyncio.run(scenario())
    finally:
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
    assert bridge not in _links()


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound, match="no network config found"):
        cni.load(str(tmp_path))
    (tmp_path / "a.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nope"}]}))
    network = cni.load(str(tmp_path))
    with pytest.raises(errdefs.NotFound, match="CNI plugin 'nope' not found"):
        asyncio.run(cni.CNI(BIN, str(tmp_path / "cache")).add(network, "c", "/nonexistent"))
    bridge = f"kt{uuid.uuid4().hex[:8]}"
    (tmp_path / "a.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [
        {"type": "bridge", "bridge": bridge, "ipam": {"type": "host-local", "ranges": [[{"subnet": "bad"}]]}}]}))
    try:
        with pytest.raises(errdefs.FailedPrecondition, match="CNI plugin bridge ADD on network n: .*CNI error"):
            asyncio.run(cni.CNI(BIN, str(tmp_path / "cache")).add(cni.load(str(tmp_path)), "c", "/nonexistent"))
    finally:
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
    assert bridge not in _links()
    with pytest.raises(errdefs.InvalidArgument, match="not a pod network namespace"):
        asyncio.run(netns.remove("/etc/passwd"))
