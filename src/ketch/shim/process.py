"""Process lifecycle: every state a task or exec process can be in, and every legal move.

Everything that changes a process's state goes through :meth:`Process.transition`, checked
against the table below; an illegal operation raises FailedPrecondition naming the state.

    created ──start──▶ running ──pause──▶ paused
       │                 │  ▲──resume──────┘ │
       │                exit                exit
       │                 ▼                   │
       ├─────exit──────▶ stopped ◀───────────┘
       │                 │
       └─────delete────▶ deleted ◀──delete──┘

Operations that do not move the state (kill, resize, close_io, update, exec) are allowed
only in the states listed in ``ALLOWED``.
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
}


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

    def record_exit(self, status: int) -> None:
        self.transition("exit")
        self.exit_status = status
        self.exited_at = time.time()

    @property
    def running(self) -> bool:
        return self.state in (State.RUNNING, State.PAUSED)
