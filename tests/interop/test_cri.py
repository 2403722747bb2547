"""ketchd's Kubernetes CRI, driven by crictl and critest (cri-tools 1.26) from
../shared/cri-validation, pulling through its local registry (see its README)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch.testing import images, leftovers
from ketch.testing import registry as registries
from ketch.testing import system as support
from ketch.testing.cri import CriKetchd, Validation, critest, validation

PAUSE = "registry.k8s.io/pause:3.6"


@pytest.fixture(scope="module")
def kit() -> Iterator[Validation]:
    v = validation()
    try:
        yield v
    finally:
        support.kill_pids(v.started)  # only what this run started


@contextlib.contextmanager
def running_cri(kit: Validation, sandbox_image: str = "") -> Iterator[CriKetchd]:
    """A private ketchd with its CRI; at the end, pods removed through the API, and nothing of
    them (process, mount, cgroup, network namespace) may be left."""
    base = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    base.chmod(0o711)
    daemon = CriKetchd(base, kit, sandbox_image)
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.proc is not None:  # what a test left running goes through the API first
            daemon.crictl(kit, "rmp", "--all", "--force", check=False)
        daemon.kill(signal.SIGTERM)
        daemon.end_template()
        left = leftovers.check(daemon.scope(["k8s.io"]))
        left += [f"a blocked event loop: {s}" for s in daemon.slow_callbacks()]
        stray = _netns_of(daemon)
        if stray:
            left.append(f"network namespaces {sorted(stray)}")
            for path in stray:
                subprocess.run(["ip", "netns", "delete", os.path.basename(path)], capture_output=True)
        if not left:
            shutil.rmtree(base, ignore_errors=True)
        assert not left, f"test left behind: {left} (logs in {base})"


@pytest.fixture
def cri(kit: Validation) -> Iterator[CriKetchd]:
    with running_cri(kit) as daemon:
        yield daemon


def crictl_json(cri: CriKetchd, kit: Validation, *args: str) -> dict[str, object]:
    out = cri.crictl(kit, args[0], "-o", "json", *args[1:]).stdout
    parsed: dict[str, object] = json.loads(out)
    return parsed


def test_version_and_conditions(cri: CriKetchd, kit: Validation) -> None:
    version = cri.crictl(kit, "version").stdout
    assert "RuntimeName:  ketchd" in version and "RuntimeApiVersion:  v1" in version
    info = json.loads(cri.crictl(kit, "info").stdout)
    conditions = {c["type"]: c["status"] for c in info["status"]["conditions"]}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}


def test_network_not_ready_without_a_cni_config(cri: CriKetchd, kit: Validation) -> None:
    for conf in cri.cni_conf.iterdir():
        conf.unlink()
    info = json.loads(cri.crictl(kit, "info").stdout)
    network = next(c for c in info["status"]["conditions"] if c["type"] == "NetworkReady")
    assert network["status"] is False and network["reason"] == "NetworkPluginNotReady"
    assert str(cri.cni_conf) in network["message"]


def test_pull_inspect_by_every_name_and_remove(cri: CriKetchd, kit: Validation) -> None:
    pulled = cri.crictl(kit, "pull", PAUSE).stdout
    image_id = pulled.split()[-1]
    assert image_id.startswith("sha256:")
    listed = crictl_json(cri, kit, "images")["images"]
    assert isinstance(listed, list) and len(listed) == 1
    img = listed[0]
    assert img["id"] == image_id and img["repoTags"] == [PAUSE] and int(img["size"]) > 0
    (digest_ref,) = img["repoDigests"]
    assert digest_ref.startswith("registry.k8s.io/pause@sha256:")
    for name in (PAUSE, image_id, digest_ref, image_id.split(":")[1]):
        status = crictl_json(cri, kit, "inspecti", name)["status"]
        assert isinstance(status, dict) and status["id"] == image_id, name
    # what the CRI pulled is an ordinary image to the containerd API, unpacked for overlayfs
    names = cri.ctr("k8s.io", "images", "ls", "-q").stdout.split()
    assert sorted(names) == sorted([PAUSE, digest_ref, image_id])
    assert "Committed" in cri.ctr("k8s.io", "snapshots", "ls").stdout

    cri.crictl(kit, "rmi", PAUSE)
    assert crictl_json(cri, kit, "images")["images"] == []
    assert cri.ctr("k8s.io", "images", "ls", "-q").stdout.split() == []
    missing = cri.crictl(kit, "inspecti", PAUSE, check=False)
    assert missing.returncode != 0 and "no such image" in missing.stderr


def test_pull_of_an_unknown_image_says_so(cri: CriKetchd, kit: Validation) -> None:
    r = cri.crictl(kit, "pull", "registry.k8s.io/no-such-image:1", check=False)
    assert r.returncode != 0 and "NotFound" in r.stderr and "no-such-image" in r.stderr
    r = cri.crictl(kit, "pull", "Upper/Case", check=False)
    assert r.returncode != 0 and "InvalidArgument" in r.stderr
    assert cri.ctr("k8s.io", "images", "ls", "-q").stdout.split() == []


def test_pull_with_credentials(cri: CriKetchd, kit: Validation, rootfs: Path, tmp_path: Path) -> None:
    image = images.image_from_dir(rootfs, "private")
    with registries.serving(tmp_path, credentials=("kuser", "s3cret")) as reg:
        reg.push_image("team/busybox", "1", image)
        ref = f"{reg.address}/team/busybox:1"
        refused = cri.crictl(kit, "pull", ref, check=False)
        assert refused.returncode != 0 and "credentials" in refused.stderr
        wrong = cri.crictl(kit, "pull", "--creds", "kuser:wrong", ref, check=False)
        assert wrong.returncode != 0 and "PermissionDenied" in wrong.stderr
        pulled = cri.crictl(kit, "pull", "--creds", "kuser:s3cret", ref).stdout
    assert pulled.split()[-1] == image.config.digest
    status = crictl_json(cri, kit, "inspecti", ref)["status"]
    assert isinstance(status, dict) and status["repoTags"] == [ref]
    cri.crictl(kit, "rmi", ref)


# -- pod sandboxes -------------------------------------------------------------------------------

def _pod_config(tmp_path: Path, name: str = "web", **extra: object) -> Path:
    config = {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "attempt": 1},
              "hostname": f"{name}-host", "log_directory": str(tmp_path / "logs"),
              "dns_config": {"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]},
              "linux": {}, **extra}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _netns_of(cri: CriKetchd) -> set[str]:
    """The network namespaces this ketchd made that exist (its log names them; other runs on
    the machine make theirs)."""
    made = re.findall(r"network namespace (/run/netns/cni-[0-9a-f-]+) created", cri.log.read_text())
    return {path for path in made if os.path.exists(path)}


def test_pod_runs_stops_and_is_removed_releasing_its_network(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    before = _netns_of(cri)
    pod = cri.crictl(kit, "runp", str(_pod_config(tmp_path))).stdout.strip()
    assert len(pod) == 64
    (listed,) = crictl_json(cri, kit, "pods")["items"]
    assert listed["id"] == pod and listed["state"] == "SANDBOX_READY" and listed["metadata"]["name"] == "web"
    status = crictl_json(cri, kit, "inspectp", pod)
    ip = status["status"]["network"]["ip"]
    assert ip.startswith("10.231.0."), status
    (new_netns,) = _netns_of(cri) - before
    assert status["info"]["netNamespacePath"] == new_netns, status
    leases = cri.base / "cni" / "ipam" / "cri-validation"
    assert (leases / ip).exists()
    # the pause container is a ketch task in the k8s.io namespace
    tasks = cri.ctr("k8s.io", "tasks", "ls").stdout
    assert pod in tasks and "RUNNING" in tasks
    # a second pod with the same name and attempt is refused
    again = cri.crictl(kit, "runp", str(_pod_config(tmp_path)), check=False)
    assert again.returncode != 0 and "reserved" in again.stderr

    cri.crictl(kit, "stopp", pod)
    (listed,) = crictl_json(cri, kit, "pods")["items"]
    assert listed["state"] == "SANDBOX_NOTREADY"
    assert _netns_of(cri) == before and not (leases / ip).exists()
    cri.crictl(kit, "stopp", pod)  # again: nothing more to do
    cri.crictl(kit, "rmp", pod)
    assert crictl_json(cri, kit, "pods")["items"] == []
    assert cri.ctr("k8s.io", "containers", "ls", "-q").stdout.split() == []
    missing = cri.crictl(kit, "inspectp", pod, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


#: critest checks that a timed-out exec is gone with ``pgrep sleep`` in a container sharing its
#: pod's pid namespace (the CRI default), where the kit's stand-in pause image (a shell looping
#: on ``sleep 3600``) always has a sleep: with that image the spec cannot pass, whichever the
#: runtime. test_critest_exec_timeout runs it with a pause image that sleeps otherwise.
EXEC_TIMEOUT_SPEC = ("[It] [k8s.io] Container runtime should support basic operations on container runtime should "
                     "support execSync with timeout [Conformance]")


def test_critest_passlist(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """Every spec of the kit's pass list, the streaming ones (exec, attach, port-forward over
    SPDY/3.1 to ketchd's streaming server) among them."""
    results = critest(kit, cri.address, "", tmp_path)
    wanted = [name for name in kit.passlist if name != "[BeforeSuite]"]
    assert len(wanted) == 68 and EXEC_TIMEOUT_SPEC in wanted
    assert sum("Streaming" in name for name in wanted) == 4
    bad = {name: results.get(name, "not run") for name in wanted if results.get(name) != "passed"}
    assert not bad.keys() - {EXEC_TIMEOUT_SPEC}, f"critest specs not passing: {bad} (log: {tmp_path / 'critest.log'})"
    if EXEC_TIMEOUT_SPEC in bad:  # only for the reason above: the pod's pause sleep is what pgrep finds
        assert "timeout exec process should be gone" in (tmp_path / "critest.log").read_text()


def test_critest_exec_timeout(kit: Validation, rootfs: Path, tmp_path: Path) -> None:
    """critest's "execSync with timeout", with a pause image whose shell waits on ``tail``
    rather than ``sleep`` (the kit's has a ``sleep`` in every pod): the timed-out ``sleep 4321``
    must be killed and gone when ExecSync answers."""
    pause = images.image_from_dir(rootfs, "pause", cmd=(
        "/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do tail -f /dev/null & wait; done"))
    with registries.serving(tmp_path) as reg:
        reg.push_image("ketch/pause", "1", pause)
        with running_cri(kit, sandbox_image=f"{reg.address}/ketch/pause:1") as cri:
            results = critest(kit, cri.address, "execSync with timeout", tmp_path)
    assert results.get(EXEC_TIMEOUT_SPEC) == "passed", f"{results} (log: {tmp_path / 'critest.log'})"


BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"


def _container_config(tmp_path: Path, name: str, *args: str, **extra: object) -> Path:
    config = {"metadata": {"name": name}, "image": {"image": BUSYBOX}, "command": list(args),
              "log_path": f"{name}.log", "linux": {}, **extra}
    path = tmp_path / f"c-{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_a_container_as_a_person_runs_it_with_crictl(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    pod_json = _pod_config(tmp_path)
    pod = cri.crictl(kit, "runp", str(pod_json)).stdout.strip()
    cri.crictl(kit, "pull", BUSYBOX)
    ctr = cri.crictl(kit, "create", pod, str(_container_config(
        tmp_path, "app", "sh", "-c", "echo started; echo oops >&2; while true; do sleep 1; done")),
        str(pod_json)).stdout.strip()
    (listed,) = crictl_json(cri, kit, "ps", "-a")["containers"]
    assert listed["id"] == ctr and listed["state"] == "CONTAINER_CREATED"
    cri.crictl(kit, "start", ctr)
    (listed,) = crictl_json(cri, kit, "ps")["containers"]
    assert listed["state"] == "CONTAINER_RUNNING" and listed["podSandboxId"] == pod

    out = cri.crictl(kit, "exec", "-s", ctr, "sh", "-c", "cat /etc/resolv.conf; hostname").stdout
    assert "nameserver 10.96.0.10" in out and "options ndots:5" in out and "web-host" in out
    failed = cri.crictl(kit, "exec", "-s", ctr, "sh", "-c", "exit 3", check=False)
    assert failed.returncode != 0 and "exited with 3" in failed.stderr
    timed = cri.crictl(kit, "exec", "-s", "--timeout", "2", ctr, "sleep", "4321", check=False)
    assert timed.returncode != 0 and "timed out" in timed.stderr
    assert "sleep 4321" not in cri.crictl(kit, "exec", "-s", ctr, "ps").stdout  # killed, not left running

    logs = cri.crictl(kit, "logs", ctr)
    assert logs.stdout == "started\n" and logs.stderr == "oops\n"
    raw = (tmp_path / "logs" / "app.log").read_text().splitlines()
    assert any(line.endswith(" stdout F started") for line in raw), raw
    assert any(line.endswith(" stderr F oops") for line in raw), raw

    stats = crictl_json(cri, kit, "stats", "--id", ctr)["stats"]
    assert isinstance(stats, list) and len(stats) == 1
    (stat,) = stats
    assert stat["attributes"]["id"] == ctr
    assert int(stat["memory"]["workingSetBytes"]["value"]) > 64 * 1024
    assert int(stat["cpu"]["usageCoreNanoSeconds"]["value"]) > 0
    follow = subprocess.Popen([kit.crictl, "--runtime-endpoint", f"unix://{cri.address}", "logs", "-f", ctr],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert follow.stdout is not None and follow.stdout.readline() == b"started\n"
    finally:
        follow.kill()
        follow.communicate()

    cri.crictl(kit, "stop", "--timeout", "1", ctr)
    status = crictl_json(cri, kit, "inspect", ctr)["status"]
    # SIGTERM first: the shell (not pid 1: it shares the pod's pid namespace) dies of it
    assert status["state"] == "CONTAINER_EXITED" and status["exitCode"] == 143 and status["reason"] == "Error"
    cri.crictl(kit, "rm", ctr)
    assert crictl_json(cri, kit, "ps", "-a")["containers"] == []
    cri.crictl(kit, "stopp", pod)
    cri.crictl(kit, "rmp", pod)


def test_a_pod_is_one_shim_group(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """Each pod's containers share one shim, apart from every other pod's: kill -9 of one pod's
    shim touches no other pod, and its own containers go on (the keeper's takeover)."""
    cri.crictl(kit, "pull", BUSYBOX)
    pods, apps = [], []
    for name in ("one", "two"):
        pod_json = _pod_config(tmp_path, name)
        pod = cri.crictl(kit, "runp", str(pod_json)).stdout.strip()
        app = cri.crictl(kit, "create", pod, str(_container_config(tmp_path, f"app-{name}", "sleep", "1000")),
                         str(pod_json)).stdout.strip()
        cri.crictl(kit, "start", app)
        pods.append(pod)
        apps.append(app)
    shims = [support.shim_pid("k8s.io", pod) for pod in pods]
    assert shims[0] != shims[1] and support.shim_pids("k8s.io") == set(shims)
    os.kill(shims[0], signal.SIGKILL)
    for app in apps:
        assert cri.crictl(kit, "exec", "-s", app, "echo", "alive").stdout.startswith("alive")
    assert support.shim_pid("k8s.io", pods[1]) == shims[1]
    states = {p["id"]: p["state"] for p in crictl_json(cri, kit, "pods")["items"]}
    assert states == {pods[0]: "SANDBOX_READY", pods[1]: "SANDBOX_READY"}


def test_pods_and_containers_survive_a_kill_9_of_ketchd(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    cri.crictl(kit, "pull", BUSYBOX)
    before_netns = _netns_of(cri)
    pods, apps = [], []
    for name in ("one", "two"):
        pod_json = _pod_config(tmp_path, name)
        pod = cri.crictl(kit, "runp", str(pod_json)).stdout.strip()
        app = cri.crictl(kit, "create", pod, str(_container_config(
            tmp_path, f"app-{name}", "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done")),
            str(pod_json)).stdout.strip()
        cri.crictl(kit, "start", app)
        pods.append(pod)
        apps.append(app)
    listed_pods = crictl_json(cri, kit, "pods")["items"]
    listed_apps = crictl_json(cri, kit, "ps")["containers"]
    ips = {p: crictl_json(cri, kit, "inspectp", p)["status"]["network"]["ip"] for p in pods}

    cri.kill(signal.SIGKILL)
    time.sleep(1)
    cri.start()

    assert crictl_json(cri, kit, "pods")["items"] == listed_pods
    assert crictl_json(cri, kit, "ps")["containers"] == listed_apps
    for pod in pods:
        assert crictl_json(cri, kit, "inspectp", pod)["status"]["network"]["ip"] == ips[pod]
    for app in apps:
        assert cri.crictl(kit, "exec", "-s", app, "echo", "alive").stdout.startswith("alive")
    # the log goes on: lines written during the outage and after the restart arrive
    log = tmp_path / "logs" / "app-one.log"
    seen = len(log.read_text().splitlines())
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < seen + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    ticks = [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()]
    assert len(ticks) >= seen + 5 and ticks == list(range(len(ticks))), "no tick lost or repeated"

    for pod in pods:
        cri.crictl(kit, "stopp", pod)
        cri.crictl(kit, "rmp", pod)
    assert _netns_of(cri) == before_netns
    assert not list((cri.base / "cni" / "ipam" / "cri-validation").glob("10.*"))


def _running_container(cri: CriKetchd, kit: Validation, tmp_path: Path, name: str, *args: str,
                       **extra: object) -> tuple[str, str]:
    pod_json = _pod_config(tmp_path)
    pod = cri.crictl(kit, "runp", str(pod_json)).stdout.strip()
    cri.crictl(kit, "pull", BUSYBOX)
    ctr = cri.crictl(kit, "create", pod, str(_container_config(tmp_path, name, *args, **extra)),
                     str(pod_json)).stdout.strip()
    cri.crictl(kit, "start", ctr)
    return pod, ctr


def _crictl_argv(cri: CriKetchd, kit: Validation, *args: str) -> list[str]:
    return [kit.crictl, "--runtime-endpoint", f"unix://{cri.address}", "--image-endpoint", f"unix://{cri.address}",
            "--timeout", "60s", *args]


def _read_until(fd: int, wanted: bytes, timeout: float = 30) -> bytes:
    """What the pty at ``fd`` gives until ``wanted`` shows up (AssertionError after ``timeout``)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} not seen; got {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side is gone
                break
            if not chunk:
                break
            seen += chunk
    assert wanted in seen, f"{wanted!r} not seen; got {seen!r}"
    return seen


def test_crictl_exec_streams_with_and_without_a_terminal(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """``crictl exec -it`` as a person types into it: a shell on a terminal of the size of
    theirs (and of the new size after they resize it), their keys in, its output back; plain
    ``crictl exec`` gets stdout and stderr apart and the command's exit code."""
    _, ctr = _running_container(cri, kit, tmp_path, "shell", "sleep", "3600")

    plain = cri.crictl(kit, "exec", ctr, "sh", "-c", "echo out; echo err >&2")
    assert plain.stdout == "out\n" and plain.stderr == "err\n"
    failed = cri.crictl(kit, "exec", ctr, "sh", "-c", "exit 3", check=False)
    # the exit code came in the v4 status's causes: client-go names it
    assert failed.returncode != 0 and "command terminated with exit code 3" in failed.stderr, failed.stderr

    # much, both ways (Go's SPDY ignores flow control windows: TCP's holds each side back)
    big = subprocess.run(_crictl_argv(cri, kit, "exec", "-i", ctr, "sh", "-c", "wc -c; head -c 3000000 /dev/zero"),
                         input=b"y" * 3_000_000, capture_output=True, timeout=120)
    assert big.returncode == 0, big.stderr
    assert big.stdout.startswith(b"3000000\n") and big.stdout[8:] == b"\0" * 3_000_000

    unknown = cri.crictl(kit, "exec", "nosuchcontainer", "true", check=False)
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr and "nosuchcontainer" in unknown.stderr

    # a client that goes away takes its process with it
    with subprocess.Popen(_crictl_argv(cri, kit, "exec", ctr, "sleep", "4444")) as gone:
        deadline = time.monotonic() + 30
        while "sleep 4444" not in cri.crictl(kit, "exec", "-s", ctr, "ps").stdout:
            assert time.monotonic() < deadline, "the exec never ran"
            time.sleep(0.3)
        gone.kill()
    deadline = time.monotonic() + 30
    while "sleep 4444" in cri.crictl(kit, "exec", "-s", ctr, "ps").stdout:
        assert time.monotonic() < deadline, "the exec outlived its client"
        time.sleep(0.3)

    def shells() -> int:
        return cri.crictl(kit, "exec", "-s", ctr, "ps", "-o", "comm").stdout.split().count("sh")

    before = shells()  # the pod's pause stand-in is a shell too (one pid namespace)
    pid, fd = pty.fork()
    if pid == 0:  # the child: crictl on the pty, as in a person's terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
        os.execv(kit.crictl, _crictl_argv(cri, kit, "exec", "-it", ctr, "sh"))
    try:
        _read_until(fd, b"# ")
        os.write(fd, b"stty size; echo $((6 * 7))\r")
        out = _read_until(fd, b"42")
        assert b"33 77" in out, out
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 99, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        time.sleep(1)
        os.write(fd, b"stty size\r")
        _read_until(fd, b"44 99")
        os.write(fd, b"exit 0\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert shells() == before  # the exec's shell is gone


def _attach_once(proc: subprocess.Popen[bytes], word: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        time.sleep(1)  # attached (what the container writes before is not for this client)
        proc.stdin.write(f"echo {word}; echo bad >&2\n".encode())
        proc.stdin.flush()
        assert _read_until(proc.stdout.fileno(), b"\n") == f"{word}\n".encode()
        assert _read_until(proc.stderr.fileno(), b"\n") == b"bad\n"
        proc.stdin.close()  # the person's input ends: so does the attach
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_crictl_attach_to_a_containers_own_stdio(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """``crictl attach -i``: what the person types goes to the container's own stdin, its
    output comes back to them (and still to its log); when their input ends the attach ends and
    the container (not stdin_once) runs on, and a later attach works the same."""
    _, ctr = _running_container(cri, kit, tmp_path, "reader", "sh", stdin=True)
    for word in ("first", "second", "restarted"):
        if word == "restarted":  # a ketchd that restarted attaches the same
            cri.kill(signal.SIGKILL)
            cri.start()
        with subprocess.Popen(_crictl_argv(cri, kit, "attach", "-i", ctr), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            _attach_once(proc, word)
    (listed,) = crictl_json(cri, kit, "ps")["containers"]
    assert listed["state"] == "CONTAINER_RUNNING"
    assert cri.crictl(kit, "logs", ctr).stdout == "first\nsecond\nrestarted\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_crictl_port_forward_into_the_pods_network(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """``crictl port-forward POD LOCAL:8080`` reaches a server listening in the pod's network
    namespace, once per connection, both ways; a port nothing listens on is reported (and
    client-go's port-forward then ends, as it does on any failed forward)."""
    pod, _ = _running_container(cri, kit, tmp_path, "server", "nc", "-ll", "-p", "8080", "-e", "sh", "-c",
                                "read x; echo hi $x")
    local, dead = _free_port(), _free_port()
    proc = subprocess.Popen(_crictl_argv(cri, kit, "port-forward", pod, f"{local}:8080", f"{dead}:8081"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        for name in ("one", "two", "three"):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", local), timeout=10) as c:
                        c.sendall(f"{name}\n".encode())
                        got = b""
                        while chunk := c.recv(4096):
                            got += chunk
                    break
                except ConnectionRefusedError:  # crictl still starting
                    assert time.monotonic() < deadline, f"port-forward never listened: {proc.kill() or proc.communicate()}"
                    time.sleep(0.3)
            assert got == f"hi {name}\n".encode()
        with socket.create_connection(("127.0.0.1", dead), timeout=10) as c:
            assert c.recv(4096) == b""
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert f"an error occurred forwarding {dead} -> 8081" in out and "Connection refused" in out, out


def _host_ip() -> str:
    route = subprocess.run(["ip", "-o", "-4", "route", "get", "192.0.2.1"], capture_output=True, text=True).stdout.split()
    return route[route.index("src") + 1]


def test_a_host_port_reaches_its_pod(cri: CriKetchd, kit: Validation, tmp_path: Path) -> None:
    """The pod's port mappings reach the CNI plugins as a capability (portmap): the host's port,
    on its address and on localhost, reaches the container; once the pod is gone, so is the
    mapping."""
    cri.crictl(kit, "pull", BUSYBOX)
    pod_json = _pod_config(tmp_path, "web", port_mappings=[{"protocol": 0, "container_port": 8080, "host_port": 18089}])
    pod = cri.crictl(kit, "runp", str(pod_json)).stdout.strip()
    app = cri.crictl(kit, "create", pod, str(_container_config(
        tmp_path, "server", "sh", "-c", "while true; do echo hello-from-pod | nc -l -p 8080; done")),
        str(pod_json)).stdout.strip()
    cri.crictl(kit, "start", app)
    for address in ((_host_ip(), 18089), ("127.0.0.1", 18089)):
        got, deadline = b"", time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            try:
                with socket.create_connection(address, timeout=2) as s:
                    got = s.recv(100)
            except OSError:
                time.sleep(0.2)
        assert got == b"hello-from-pod\n", address
    cri.crictl(kit, "rmp", "-f", pod)
    rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert "18089" not in rules
