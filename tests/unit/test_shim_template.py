"""The shim template (ketch.shim.template): its wire format, a real template forking a child
(no root needed), and ``start`` falling back to spawning when the template fails."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ketch import templatewire
from ketch.runtime.shim import Launcher, ShimParams
from ketch.shim import launch, main, template


# --- wire format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [["ping"], ["spawn", "", "é", "a=b=c"], ["x" * 1000, "y"]])
def test_messages_round_trip(fields: list[str]) -> None:
    data = templatewire.encode(fields)
    assert data[:4] == templatewire.MAGIC
    assert templatewire.decode_header(data[:8]) == len(data) - 8
    assert templatewire.decode_body(data[8:]) == fields


def test_bad_messages_are_refused() -> None:
    with pytest.raises(ValueError):
        templatewire.encode(["a\0b"])
    with pytest.raises(ValueError):
        templatewire.encode(["x" * (templatewire.MESSAGE_MAX + 1)])
    with pytest.raises(templatewire.TemplateError):
        templatewire.decode_header(b"HTTP/1.1")
    with pytest.raises(templatewire.TemplateError):
        templatewire.decode_header(templatewire.MAGIC + (templatewire.MESSAGE_MAX + 1).to_bytes(4, "big"))
    with pytest.raises(templatewire.Refused, match="nope"):
        templatewire.answer(["error", "nope"])
    assert templatewire.answer(["ok", "unix:///x"]) == "unix:///x"


def test_spawn_request_round_trips() -> None:
    args, env = ["-namespace", "ns", "-id", "a b"], {"A": "1", "B": "x=y", "EMPTY": ""}
    fields = template.spawn_request(args, env, "/bundle", 0o027)
    assert fields[:3] == ["spawn", sys.executable, template.__version__]
    assert template.parse_spawn(fields) == ("/bundle", 0o027, args, env)
    start = templatewire.start_request([*args, "start"], env, "/b", 0o022, b"\x01opt")
    assert start[:2] == ["start", "016f7074"]
    assert templatewire.parse_call(start[2:]) == ("/b", 0o022, [*args, "start"], env)


@pytest.mark.parametrize("fields", [
    ["spawn", "py", "v", "/b", "22", "5", "-a"],  # more args announced than sent
    ["spawn", "py", "v", "/b", "9z", "0"],  # umask not octal
    ["spawn", "py", "v", "", "22", "0"],  # no cwd
    ["spawn", "py", "v", "/b", "22", "0", "NOEQUALS"],
    ["spawn", "py", "v"],
])
def test_malformed_spawn_requests(fields: list[str]) -> None:
    with pytest.raises(templatewire.TemplateError):
        template.parse_spawn(fields)


# --- a real template -----------------------------------------------------------------------------

#: a template whose children report what they became instead of running the server
TEMPLATE = textwrap.dedent("""
    import json, os, signal, socket, sys
    from ketch.shim import template

    path = sys.argv[1]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
        s.close()
    else:
        s.detach()
    # what a fork must not pass on to the server
    signal.signal(signal.SIGTERM, lambda *a: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    os.umask(0o077)

    def entry(args):
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f)
        info = {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
                "umask": os.umask(0), "env": dict(os.environ), "argv": sys.argv[1:],
                "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
                "fd3": socket.socket(fileno=3).getsockname(),
                "stdin": os.readlink("/proc/self/fd/0"),
                "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "blocked": status["SigBlk"].strip(), "template": __import__("ketch.shim.server").shim.server.ORIGIN}
        with open(os.path.join(os.environ["OUT"], "info.json"), "w") as f:
            json.dump(info, f)
        return 0

    template.IDLE_CHECK = 0.1
    sys.exit(template.serve(path, entry))
""")


@pytest.fixture
def running_template(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    path = str(tmp_path / "t.sock")
    proc = subprocess.Popen([sys.executable, "-c", TEMPLATE, path])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert template.ping(path) == proc.pid
                break
            except templatewire.TemplateError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def _wait_for(path: Path) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.stat().st_size:
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)
    time.sleep(0.05)
    info: dict[str, object] = json.loads(path.read_text())
    return info


def test_a_forked_child_becomes_what_exec_would_make(running_template: tuple[str, subprocess.Popen[bytes]],
                                                    tmp_path: Path) -> None:
    path, proc = running_template
    served = str(tmp_path / "served.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(served)
    listener.listen(1)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    old = os.umask(0o022)
    try:
        pid = template.spawn(path, ["-namespace", "ns", "-id", "a"], {"OUT": str(bundle), "X": "1"},
                             str(bundle), listener.fileno(), timeout=10)
    finally:
        os.umask(old)
        listener.close()
    info = _wait_for(bundle / "info.json")
    assert info["pid"] == pid and info["ppid"] != proc.pid and info["sid"] == pid
    assert info["cwd"] == str(bundle) and info["umask"] == 0o022
    assert info["env"] == {"OUT": str(bundle), "X": "1"}
    assert info["argv"] == ["-namespace", "ns", "-id", "a"]
    assert info["fds"][:4] == [0, 1, 2, 3] and info["fd3"] == served and info["stdin"] == "/dev/null"  # type: ignore[index]
    assert set(info["fds"]) <= {0, 1, 2, 3, 4, 5}, info["fds"]  # nothing of the template's # type: ignore[arg-type]
    assert info["sigterm"] and int(str(info["blocked"]), 16) == 0
    assert info["template"] == f"forked from template {proc.pid}"
    assert proc.poll() is None  # the template goes on


def _ask(path: str, fields: list[str]) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        template.send(sock, fields)
        return templatewire.answer(template.receive(sock))
    finally:
        sock.close()


def test_the_template_runs_start_itself(running_template: tuple[str, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """ketchd's way: the template does what ``containerd-shim-ketch-v2 … start`` would, and
    forks the server from itself."""
    path, proc = running_template
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    env = {"OUT": str(bundle), "KETCH_SHIM_STATE_DIR": str(tmp_path / "st"), "KETCH_SHIM_GROUP": "g"}
    argv = ["-namespace", "ns", "-id", "a", "-address", "/x/d.sock", "start"]
    url = _ask(path, templatewire.start_request(argv, env, str(bundle), 0o022, b"\x08\x01"))
    assert url.startswith(f"unix://{tmp_path}/st/s/")
    assert (bundle / "address").read_text() == url
    info = _wait_for(bundle / "info.json")
    assert int((bundle / "shim.pid").read_text()) == info["pid"] and info["ppid"] != proc.pid
    assert info["fd3"] == url.removeprefix("unix://") and info["cwd"] == str(bundle)
    assert info["argv"] == ["-namespace", "ns", "-id", "a", "-address", "/x/d.sock", "-bundle", str(bundle)]
    assert info["env"] == {**env, "KETCH_SHIM_LINGER": str(launch.SHARED_LINGER), "KETCH_SHIM_OPTIONS": "0801"}
    # start's own rules answer for it: a group has one address; flags are checked
    assert _ask(path, templatewire.start_request(argv, env, str(bundle), 0o022, b"")) == url
    with pytest.raises(templatewire.Refused, match="start needs -namespace"):
        _ask(path, templatewire.start_request(["start"], env, str(bundle), 0o022, b""))
    assert proc.poll() is None


def test_the_template_exits_once_its_socket_is_gone(running_template: tuple[str, subprocess.Popen[bytes]]) -> None:
    path, proc = running_template
    time.sleep(0.3)  # a few idle checks
    assert template.ping(path, timeout=10) == proc.pid
    os.unlink(path)
    assert proc.wait(timeout=10) == 0


def test_the_template_refuses_other_code_and_exits_when_asked(running_template: tuple[str, subprocess.Popen[bytes]]) -> None:
    path, proc = running_template
    with pytest.raises(templatewire.Refused, match="not /other/python"):
        template._call(path, ["ping", "/other/python", template.__version__])
    with pytest.raises(templatewire.Refused, match="exactly one socket"):
        template._call(path, template.spawn_request([], {}, "/", 0o22))
    assert template.stop(path) == proc.pid
    assert proc.wait(timeout=10) == 0


# --- start: the template, else spawning -----------------------------------------------------------

@pytest.fixture
def start_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[list[str]]]]:
    """``main.start`` with its spawning recorded instead of done."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spawned: list[list[str]] = []

    def fake_spawn(argv: list[str], env: dict[str, str], sock: socket.socket) -> int:
        spawned.append(argv)
        return 4242

    monkeypatch.setattr(launch, "spawn_process", fake_spawn)
    monkeypatch.setenv("KETCH_SHIM_STATE_DIR", str(tmp_path / "st"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    yield bundle, spawned


def _start(bundle: Path) -> int:
    assert main.start({"namespace": "ns", "id": "a", "address": "/x/d.sock", "bundle": str(bundle)}) == 0
    return int((bundle / "shim.pid").read_text())


def test_start_without_a_template_spawns(start_env: tuple[Path, list[list[str]]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, spawned = start_env
    monkeypatch.delenv(template.ENV, raising=False)
    assert _start(bundle) == 4242
    assert spawned and spawned[0][1:4] == ["-I", "-m", "ketch.shim"]


def test_start_falls_back_when_no_template_answers(start_env: tuple[Path, list[list[str]]],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle, spawned = start_env
    monkeypatch.setenv(template.ENV, str(tmp_path / "nobody.sock"))
    assert _start(bundle) == 4242 and len(spawned) == 1
    assert "spawning the server" in capsys.readouterr().err


#: a template that answers one request with argv[2] (JSON; null: not at all) and writes what it
#: got into argv[3]
FAKE = textwrap.dedent("""
    import json, os, socket, sys, time
    from ketch.shim import template

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sys.argv[1])
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    fds = []
    fields = template.receive(conn, fds)
    with open(sys.argv[3], "w") as f:
        json.dump({"fields": fields, "fds": len(fds)}, f)
    answer = json.loads(sys.argv[2])
    if answer is None:
        time.sleep(template.TIMEOUT + 0.5)
    else:
        template.send(conn, answer)
""")


@contextlib.contextmanager
def _fake_template(path: str, answer: list[str] | None, seen: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", FAKE, path, json.dumps(answer), str(seen)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("answer", [["error", "nope"], ["ok", "not-a-pid"], [], None])
def test_start_falls_back_when_the_template_refuses(start_env: tuple[Path, list[list[str]]],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    answer: list[str] | None) -> None:
    bundle, spawned = start_env
    path = str(tmp_path / "t.sock")
    monkeypatch.setenv(template.ENV, path)
    with _fake_template(path, answer, tmp_path / "seen.json"):
        started = time.monotonic()
        assert _start(bundle) == 4242 and len(spawned) == 1
        assert time.monotonic() - started < template.TIMEOUT + 5  # bounded (with room for a loaded machine)


def test_start_uses_the_template_s_pid(start_env: tuple[Path, list[list[str]]], monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    bundle, spawned = start_env
    path = str(tmp_path / "t.sock")
    monkeypatch.setenv(template.ENV, path)
    monkeypatch.setenv("KETCH_SHIM_GROUP", "ns")
    # a template slower than its 1 s is done without (the tests above): here a loaded machine
    # must not make the fake one that slow
    monkeypatch.setattr(template.spawn, "__defaults__", (30.0,))
    with _fake_template(path, ["ok", "777"], tmp_path / "seen.json"):
        assert _start(bundle) == 777 and not spawned
    seen = json.loads((tmp_path / "seen.json").read_text())
    cwd, _umask, args, env = template.parse_spawn(seen["fields"])
    assert cwd == str(bundle) and args[:4] == ["-namespace", "ns", "-id", "a"]
    assert env["KETCH_SHIM_LINGER"] == str(launch.SHARED_LINGER) and template.ENV not in env
    assert seen["fds"] == 1  # the listening socket, and only it
    sock = next((tmp_path / "st" / "s").iterdir())
    assert (bundle / "address").read_text() == f"unix://{sock}"



# --- ketchd's side: the runtime's Launcher -------------------------------------------------------

def _launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Launcher, str, list[int]]:
    """A Launcher whose template is at tmp_path/t.sock, for a shim binary that prints an address
    when executed; relaunches of the template are counted, not done."""
    binary = tmp_path / "containerd-shim-ketch-v2"
    binary.write_text("#!/bin/sh\necho unix:///executed.sock\n")
    binary.chmod(0o755)
    launcher = Launcher(ShimParams(grpc_address="/x/d.sock", ttrpc_address="/x/d.sock.ttrpc", publish_binary="/x/ketchd",
                                   template_socket=str(tmp_path / "t.sock")))
    launched: list[int] = []

    async def start_template() -> None:
        launched.append(1)

    monkeypatch.setattr(launcher, "start_template", start_template)
    launcher.template_binary = str(binary)
    return launcher, str(binary), launched


def test_ketchd_executes_start_when_the_template_is_gone_and_starts_one_anew(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    launcher, binary, launched = _launcher(tmp_path, monkeypatch)

    async def main() -> str:
        address = await launcher.start(binary, "ns", "a", str(tmp_path), b"", group="ns")
        await asyncio.sleep(0)
        return address

    assert asyncio.run(main()) == "unix:///executed.sock"
    assert launched == [1] and launcher.template_binary == ""  # executes until the new one is up


def test_ketchd_has_the_template_run_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launcher, binary, launched = _launcher(tmp_path, monkeypatch)
    seen: list[list[str]] = []

    async def main() -> str:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            header = await reader.readexactly(templatewire.HEADER.size)
            seen.append(templatewire.decode_body(await reader.readexactly(templatewire.decode_header(header))))
            writer.write(templatewire.encode(["ok", "unix:///forked.sock"]))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, str(tmp_path / "t.sock"))
        async with server:
            return await launcher.start(binary, "ns", "a", str(tmp_path), b"\x08\x01", group="ns")

    assert asyncio.run(main()) == "unix:///forked.sock" and not launched
    cwd, _umask, argv, env = templatewire.parse_call(seen[0][2:])
    assert seen[0][:2] == ["start", "0801"] and cwd == str(tmp_path)
    assert argv == ["-namespace", "ns", "-address", "/x/d.sock", "-publish-binary", "/x/ketchd", "-id", "a", "start"]
    assert env["TTRPC_ADDRESS"] == "/x/d.sock.ttrpc" and env["KETCH_SHIM_GROUP"] == "ns"
