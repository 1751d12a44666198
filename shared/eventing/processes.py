"""Functions started directly (no platform): `onnxfn serve NAME` on free loopback ports, via `shared.process`.

`onnxfn up` runs its functions through the scale-to-zero platform (`shared.platform`); this is for
tests that want plain, always-warm function processes behind the event plane.
"""

from __future__ import annotations

from pathlib import Path

from shared.process import FunctionProcess

__all__ = ["FunctionProcess", "start_functions"]


def start_functions(names: list[str], log_dir: Path, timeout_s: float = 180.0) -> dict[str, FunctionProcess]:
    """Start every function (log in `log_dir/NAME.log`), then wait until all are ready (stopping all on failure)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, FunctionProcess] = {}
    try:
        for name in names:
            processes[name] = FunctionProcess(name, log=log_dir / f"{name}.log")
        for process in processes.values():
            process.wait_ready(timeout_s)
    except BaseException:
        for process in processes.values():
            process.stop(timeout=5)
        raise
    return processes
