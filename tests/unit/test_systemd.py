"""ketch.systemd: what systemd hands a service (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*), the notify
datagrams on a real socket, and the relay that serves an inherited listening socket."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

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


class _Echo:
    """An upstream that answers every chunk with the chunk upper-cased."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data.upper())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_relay_joins_the_inherited_socket_to_the_server_and_leaves_it_listening(tmp_path: Path) -> None:
    echo = _Echo(str(tmp_path / "upstream"))
    inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited.bind(str(tmp_path / "public"))
    inherited.listen()
    relay = systemd.Relay(socket.socket(fileno=os.dup(inherited.fileno())), str(tmp_path / "upstream"))
    relay.start()
    clients: list[socket.socket] = []
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(client)
        client.settimeout(10)
        client.connect(str(tmp_path / "public"))
        payload = b"ketch" * 300_000  # more than a socket buffer and a pipe hold
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            got += client.recv(1 << 16)
        sender.join()
        assert bytes(got) == payload.upper()

        relay.close()  # ketchd stops: its connections end, the inherited socket listens on
        assert client.recv(10) == b""
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(late)
        late.settimeout(10)
        late.connect(str(tmp_path / "public"))  # waits in the backlog for the next ketchd
        late.sendall(b"hello")
        again = systemd.Relay(socket.socket(fileno=os.dup(inherited.fileno())), str(tmp_path / "upstream"))
        again.start()
        assert late.recv(10) == b"HELLO"
        again.close()
        assert os.path.exists(tmp_path / "public")
    finally:
        for c in clients:
            c.close()
        inherited.close()
        echo.close()
