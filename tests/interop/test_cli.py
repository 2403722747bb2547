"""The ``ketch`` command line, as a person runs it, against a private ketchd and a private
containerd 1.6: output, ``--json`` shapes, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch.testing import registry as registries
from ketch.testing import images
from ketch.testing import system as support
from ketch.testing.daemons import KETCH_RUNTIME, RUNC_RUNTIME

from .conftest import Env, running

DAEMONS = [
    pytest.param(("containerd", RUNC_RUNTIME), id="containerd"),
    pytest.param(("ketchd", KETCH_RUNTIME), id="ketchd"),
]
KETCH = os.path.join(support.VENV_BIN, "ketch")
LOOP = ["sh", "-c", "echo started; while true; do sleep 0.1; done"]


@pytest.fixture(params=DAEMONS)
def denv(request: pytest.FixtureRequest, rootfs: Path) -> Iterator[Env]:
    daemon, runtime = request.param
    with running(daemon, runtime, rootfs) as e:
        yield e


class Cli:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.ns = env.ns()
        self.environ = dict(os.environ, KETCH_ADDRESS=env.cd.address, KETCH_NAMESPACE=self.ns,
                            KETCH_FIFO_DIR=str(env.cd.base / "fifo"), KETCH_LOG_DIR=str(env.cd.base / "logs"))
        self.environ.pop("CONTAINERD_ADDRESS", None)

    def __call__(self, *args: str, input: str | None = None, rc: int | None = 0,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([KETCH, *args], capture_output=True, text=True, input=input, env=self.environ,
                           timeout=timeout)
        if rc is not None:
            assert r.returncode == rc, f"ketch {' '.join(args)}: {r.returncode} {r.stdout!r} {r.stderr!r}"
        if r.returncode not in (0, rc):
            self.one_line_error(r)
        return r

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)

    def run_args(self, *rest: str) -> list[str]:
        return ["run", "--runtime", self.env.runtime, "--rootfs", self.env.rootfs, *rest]

    @staticmethod
    def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
        assert "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 or lines[-1].startswith("Error:"), r.stderr
        return lines[-1]


@pytest.fixture
def cli(denv: Env) -> Cli:
    return Cli(denv)


def test_run_in_the_foreground_exits_with_the_status_and_removes(cli: Cli) -> None:
    r = cli(*cli.run_args("--rm", "-e", "A=1", "--name", "fg", "sh", "-c", "echo $A; echo err >&2; exit 3"), rc=3)
    assert (r.stdout, r.stderr) == ("1\n", "err\n")
    assert cli.json("ps", "-a") == []
    r = cli(*cli.run_args("--rm", "-i", "cat"), input="through stdin\n")
    assert r.stdout == "through stdin\n"
    r = cli(*cli.run_args("--rm", "-t", "sh", "-c", "test -t 1 && echo a tty"))
    assert r.stdout.replace("\r", "") == "a tty\n"
    # errors: one line, a non-zero status
    assert "Error:" in cli("run", "--rm", rc=2).stderr
    assert "identifier" in cli.one_line_error(cli(*cli.run_args("--name", "bad/id", "true"), rc=1))
    assert "unknown signal" in cli("kill", "-s", "NOPE", "x", rc=2).stderr


def test_a_detached_container_through_every_command(cli: Cli) -> None:
    assert cli(*cli.run_args("-d", "--name", "web", "--memory", "64m", "--label", "tier=front", *LOOP)).stdout == "web\n"
    [row] = cli.json("ps")  # type: ignore[misc]
    assert {k: row[k] for k in ("id", "status", "command", "labels")} == {
        "id": "web", "status": "running", "command": " ".join(LOOP),
        "labels": {"tier": "front", "io.ketch.log": f"file://{cli.env.cd.base}/logs/{cli.ns}/web.log"}}
    assert row["pid"] > 0
    table = cli("ps").stdout
    assert table.split("\n")[0].split() == ["CONTAINER", "IMAGE", "COMMAND", "STATUS", "PID"] and "running" in table

    r = cli("exec", "web", "sh", "-c", "echo in; exit 5", rc=5)
    assert r.stdout == "in\n"
    assert cli("exec", "-i", "web", "cat", input="fed\n").stdout == "fed\n"
    assert cli("exec", "-e", "X=y", "web", "sh", "-c", "echo $X").stdout == "y\n"
    deadline = time.monotonic() + 10
    while "started" not in cli("logs", "web").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli("logs", "web").stdout == "started\n"

    top = cli.json("top", "web")
    assert isinstance(top, list) and {"pid", "exec_id", "command"} <= set(top[0])
    assert cli("top", "web").stdout.split()[:3] == ["PID", "EXEC", "COMMAND"]
    [s] = cli.json("stats", "--no-stream")  # type: ignore[misc]
    assert s["id"] == "web" and s["pids"] >= 1 and s["memory_limit"] == 64 << 20 and s["cgroup"] in (1, 2)
    assert "web" in cli("stats", "--no-stream").stdout

    assert cli("pause", "web").stdout == "web\n"
    assert cli.json("ps")[0]["status"] == "paused"  # type: ignore[index]
    assert cli("unpause", "web").stdout == "web\n"
    assert "stop it, or rm -f" in cli.one_line_error(cli("rm", "web", rc=1))
    assert cli("stop", "-t", "1", "web").stdout == "web 137\n"  # sh as pid 1 ignores SIGTERM
    assert cli.json("ps") == []
    assert cli.json("ps", "-a")[0]["status"] == "stopped"  # type: ignore[index]
    assert cli("rm", "web").stdout == "web\n"
    for command in (["rm", "web"], ["kill", "web"], ["logs", "web"], ["exec", "web", "true"], ["pause", "web"]):
        assert "not found" in cli.one_line_error(cli(*command, rc=1))

    cli(*cli.run_args("-d", "--name", "k", *LOOP))
    assert cli("kill", "-s", "KILL", "k").stdout == "k\n"
    assert cli("rm", "-f", "k").stdout == "k\n"
    # logs -f follows until the container stops
    cli(*cli.run_args("-d", "--name", "brief", "sh", "-c", "echo one; sleep 1; echo two"))
    assert cli("logs", "-f", "brief").stdout == "one\ntwo\n"
    cli("rm", "brief")
    cli(*cli.run_args("--rm", "--name", "fg", "true"))
    cli(*cli.run_args("--name", "nolog", "true"))
    assert "keeps no log" in cli.one_line_error(cli("logs", "nolog", rc=1))
    cli("rm", "nolog")


def test_events_json_one_object_a_line(cli: Cli) -> None:
    events = subprocess.Popen([KETCH, "events", "--json", 'topic=="/tasks/exit"'], stdout=subprocess.PIPE,
                              text=True, env=cli.environ)
    try:
        time.sleep(1.5)  # subscribed
        cli(*cli.run_args("--rm", "--name", "ev", "sh", "-c", "exit 9"), rc=9)
        assert events.stdout is not None
        e = json.loads(events.stdout.readline())
        assert (e["topic"], e["namespace"], e["event"]["container_id"], e["event"]["exit_status"]) == \
            ("/tasks/exit", cli.ns, "ev", 9)
        assert set(e) >= {"timestamp", "type"}
    finally:
        events.terminate()
        events.wait(10)
        if events.stdout is not None:
            events.stdout.close()


def test_images_commands(cli: Cli, tmp_path: Path, registry: registries.Registry) -> None:
    rootfs = support.make_busybox_rootfs(tmp_path / "rootfs")
    image = images.image_from_dir(rootfs, "docker.io/library/busybox:cli")
    archive = tmp_path / "in.tar"
    images.write_oci_archive(image, archive)
    assert cli("images", "import", str(archive)).stdout == f"docker.io/library/busybox:cli {image.manifest.digest}\n"
    [row] = cli.json("images", "ls")  # type: ignore[misc]
    assert (row["name"], row["digest"], row["content_size"]) == (
        "docker.io/library/busybox:cli", image.manifest.digest, len(image.config.data) + len(image.layers[0].data))
    assert cli("images", "ls").stdout.split()[:3] == ["NAME", "DIGEST", "SIZE"]
    r = cli("run", "--rm", "--runtime", cli.env.runtime, "docker.io/library/busybox:cli", "echo", "from an image")
    assert r.stdout == "from an image\n"
    assert cli("images", "tag", "docker.io/library/busybox:cli", "example.com/b:2").stdout == "example.com/b:2\n"
    assert "already exists" in cli.one_line_error(cli("images", "tag", "docker.io/library/busybox:cli",
                                                      "example.com/b:2", rc=1))
    out = tmp_path / "out.tar"
    assert cli("images", "export", str(out), "example.com/b:2").stdout == f"{out}\n"
    assert cli("images", "rm", "example.com/b:2", "docker.io/library/busybox:cli").stdout.split() == [
        "example.com/b:2", "docker.io/library/busybox:cli"]
    assert cli("images", "ls", "-q").stdout == ""
    assert cli("images", "import", str(out)).stdout.startswith("example.com/b:2 ")
    assert "not found" in cli.one_line_error(cli("images", "rm", "nothing:here", rc=1))
    assert "not found" in cli.one_line_error(cli("images", "import", str(tmp_path / "absent.tar"), rc=1))
    registry.push("cli/busybox", "v1", [image.config, *image.layers], image.manifest)
    assert cli("images", "pull", f"{registry.address}/cli/busybox:v1").stdout == \
        f"{registry.address}/cli/busybox:v1 {image.manifest.digest}\n"
    assert "not found" in cli.one_line_error(cli("images", "pull", f"{registry.address}/cli/busybox:nope", rc=1))


def test_version_info_doctor_completion(cli: Cli, tmp_path: Path) -> None:
    v = cli.json("version")
    assert isinstance(v, dict) and set(v) == {"client", "server"} and v["server"]["version"]
    assert "Server:" in cli("version").stdout
    info = cli.json("info")
    assert isinstance(info, dict) and {"address", "version", "uuid", "namespaces", "runtime_plugins", "plugins"} <= set(info)
    assert info["address"] == cli.env.cd.address and all({"type", "id", "status"} <= set(p) for p in info["plugins"])
    assert "UUID:" in cli("info").stdout
    checks = cli.json("doctor")
    assert isinstance(checks, list)
    by_name = {c["check"]: c for c in checks}
    assert {"runc", "cgroups", "overlayfs", "user namespaces", "criu", "daemon socket"} <= set(by_name)
    assert by_name["daemon socket"]["ok"] and by_name["runc"]["ok"]
    r = cli("--address", str(tmp_path / "none.sock"), "doctor", rc=1)
    assert "FAIL daemon socket" in r.stdout and "fix: start ketchd" in r.stdout
    r = cli("--address", str(tmp_path / "none.sock"), "ps", rc=1)
    assert "cannot reach the daemon" in cli.one_line_error(r)
    assert "_KETCH_COMPLETE" in cli("completion", "bash").stdout
    assert cli("--version").stdout.startswith("ketch, version")
