"""What a long-lived component says of itself: starting, ready or failed (with the reason)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STARTING = "starting"
READY = "ready"
FAILED = "failed"


@dataclass(frozen=True)
class Health:
    """One component's state; `restarts` counts how often its supervisor replaced it."""

    component: str
    state: str
    detail: str = ""
    restarts: int = 0

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def of_thread(
    component: str, alive: bool, ready: bool, failure: BaseException | None, stalled: str | None = None
) -> Health:
    """A component run by one thread: failed when it raised, ended or stalled; starting until `ready`."""
    if failure is not None:
        return Health(component, FAILED, f"{type(failure).__name__}: {failure}")
    if not alive:
        return Health(component, FAILED, "its thread ended")
    if stalled is not None:
        return Health(component, FAILED, f"stalled: {stalled}")
    return Health(component, READY if ready else STARTING)
