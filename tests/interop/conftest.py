"""Interop fixtures: a private daemon (Debian's containerd or ketchd, see ketch.testing.daemons)
per test, and the runtime under test."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ketch.testing import images, leftovers
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME, Containerd, Daemon, Ketchd

pytestmark = pytest.mark.interop



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = support.need_root() or (None if shutil.which("containerd") and shutil.which("ctr") else "needs containerd and ctr")
    if reason:
        for item in items:
            if "interop" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return support.make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


class Env:
    """One daemon, the runtime under test, and the namespaces a test used; ``ns()`` makes a
    fresh namespace."""

    def __init__(self, cd: Daemon, runtime: str, rootfs: Path) -> None:
        self.cd = cd
        self.runtime = runtime
        self.rootfs = str(rootfs)
        self.namespaces: list[str] = []
        #: ctr's flag for where it makes the stdio FIFOs (by default under /run/containerd)
        self.fifo = ("--fifo-dir", str(cd.base / "fifo"))

    def ns(self) -> str:
        name = support.unique("kt")
        self.namespaces.append(name)
        return name

    def ctr(self, ns: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.cd.ctr(ns, *args, **kw)  # type: ignore[arg-type]


DAEMONS: dict[str, type[Daemon]] = {"containerd": Containerd, "ketchd": Ketchd}
COMBINATIONS = [
    pytest.param(("containerd", KETCH_RUNTIME), id="containerd-ketchshim"),
    pytest.param(("ketchd", KETCH_RUNTIME), id="ketchd-ketchshim"),
    pytest.param(("ketchd", RUNC_RUNTIME), id="ketchd-runcshim"),
]
#: for a test of the ketch shim itself: ``@pytest.mark.parametrize("env", KETCH_SHIM, indirect=True)``
KETCH_SHIM = [p for p in COMBINATIONS if p.values[0][1] == KETCH_RUNTIME]


@contextlib.contextmanager
def running(daemon: str, runtime: str, rootfs: Path) -> Iterator[Env]:
    # short base path: the shim's socket lives under it and unix socket paths are short
    base = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    base.chmod(0o711)  # as /run/ketch: traversable by a user-namespaced container's root
    cd = DAEMONS[daemon](base)
    e = Env(cd, runtime, rootfs)
    try:
        cd.start()
        yield e
    finally:
        for ns in e.namespaces:
            try:
                cd.clean_namespace(ns)
            except Exception:
                pass
        cd.kill(signal.SIGTERM)
        cd.end_template()
        left = leftovers.check(cd.scope(e.namespaces))
        if not left:
            shutil.rmtree(base, ignore_errors=True)
        assert not left, "test left behind:\n  " + "\n  ".join(left) + f"\n(logs in {base})"


@pytest.fixture(params=COMBINATIONS)
def env(request: pytest.FixtureRequest, rootfs: Path) -> Iterator[Env]:
    daemon, runtime = request.param
    with running(daemon, runtime, rootfs) as e:
        yield e


@pytest.fixture
def kenv(rootfs: Path) -> Iterator[Env]:
    """ketchd with the ketch shim, for tests of the daemon itself."""
    with running("ketchd", KETCH_RUNTIME, rootfs) as e:
        yield e


@pytest.fixture
def channel(kenv: Env) -> Iterator[grpc.Channel]:
    """A gRPC channel to ``kenv``'s ketchd."""
    ch = grpc.insecure_channel(f"unix://{kenv.cd.address}")
    try:
        yield ch
    finally:
        ch.close()


# -- a local registry (Debian's docker-registry) -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("needs Debian's docker-registry")
    base = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = base / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {base}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def push_to_registry(registry: str, repo: str, tag: str, blobs: list[images.Blob], manifest: images.Blob) -> None:
    """The distribution API's monolithic upload, enough for a test registry."""
    host, port = registry.split(":")
    for blob in blobs:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202, resp.status
        location = resp.getheader("Location") or ""
        sep = "&" if "?" in location else "?"
        path = location.split(registry, 1)[-1] if "://" in location else location
        conn.request("PUT", f"{path}{sep}digest={blob.digest}", body=blob.data,
                     headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201, (resp.status, blob.digest)
        conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest.data, headers={"Content-Type": manifest.media_type})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 201, resp.status
    conn.close()
