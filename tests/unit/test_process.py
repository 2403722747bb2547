"""The process transition table (shim/process.py), without any process running."""

from __future__ import annotations

import pytest

from ketch import errdefs
from ketch.shim import process
from ketch.shim.process import KILLED, Process, State
from ketch.shim.stdio import Stdio


def test_the_docstring_draws_the_table() -> None:
    assert process.__doc__ is not None
    assert process.diagram() in process.__doc__


@pytest.mark.parametrize(
    ("state", "op"),
    [(State.CREATED, "pause"), (State.CREATED, "resume"), (State.RUNNING, "start"), (State.RUNNING, "delete"),
     (State.PAUSED, "start"), (State.PAUSED, "delete"), (State.STOPPED, "start"), (State.STOPPED, "pause"),
     (State.DELETED, "delete")],
)
def test_illegal_moves_name_the_state(state: State, op: str) -> None:
    p = Process("c1", "", Stdio(), state=state)
    with pytest.raises(errdefs.FailedPrecondition, match=f"in {state.name.lower()} state"):
        p.transition(op)
    assert p.state == state


@pytest.mark.parametrize(
    ("state", "op", "after"),
    [(State.CREATED, "start", State.RUNNING), (State.RUNNING, "pause", State.PAUSED),
     (State.PAUSED, "resume", State.RUNNING), (State.RUNNING, "exit", State.STOPPED),
     (State.PAUSED, "exit", State.STOPPED), (State.CREATED, "exit", State.STOPPED),
     (State.STOPPED, "delete", State.DELETED), (State.CREATED, "delete", State.DELETED)],
)
def test_legal_moves(state: State, op: str, after: State) -> None:
    p = Process("c1", "", Stdio(), state=state)
    p.transition(op)
    assert p.state == after


def test_kill_of_a_stopped_process_is_not_found() -> None:
    p = Process("c1", "e1", Stdio(), state=State.STOPPED)
    with pytest.raises(errdefs.NotFound, match="already finished"):
        p.check("kill")


@pytest.mark.parametrize("op", ["kill", "resize", "close_io"])
@pytest.mark.parametrize("pid", [0, -1])
def test_an_exec_without_a_pid_is_never_signalled(op: str, pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill(0, sig) would signal the shim's own process group: refused before any syscall."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr("os.kill", lambda p, s: sent.append((p, s)))
    p = Process("c1", "e1", Stdio(), state=State.CREATED, pid=pid)
    with pytest.raises(errdefs.FailedPrecondition, match="not started"):
        p.check(op)
    with pytest.raises(errdefs.FailedPrecondition, match="not started"):
        p.signal(9)
    assert sent == []


def test_an_exit_records_status_and_time() -> None:
    p = Process("c1", "", Stdio(), state=State.RUNNING, pid=42)
    assert p.record_exit(3)
    assert (p.state, p.exit_status) == (State.STOPPED, 3)
    assert p.exited_at > 0
    assert not p.exited.is_set()  # Waits answer once TaskExit is queued: mark_exited()


def test_an_exit_after_delete_is_not_recorded() -> None:
    p = Process("c1", "", Stdio(), state=State.CREATED, pid=42)
    p.delete()
    status, at = p.exit_status, p.exited_at
    assert not p.record_exit(0)
    assert (p.state, p.exit_status, p.exited_at) == (State.DELETED, status, at)


def test_deleting_a_created_init_means_it_was_killed() -> None:
    """runc delete --force kills the runc init that waits for start: 137, and Waits end."""
    p = Process("c1", "", Stdio(), state=State.CREATED, pid=42)
    p.delete()
    assert (p.state, p.exit_status) == (State.DELETED, KILLED)
    assert p.exited_at > 0
    assert p.exited.is_set()


def test_deleting_a_stopped_process_keeps_its_exit() -> None:
    p = Process("c1", "e1", Stdio(), state=State.RUNNING, pid=42)
    p.record_exit(7)
    p.delete()
    assert (p.state, p.exit_status) == (State.DELETED, 7)


def test_deleting_an_exec_that_never_started_kills_nothing() -> None:
    p = Process("c1", "e1", Stdio())
    p.delete()
    assert (p.state, p.exit_status, p.exited_at) == (State.DELETED, 0, 0.0)


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED])
def test_a_live_process_cannot_be_deleted(state: State) -> None:
    p = Process("c1", "", Stdio(), state=state, pid=42)
    with pytest.raises(errdefs.FailedPrecondition, match=f"cannot delete task c1 in {state.name.lower()} state"):
        p.delete()
    assert p.state == state
