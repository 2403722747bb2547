"""ketch.systemd: what systemd hands a service (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*), the notify
datagrams on a real socket, and a grpc server serving an inherited listening socket."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ketch import systemd


def test_notify_socket_forms() -> None:
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    for unusable in (None, "", "@", "relative/path", "vsock:2:1234"):
        assert systemd.notify_address(unusable) is None, unusable


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    assert systemd.watchdog_interval("3000000", None, 42) == 1.5
    assert systemd.watchdog_interval("200000", "42", 42) == 0.1
    assert systemd.watchdog_interval("200000", "43", 42) is None  # meant for another process
    for usec, pid in (("0", None), ("-5", None), ("soon", None), (None, None), ("", None), ("200000", "me")):
        assert systemd.watchdog_interval(usec, pid, 42) is None, (usec, pid)


def test_listen_fds_from_three_with_their_names() -> None:
    assert systemd.listen_fds("42", "1", None, 42) == [(3, "unknown")]
    assert systemd.listen_fds("42", "2", "grpc:debug", 42) == [(3, "grpc"), (4, "debug")]
    assert systemd.listen_fds("42", "2", "only-one", 42) == [(3, "unknown"), (4, "unknown")]
    assert systemd.listen_fds("41", "1", None, 42) == []  # passed to our parent: not ours
    for pid, n in ((None, "1"), ("42", None), ("42", "0"), ("42", "-1"), ("x", "1"), ("42", "two")):
        assert systemd.listen_fds(pid, n, None, 42) == [], (pid, n)


def test_take_reads_and_removes_what_systemd_set() -> None:
    env = {"NOTIFY_SOCKET": "@ketch", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7", "LISTEN_PID": "7",
           "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ketchd.socket", "PATH": "/usr/bin"}
    sd = systemd.take(env, pid=7)
    assert (sd.address, sd.watchdog, sd.sockets) == (b"\0ketch", 0.5, [(3, "ketchd.socket")])
    assert env == {"PATH": "/usr/bin"}  # nothing ketchd starts inherits them
    nothing = systemd.take({"PATH": "/usr/bin"}, pid=7)
    assert (nothing.address, nothing.watchdog, nothing.sockets) == (None, None, [])
    nothing.notify("READY=1")  # a no-op


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_notify_sends_one_datagram_to_a_path(receiver: socket.socket) -> None:
    sd = systemd.take({"NOTIFY_SOCKET": receiver.getsockname()})
    sd.notify("READY=1", "STATUS=serving")
    sd.notify("STOPPING=1")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"
    assert receiver.recv(4096) == b"STOPPING=1"
    sd.close()


def test_notify_sends_to_an_abstract_socket() -> None:
    name = f"ketch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        sd = systemd.take({"NOTIFY_SOCKET": "@" + name})
        sd.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
        sd.close()
    finally:
        sock.close()


def test_notify_to_nobody_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = systemd.take({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, "ketchd.systemd"):
        sd.notify("READY=1")
    assert "cannot notify systemd (READY=1)" in caplog.text
    sd.close()


def test_grpc_listener_is_the_listening_unix_stream_socket(tmp_path: Path) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "grpc.sock"))
    listener.listen()
    dup = os.dup(listener.fileno())
    try:
        sd = systemd.Systemd(sockets=[(other.fileno(), "debug"), (dup, "grpc")])
        chosen = sd.grpc_listener()
        assert chosen is not None and chosen.fileno() == dup
        assert systemd.socket_path(chosen) == str(tmp_path / "grpc.sock")
        assert not chosen.get_inheritable()
        os.fstat(other.fileno())  # the other socket is left alone, open
        chosen.close()
    finally:
        other.close()
        listener.close()


def _pong(request: bytes, context: object) -> bytes:
    return b"pong:" + request


def _server(adoption: systemd.Adoption) -> grpc.aio.Server:
    server = grpc.aio.server(options=[adoption.channel_option()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ketch.Test", {"Ping": grpc.unary_unary_rpc_method_handler(_pong)}),))
    assert server.add_insecure_port(adoption.address) == -1  # no port: connections come from us
    return server


async def _ping(path: str, payload: bytes) -> bytes:
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        result: bytes = await channel.unary_unary("/ketch.Test/Ping")(payload, timeout=10)
        return result


def test_adoption_serves_grpc_on_the_inherited_socket_and_leaves_it_listening(tmp_path: Path) -> None:
    path = str(tmp_path / "public")
    inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited.bind(path)
    inherited.listen()
    inode = os.stat(path).st_ino

    async def run() -> None:
        adoption = systemd.Adoption(socket.socket(fileno=os.dup(inherited.fileno())))
        server = _server(adoption)
        await server.start()
        adoption.start()
        assert await _ping(path, b"one") == b"pong:one"
        results = await asyncio.gather(*(_ping(path, str(i).encode() * 100_000) for i in range(5)))
        assert results == [b"pong:" + str(i).encode() * 100_000 for i in range(5)]
        await adoption.stop()
        await server.stop(None)
        # ketchd is gone; the socket is not: a client calling now waits in its backlog
        waiting = asyncio.ensure_future(_ping(path, b"waited"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        again = systemd.Adoption(socket.socket(fileno=os.dup(inherited.fileno())))
        server = _server(again)
        await server.start()
        again.start()
        assert await waiting == b"pong:waited"
        assert await _ping(path, b"two") == b"pong:two"
        await again.stop()
        await server.stop(None)

    try:
        asyncio.run(run())
        assert os.stat(path).st_ino == inode
    finally:
        inherited.close()


def test_adoption_refuses_a_handler_it_does_not_know(tmp_path: Path) -> None:
    """Before calling into grpc's core, the handler's C++ run-time type is checked: nothing
    there, or an object of another type, is refused."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    adoption = systemd.Adoption(listener)
    try:
        with pytest.raises(OSError, match="made no handler"):
            adoption.start()
        # a C++ object as the ABI lays it out: its vtable pointer, the vtable's type_info before it
        name = ctypes.create_string_buffer(b"N4some5OtherE")
        type_info = (ctypes.c_void_p * 2)(0, ctypes.addressof(name))
        vtable = (ctypes.c_void_p * 4)(ctypes.addressof(type_info), 0, 0, 0)
        obj = ctypes.c_void_p(ctypes.addressof(vtable) + ctypes.sizeof(ctypes.c_void_p))
        option = adoption.channel_option()[1]
        ctypes.c_void_p.from_address(int(option)).value = ctypes.addressof(obj)
        with pytest.raises(OSError, match="N4some5OtherE"):
            adoption.start()
    finally:
        listener.close()
