"""The keeper's bookkeeping and wire format, with real sockets and fds (no fork, no root)."""

from __future__ import annotations

import os
import socket

import pytest

from ketch.shim import keeper


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_messages_carry_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    shim, kept = pair
    r, w = os.pipe()
    keeper.send(shim, {"op": "put", "key": "p/c/-", "data": {"pid": 7}, "fds": ["out.r"]}, [r])
    message, fds = keeper.receive(kept)
    assert message == {"op": "put", "key": "p/c/-", "data": {"pid": 7}, "fds": ["out.r"]}
    assert len(fds) == 1 and fds[0] != r
    os.write(w, b"x")
    assert os.read(fds[0], 1) == b"x", "the keeper's copy reads the same pipe"
    for fd in (r, w, fds[0]):
        os.close(fd)
    shim.close()
    assert keeper.receive(kept) == (None, [])


def test_put_replaces_and_drop_closes_a_key_and_what_is_below(pair: tuple[socket.socket, socket.socket]) -> None:
    k = keeper.Keeper(pair[1], shim_pid=0)
    first, second, other = os.pipe(), os.pipe(), os.pipe()
    k.handle({"op": "put", "key": "p/c/-", "data": {"state": 2}, "fds": ["out.r"]}, [first[0]])
    k.handle({"op": "put", "key": "p/c/-", "data": {"state": 3}, "fds": ["out.r"]}, [second[0]])
    assert not _open(first[0]) and _open(second[0]), "a put closes what the key held before"
    k.handle({"op": "put", "key": "p/c/e1", "data": {}, "fds": ["in.w"]}, [other[1]])
    k.handle({"op": "put", "key": "c/c", "data": {"bundle": "/b"}, "fds": []}, [])
    assert k.records["p/c/-"].data == {"state": 3} and set(k.records) == {"p/c/-", "p/c/e1", "c/c"}
    k.handle({"op": "drop", "key": "p/c"}, [])
    assert set(k.records) == {"c/c"} and not _open(second[0]) and not _open(other[1])
    for fd in (first[1], second[1], other[0]):
        os.close(fd)


def test_exits_are_kept_until_acknowledged(pair: tuple[socket.socket, socket.socket]) -> None:
    k = keeper.Keeper(pair[1], shim_pid=0)
    k.exits[41] = (7, 1700000000.0)
    k.exits[42] = (0, 1700000001.0)
    k.handle({"op": "ack", "pid": 41}, [])
    assert k.exits == {42: (0, 1700000001.0)}
    k.handle({"op": "bye"}, [])
    assert not k._shim_died(0), "after bye, the shim's exit ends the group"


def test_a_shim_that_keeps_dying_is_given_up(pair: tuple[socket.socket, socket.socket]) -> None:
    k = keeper.Keeper(pair[1], shim_pid=0)
    assert all(k._shim_died(137) for _ in range(keeper.MAX_RESTARTS))
    assert not k._shim_died(137)
    assert k.generation == keeper.MAX_RESTARTS
