"""Process lifecycle: every state a task or exec process can be in, and every legal move.

Everything that changes a process's state lives here: a move is made only by
:meth:`Process.transition` (through :meth:`Process.record_exit` and :meth:`Process.delete`,
which also set what the move means: the exit status and time), checked against
``TRANSITIONS``; an illegal operation raises FailedPrecondition naming the state. The table,
as :func:`diagram` renders it (tests/unit/test_process.py keeps this copy in step)::

    created ──start───▶ running
    created ──exit────▶ stopped
    created ──delete──▶ deleted
    running ──pause───▶ paused
    running ──exit────▶ stopped
    paused  ──resume──▶ running
    paused  ──exit────▶ stopped
    stopped ──delete──▶ deleted

    kill        allowed in created, running, paused
    resize      allowed in created, running, paused
    close_io    allowed in created, running, stopped, paused
    update      allowed in created, running, paused
    exec        allowed in created, running, paused
    stats       allowed in created, running, paused
    checkpoint  allowed in running, paused

Operations that do not move the state (kill, resize, close_io, update, exec, stats,
checkpoint) are allowed only in the states listed in ``ALLOWED``; kill, resize and close_io
also need a pid.

Two moves carry a meaning besides the state:
* ``delete`` of a created process that has a pid (the init, whose ``runc init`` waits for
  start): ``runc delete --force`` killed it, so its exit status is 137 (SIGKILL), as
  containerd's runc shim reports; Waits on it end.
* an exit reaped after ``delete`` changes nothing: the process is gone and its exit is not
  reported (:meth:`Process.record_exit` returns False).
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from dataclasses import dataclass, field

from ketch import errdefs
from ketch.shim.stdio import ProcessIO, Stdio


class State(enum.IntEnum):
    """Values are containerd.v1.types.Status numbers, so they go on the wire as they are."""

    UNKNOWN = 0  #: never reported for a process the shim knows
    CREATED = 1  #: runc create done, the user program not started
    RUNNING = 2  #: started and not yet reaped
    STOPPED = 3  #: exited; the status is known and the output drained
    PAUSED = 4  #: frozen
    DELETED = 100  #: gone from the shim; never reported (not a containerd status)


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CREATED, "start"): State.RUNNING,
    (State.CREATED, "exit"): State.STOPPED,
    (State.CREATED, "delete"): State.DELETED,
    (State.RUNNING, "pause"): State.PAUSED,
    (State.RUNNING, "exit"): State.STOPPED,
    (State.PAUSED, "resume"): State.RUNNING,
    (State.PAUSED, "exit"): State.STOPPED,
    (State.STOPPED, "delete"): State.DELETED,
}

ALLOWED: dict[str, frozenset[State]] = {
    "kill": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "resize": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "close_io": frozenset({State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED}),
    "update": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "exec": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "stats": frozenset({State.CREATED, State.RUNNING, State.PAUSED}),
    "checkpoint": frozenset({State.RUNNING, State.PAUSED}),
}


#: the exit status of a process that ``runc delete --force`` killed before it started
KILLED = 128 + 9

#: operations that act on the running program: refused while the process has no pid yet (an
#: exec added but not started, or whose start failed), so nothing is ever signalled by pid 0
NEEDS_PID = frozenset({"kill", "resize", "close_io"})


def _describe(state: State) -> str:
    return state.name.lower()


@dataclass(eq=False)
class Process:
    """One process of a task: the init process (``exec_id == ""``) or an exec."""

    container_id: str
    exec_id: str
    stdio: Stdio
    state: State = State.CREATED
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    io: ProcessIO | None = None
    #: the OCI process spec of an exec (JSON), kept until it starts
    spec: bytes = b""
    #: serializes start and exit so TaskStart/TaskExecStarted always precede TaskExit
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: set once the exit is recorded, the output drained and TaskExit queued
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        """The id events carry: the exec id, or the container id for the init process."""
        return self.exec_id or self.container_id

    @property
    def kind(self) -> str:
        return "exec process" if self.exec_id else "task"

    def require(self, op: str) -> None:
        """Raise unless ``op`` is a legal move from the current state (without moving)."""
        if (self.state, op) not in TRANSITIONS:
            raise self._refuse(op)

    def transition(self, op: str) -> None:
        self.require(op)
        self.state = TRANSITIONS[(self.state, op)]

    def check(self, op: str) -> None:
        if self.state not in ALLOWED[op]:
            if op == "kill" and self.state == State.STOPPED:
                raise errdefs.NotFound(f"{self.kind} {self.id}: process already finished")
            raise self._refuse(op)
        if op in NEEDS_PID and self.pid <= 0:
            raise errdefs.FailedPrecondition(f"{self.kind} {self.id}: process not started")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process alone: never with a pid that kill(2) would read as a
        process group (0 is the shim's own group, negative ones are groups too)."""
        self.check("kill")
        if self.pid <= 0:  # check() refuses this; kept so no later change can signal a group
            raise errdefs.FailedPrecondition(f"{self.kind} {self.id}: process not started")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise errdefs.NotFound(f"{self.kind} {self.id}: process already finished") from None

    def _refuse(self, op: str) -> errdefs.FailedPrecondition:
        return errdefs.FailedPrecondition(
            f"cannot {op.replace('_', ' ')} {self.kind} {self.id} in {_describe(self.state)} state"
        )

    def record_exit(self, status: int, at: float | None = None) -> bool:
        """Move to stopped with exit ``status`` (reaped at ``at``, default now); False (and
        nothing changes) when the process was deleted already, whose exit is then not reported."""
        if self.state == State.DELETED:
            return False
        self.transition("exit")
        self.exit_status = status
        self.exited_at = time.time() if at is None else at
        return True

    def delete(self) -> None:
        """Move to deleted (see the module docstring for a created process with a pid). Every
        Wait on it ends: also for an exec that never ran (status 0, as containerd answers)."""
        killed = self.state == State.CREATED and self.pid > 0
        self.transition("delete")
        if killed:
            self.exit_status, self.exited_at = KILLED, time.time()
        self.mark_exited()

    def mark_exited(self) -> None:
        """Let Waits answer: the exit is recorded, the output drained and TaskExit queued (or
        the process was deleted). The one place that sets ``exited``."""
        self.exited.set()

    @property
    def running(self) -> bool:
        return self.state in (State.RUNNING, State.PAUSED)


def diagram() -> str:
    """The docstring's picture of ``TRANSITIONS`` and ``ALLOWED``."""
    width = max(len(_describe(s)) for s in State)
    op_width = max(len(op) for _, op in TRANSITIONS) + 2
    lines = [
        f"    {_describe(a):<{width}} ──{op + '─' * (op_width - len(op))}▶ {_describe(b)}"
        for (a, op), b in TRANSITIONS.items()
    ]
    lines.append("")
    op_width = max(len(op) for op in ALLOWED) + 2
    lines += [
        f"    {op:<{op_width}}allowed in {', '.join(_describe(s) for s in State if s in states)}"
        for op, states in ALLOWED.items()
    ]
    return "\n".join(lines)
