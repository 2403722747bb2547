"""The leak check every interop fixture ends with (ketch.testing.leftovers): it finds each kind
of leftover before removing anything, only the run's own, and then removes it all."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ketch.testing import leftovers
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME
from tests.interop.conftest import running
from tests.interop.test_ctr_shim import PATH


def _dead_socket(path: str) -> None:
    """A unix socket file nobody listens on, as a killed shim leaves (an hour ago)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    old = time.time() - 3600
    os.utime(path, (old, old))


def test_every_kind_of_leftover_is_found_then_removed(rootfs: Path) -> None:
    with running("ketchd", KETCH_RUNTIME, rootfs) as env:
        ours, theirs = env.ns(), env.ns()  # one per shim: ours (grouped, with a keeper), runc's
        for ns, runtime in ((ours, KETCH_RUNTIME), (theirs, RUNC_RUNTIME)):
            env.ctr(ns, "run", "-d", *env.fifo, "--runtime", runtime, *PATH, "--rootfs", env.rootfs, "c", "sleep", "1000")
        inits = {ns: int(env.ctr(ns, "tasks", "ls").stdout.splitlines()[1].split()[1]) for ns in (ours, theirs)}
        runc_shim = support.shim_pid(theirs, "c")
        ketch_shim = support.shim_pid(ours, "c")
        # a test gone wrong: its daemon and a shim killed, nothing cleaned up
        env.cd.kill(signal.SIGKILL)
        support.kill_pids([runc_shim])  # SIGKILL, and wait until it is gone
        mnt = env.cd.base / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
        # a dead socket in the runc shim's directory that is another daemon's: not ours
        foreign = leftovers.runc_shim_socket("/tmp/not-this-run/containerd.sock", theirs, "c")
        _dead_socket(foreign)
        try:
            scope = env.cd.scope(env.namespaces)
            found = leftovers.find(scope)
            procs = found.processes
            # containers, outside the run's directory: by their cgroup
            assert procs[inits[ours]].endswith(f"in cgroup /{ours}/c"), procs
            assert procs[inits[theirs]].endswith(f"in cgroup /{theirs}/c"), procs
            assert ketch_shim in procs and support.keeper_pids(ours) <= set(procs), procs
            assert runc_shim not in procs  # killed
            assert set(found.runc) == {(str(env.cd.base / "runc" / ours), "c"), (f"/run/containerd/runc/{theirs}", "c")}
            assert found.mounts == [str(mnt)]
            for ns in (ours, theirs):
                assert any(d.endswith(f"/{ns}/c") for d in found.cgroups), found.cgroups
            assert leftovers.runc_shim_socket(env.cd.address, theirs, "c") in found.sockets
            assert any(s.startswith(str(env.cd.base / "s") + "/") for s in found.sockets), found.sockets
            assert foreign not in found.sockets
            assert sorted(found.bundles) == sorted(str(env.cd.bundle(ns, "c")) for ns in (ours, theirs))

            described = leftovers.check(scope, grace=0)  # nothing here is on its way out
            for kind in ("process", "runc container", "mount", "cgroup", "shim socket", "bundle"):
                assert any(line.startswith(kind) for line in described), (kind, described)
            again = leftovers.find(scope)
            assert again.describe() == [], again.describe()
            for ns in (ours, theirs):  # the namespaces' empty parents went too
                assert not support.cgroup_dirs(ns) and not os.path.exists(f"/run/containerd/runc/{ns}")
            assert os.path.exists(foreign)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(foreign)
            support.unmount_under(str(mnt))


def test_a_shared_namespace_s_shims_are_told_apart_by_their_daemon_s_address(tmp_path: Path) -> None:
    """The CRI's k8s.io is every CRI daemon's namespace: a shim of another daemon (its
    ``-address`` elsewhere) is not this run's; one without an address, or with ours, is."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    scope = leftovers.Scope(ours, str(ours / "d.sock"), ours / "d.log", ours / "bundles", ("k8s.io",))
    argvs = {"mine": ["-namespace", "k8s.io", "-address", str(ours / "d.sock")],
             "foreign": ["-namespace", "k8s.io", "-address", str(theirs / "d.sock")],
             "unaddressed": ["-namespace", "k8s.io", "-id", "x"]}
    procs = {name: subprocess.Popen(["sh", "-c", "sleep 60", "fake-shim", *argv]) for name, argv in argvs.items()}
    try:
        time.sleep(0.2)  # the shells have their command lines
        found = leftovers.processes(scope)
        assert procs["mine"].pid in found and procs["unaddressed"].pid in found
        assert procs["foreign"].pid not in found
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
