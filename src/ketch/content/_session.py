"""One Content.Write stream, as containerd's content service runs it, without gRPC.

The first message must name the ingest ``ref``; it opens (or resumes) the writer. Every
message then does its action and is answered with the writer's state:

- ``STAT`` only reports;
- ``WRITE`` writes ``data`` at ``offset``; a WRITE at offset 0 with no data restarts the
  ingest from the beginning (containerd's client does this to retry from scratch);
- ``COMMIT`` writes the data it carries, then commits with the size and digest the stream
  announced (a later message's non-zero ``total``/``expected`` replaces the first's).

Calls block on the disk: run :meth:`WriteSession.step` in a thread from an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ketch.errdefs import InvalidArgument

if TYPE_CHECKING:
    from ketch.content._store import ContentStore
    from ketch.content._writer import Status, Writer

__all__ = ["COMMIT", "STAT", "WRITE", "WriteSession", "WriteStep"]

#: containerd's WriteAction values
STAT, WRITE, COMMIT = 0, 1, 2


@dataclass(frozen=True)
class WriteStep:
    """What one message asks."""

    action: int = STAT
    ref: str = ""
    total: int = 0
    expected: str = ""
    offset: int = 0
    data: bytes = b""
    labels: dict[str, str] | None = None


class WriteSession:
    def __init__(self, store: ContentStore, namespace: str, lease: str | None = None) -> None:
        self._store = store
        self._namespace = namespace
        self._lease = lease
        self._writer: Writer | None = None
        self._total = 0
        self._expected = ""

    def step(self, msg: WriteStep) -> tuple[Status, str]:
        """Do what ``msg`` asks; the writer's state after it, and the digest of what it holds."""
        writer = self._writer
        if writer is None:
            if not msg.ref:
                raise InvalidArgument("first message of a write must have a ref")
            writer = self._writer = self._store.writer(self._namespace, msg.ref, msg.total, msg.expected,
                                                       lease=self._lease)
        self._total = msg.total or self._total
        self._expected = msg.expected or self._expected
        if msg.action not in (STAT, WRITE, COMMIT):
            raise InvalidArgument(f"unknown write action {msg.action}")
        if msg.action != STAT:
            if msg.data:
                writer.write(msg.data, msg.offset)
            elif msg.action == WRITE and msg.offset == 0 and writer.offset:
                writer.truncate(0)
            if msg.action == COMMIT:
                writer.commit(self._total, self._expected, msg.labels or None)
        return writer.status(), writer.digest()

    @property
    def total(self) -> int:
        """The size the stream announced (0 if none yet)."""
        return self._total

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
