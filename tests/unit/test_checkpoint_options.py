"""Checkpoint options → runc checkpoint/restore flags (shim/options.py, oci/runc.py), and the
criu check (oci/criu.py): no root, no criu; runc and criu are scripts that record their words."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ketch import errdefs
from ketch.api.containerd.linux.runctypes import runc_pb2
from ketch.api.containerd.runc.options import oci_pb2
from ketch.client._containers import pack_options
from ketch.oci import criu
from ketch.oci.runc import Runc
from ketch.shim.options import CheckpointOptions, RuntimeOptions
from ketch.shim.reaper import Monitor

from .test_reaper import run

I, W = "/img", "/work"


def _any(message: object) -> tuple[str, bytes]:
    a = pack_options(message)
    return a.type_url, a.value


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        (oci_pb2.CheckpointOptions(), ["--leave-running"]),
        (oci_pb2.CheckpointOptions(exit=True), []),
        (oci_pb2.CheckpointOptions(open_tcp=True), ["--tcp-established", "--leave-running"]),
        (oci_pb2.CheckpointOptions(external_unix_sockets=True), ["--ext-unix-sk", "--leave-running"]),
        (oci_pb2.CheckpointOptions(terminal=True), ["--shell-job", "--leave-running"]),
        (oci_pb2.CheckpointOptions(file_locks=True), ["--file-locks", "--leave-running"]),
        (oci_pb2.CheckpointOptions(cgroups_mode="strict"), ["--manage-cgroups-mode", "strict", "--leave-running"]),
        (oci_pb2.CheckpointOptions(empty_namespaces=["network", "ipc"]),
         ["--empty-ns", "network", "--empty-ns", "ipc", "--leave-running"]),
        (oci_pb2.CheckpointOptions(exit=True, open_tcp=True, external_unix_sockets=True, terminal=True,
                                   file_locks=True, cgroups_mode="soft", empty_namespaces=["network"]),
         ["--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks", "--manage-cgroups-mode", "soft",
          "--empty-ns", "network"]),
        # the v1 shim's message: the same switches
        (runc_pb2.CheckpointOptions(exit=True, file_locks=True), ["--file-locks"]),
    ],
)
def test_checkpoint_options_become_runc_flags(options: object, flags: list[str]) -> None:
    opts = CheckpointOptions.from_any(*_any(options))
    assert opts.runc_args(I, W) == ["--image-path", I, "--work-path", W, *flags]


def test_no_checkpoint_options_leave_it_running() -> None:
    assert CheckpointOptions.from_any("", b"").runc_args(I, W) == ["--image-path", I, "--work-path", W,
                                                                   "--leave-running"]


@pytest.mark.parametrize("message", [oci_pb2.CheckpointOptions, runc_pb2.CheckpointOptions])
def test_image_and_work_paths_decode_from_both_messages(message: type) -> None:
    # (their field numbers differ: 8/9 in containerd.runc.v1, 9/8 in containerd.linux.runc)
    opts = CheckpointOptions.from_any(*_any(message(image_path="/i", work_path="/w")))
    assert (opts.image_path, opts.work_path) == ("/i", "/w")


@pytest.mark.parametrize(
    ("type_url", "value", "words"),
    [
        ("containerd.runc.v1.Options", b"", "unsupported checkpoint options type"),
        ("containerd.runc.v1.CheckpointOptions", b"\xff\xff", "do not decode"),
        (*_any(oci_pb2.CheckpointOptions(cgroups_mode="loose")), "cgroups mode 'loose'"),
    ],
)
def test_bad_checkpoint_options_are_invalid_argument(type_url: str, value: bytes, words: str) -> None:
    with pytest.raises(errdefs.InvalidArgument, match=words):
        CheckpointOptions.from_any(type_url, value)


def test_criu_path_and_work_path_are_runtime_options(tmp_path: Path) -> None:
    opts = RuntimeOptions.from_any(*_any(oci_pb2.Options(criu_path="/opt/criu", criu_work_path="/cw")), "/root")
    assert (opts.criu_path, opts.criu_work_path) == ("/opt/criu", "/cw")
    # the v1 shim's CreateOptions has a work path (its criu path is the runtime's, not the task's)
    v1 = RuntimeOptions.from_any(*_any(runc_pb2.CreateOptions(criu_work_path="/cw")), "/root")
    assert (v1.criu_path, v1.criu_work_path) == ("", "/cw")
    opts.save(str(tmp_path))  # the delete action and a successor shim find them
    assert RuntimeOptions.load(str(tmp_path), "/x") == opts


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(stat.S_IRWXU)
    return str(path)


def _recording_runc(tmp_path: Path) -> str:
    """A runc that writes its arguments (one a line) to ``args`` and a pid file if asked."""
    return _script(tmp_path / "runc", f"""printf '%s\\n' "$@" > {tmp_path}/args
while [ $# -gt 0 ]; do [ "$1" = --pid-file ] && echo 4242 > "$2"; shift; done
""")


def test_runc_checkpoint_and_restore_argv(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> tuple[list[str], list[str]]:
        r = Runc(monitor, binary=_recording_runc(tmp_path), root="/state", criu="/opt/criu")
        await r.checkpoint("c1", ["--image-path", I, "--work-path", W, "--leave-running"])
        checkpoint = (tmp_path / "args").read_text().splitlines()
        await r.restore("c1", "/bundle", image=I, work=W, parent="/parent", pid_file=str(tmp_path / "pid"),
                        console_socket="/sock", no_pivot=True)
        return checkpoint, (tmp_path / "args").read_text().splitlines()

    checkpoint, restore = run(scenario)
    assert checkpoint == ["--root", "/state", "--criu", "/opt/criu", "checkpoint", "--image-path", I,
                          "--work-path", W, "--leave-running", "c1"]
    assert restore == ["--root", "/state", "--criu", "/opt/criu", "restore", "--image-path", I, "--work-path", W,
                       "--parent-path", "/parent", "--detach", "--pid-file", str(tmp_path / "pid"),
                       "--no-subreaper", "--console-socket", "/sock", "--no-pivot", "--bundle", "/bundle", "c1"]


def test_without_criu_path_runc_finds_criu_itself(tmp_path: Path) -> None:
    async def scenario(monitor: Monitor) -> list[str]:
        await Runc(monitor, binary=_recording_runc(tmp_path), root="/state").checkpoint("c1", [])
        return (tmp_path / "args").read_text().splitlines()

    assert "--criu" not in run(scenario)


def test_criu_check_passes(tmp_path: Path) -> None:
    path = _script(tmp_path / "criu", 'test "$1" = check && echo "Looks good."')
    assert run(lambda monitor: criu.require(monitor, path)) == path


def test_a_failing_criu_check_is_failed_precondition_quoting_it(tmp_path: Path) -> None:
    path = _script(tmp_path / "criu", "echo 'Error (criu/cr-check.c:1): vdso: Failed to fill self vdso symtable' >&2\n"
                                      "echo 'Looks bad.' >&2\nexit 1\n")
    with pytest.raises(errdefs.FailedPrecondition, match=r"criu check failed \(.*/criu\): Error .*vdso.*\nLooks bad"):
        run(lambda monitor: criu.require(monitor, path))


def test_a_criu_path_that_is_no_executable_is_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match="needs criu: criu_path '.*/absent' is not an executable"):
        run(lambda monitor: criu.require(monitor, str(tmp_path / "absent")))


def test_no_criu_on_path_is_failed_precondition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(errdefs.FailedPrecondition, match="needs criu: 'criu' not found in PATH"):
        run(lambda monitor: criu.require(monitor, ""))
    _script(tmp_path / "criu", "exit 0")
    assert run(lambda monitor: criu.require(monitor, "")) == os.path.join(tmp_path, "criu")


def test_criu_log_excerpt(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("".join(f"(0.{i:04d}) step {i}\n" for i in range(100)))
    assert criu.log_excerpt(str(log), 3) == "(0.0097) step 97\n(0.0098) step 98\n(0.0099) step 99"
    errors = ["(0.0200) Error (criu/sk-inet.c:1): inet: Connected TCP socket, consider using --tcp-established option.",
              "(0.0300) Error (criu/cr-dump.c:2): Dumping FAILED."]
    log.write_text("(0.0100) step\n" + errors[0] + "\n(0.0250) Unfreezing tasks\n" + errors[1] + "\n(0.0301) end\n")
    assert criu.log_excerpt(str(log)) == "\n".join(errors)
    assert criu.log_excerpt(str(tmp_path / "absent")) == ""
