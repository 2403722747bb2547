"""Interop fixtures: a private daemon (Debian's containerd or ketchd, see ketch.testing.daemons)
per test, and the runtime under test."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ketch.testing import registry as registries
from ketch.testing import leftovers
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
def running(daemon: str, runtime: str, rootfs: Path, prepare: Callable[[Daemon], None] | None = None, *,
            path: tuple[str, ...] = (), config: str = "") -> Iterator[Env]:
    """``daemon`` started for a test of ``runtime``, with ``path`` first on its PATH; ``config``:
    ketchd's configuration file's text; ``prepare`` is called with the daemon before it starts
    (its environment, its fds)."""
    # short base path: the shim's socket lives under it and unix socket paths are short
    base = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    base.chmod(0o711)  # as /run/ketch: traversable by a user-namespaced container's root
    cd = DAEMONS[daemon](base)
    cd.path.extend(path)
    if config:
        assert isinstance(cd, Ketchd)
        cd.config_text = config
    e = Env(cd, runtime, rootfs)
    try:
        if prepare is not None:
            prepare(cd)
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
        slow = cd.slow_callbacks() if isinstance(cd, Ketchd) else []
        if not left and not slow:
            shutil.rmtree(base, ignore_errors=True)
        assert not left, "test left behind:\n  " + "\n  ".join(left) + f"\n(logs in {base})"
        assert not slow, "ketchd's event loop was blocked:\n" + "\n".join(slow)


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

@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registries.Registry]:
    """A private docker-registry on a loopback port (ketch.testing.registry)."""
    with registries.serving(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
