"""Wait for SIGTERM/SIGINT without taking a lock in the signal handler.

A handler that calls `threading.Event.set()` can deadlock: a second signal that lands while the
first handler holds the Event's lock runs the handler again on the same thread, which then waits
for itself. That happens: a child started with PR_SET_PDEATHSIG gets the signal once per thread of
a parent that dies, as it is handed from one dying thread to the next. The handler here only
writes a byte to a pipe, which any number of nested signals can do.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal


class StopSignal:
    """Set by SIGTERM/SIGINT (once `install()`ed) or by `set()` from any thread; `wait` blocks."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._set = False

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopSignal:
        """Make these signals set it (call from the main thread)."""
        for signum in signals:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        self.set()

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the waiter
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or `timeout` seconds pass; whether it is set."""
        if not self._set:
            select.select([self._read], [], [], timeout)
        return self._set
