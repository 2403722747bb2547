"""The content store's locks: garbage collection against writers, and one writer per ref."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ketch.content._disk import format_time
from ketch.errdefs import Unavailable


class GCLock:
    """A readers–writer lock: writers of content share it, the sweep takes it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class RefLocks:
    """One live writer per (namespace, ref), in this process (containerd ``content/local/locks.go``)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._held: dict[tuple[str, str], float] = {}

    def acquire(self, key: tuple[str, str], timeout: float) -> None:
        """Take the lock, retrying with growing random pauses for up to ``timeout`` seconds;
        Unavailable ``ref <ref> locked for …`` after that."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            with self._mu:
                since = self._held.get(key)
                if since is None:
                    self._held[key] = time.time()
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                held_for = time.time() - since
                raise Unavailable(f"ref {key[1]} locked for {held_for:.3f}s (since {format_time(since)})")
            time.sleep(min(remaining, random.random() * (1 << attempt) / 1000))
            attempt = min(attempt + 1, 9)

    def release(self, key: tuple[str, str]) -> None:
        with self._mu:
            self._held.pop(key, None)


@dataclass(slots=True)
class Handle:
    """What a writer holds that must be let go even if the writer is dropped unclosed: the
    ref's lock (once taken) and the ingest's open data file."""

    locks: RefLocks
    key: tuple[str, str]
    fd: int = -1
    locked: bool = False

    def lock(self, timeout: float) -> None:
        self.locks.acquire(self.key, timeout)
        self.locked = True

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.locked:
            self.locks.release(self.key)
            self.locked = False
