"""Readiness across gunicorn workers: the server is ready only when every worker has its model.

Each worker drops a marker file `ready-<pid>` in a folder the master made; the readiness route
counts them, and the master removes a dead worker's marker. Without this, a probe answered by a
ready worker could send traffic to one still loading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WorkerReadiness:
    """Marker files of ready workers in `directory` (None: a single process, always consistent)."""

    def __init__(self, directory: Path | None, expected: int) -> None:
        self.directory = directory
        self.expected = expected

    def mark_ready(self) -> None:
        if self.directory is not None:
            (self.directory / f"ready-{os.getpid()}").touch()

    def mark_not_ready(self) -> None:
        if self.directory is not None:
            (self.directory / f"ready-{os.getpid()}").unlink(missing_ok=True)

    def count(self) -> int:
        if self.directory is None:
            return self.expected
        return sum(1 for _ in self.directory.glob("ready-*"))

    def all_ready(self) -> bool:
        return self.count() >= self.expected

    @staticmethod
    def forget(directory: Path, pid: int) -> None:
        """Remove the marker of a worker that exited."""
        (directory / f"ready-{pid}").unlink(missing_ok=True)


def readiness_state(name: str, reason: str | None, **details: Any) -> dict[str, Any]:
    """The JSON body of `/health/readiness` for a Service and a worker alike: ready when `reason`
    is None, else not ready with it."""
    if reason is None:
        return {"status": "ready", "ready": True, "name": name, "function": name, **details}
    return {"status": "not ready", "ready": False, "name": name, "function": name, "reason": reason}
