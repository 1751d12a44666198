"""The platform as a child process (`onnxfn platform`), with the same surface `onnxfn up` uses.

The event plane and the activator are both Python and busy on every event; in one interpreter they
contend for one lock. Run apart, `onnxfn up` measured 561-632 vs 466-483 digits events/s at full
speed and p99 73-94 vs 130-178 ms at 200 events/s (same machine, back to back).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.platform.status import fetch


class PlatformProcess:
    """`onnxfn platform` started as a child; URLs from its state file, status from its gateway."""

    def __init__(
        self,
        services: list[str],
        *,
        knative_dir: Path,
        state_file: Path,
        gateway_port: int = 0,
        scaling_flags: list[str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.state_file = state_file
        state_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "shared.cli", "platform", *services, "--knative", str(knative_dir)]
        argv += ["--port", str(gateway_port), "--state-file", str(state_file), *(scaling_flags or [])]
        self._log = open(log or Path("/dev/null"), "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a Ctrl-C meant for `onnxfn up` must not stop the functions before the event
        # plane has finished what is in flight; `stop()` ends it last.
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.state: dict[str, Any] = {}

    def start(self, timeout_s: float = 60.0) -> None:
        """Wait until the child has written its state file (it listens on every URL by then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"onnxfn platform exited with code {self.proc.returncode}")
            try:
                state = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if state.get("pid") == self.proc.pid:
                self.state = state
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"onnxfn platform did not start within {timeout_s:.0f} s")

    @property
    def gateway_url(self) -> str:
        return str(self.state["gateway"])

    @property
    def log_dir(self) -> str:
        return str(self.state.get("log_dir", ""))

    def url_for(self, service: str) -> str:
        return str(self.state["urls"][service])

    def status(self) -> dict[str, Any]:
        data = fetch(self.gateway_url)
        if data is None:
            raise RuntimeError("the platform's /status did not answer")
        return data

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM: the platform answers what is in flight and stops every function process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def scaling_flags(idle_window: float | None, stable_window: float | None, max_processes: int | None) -> list[str]:
    """The `onnxfn platform` flags for the scaling options that were given."""
    flags: list[str] = []
    for flag, value in (("--idle-window", idle_window), ("--stable-window", stable_window),
                        ("--max-processes", max_processes)):  # fmt: skip
        if value is not None:
            flags += [flag, str(value)]
    return flags
