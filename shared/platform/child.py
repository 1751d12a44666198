"""The platform as a child process (`onnxfn platform`), with the surface `onnxfn up`, the benchmarks
and the tests use.

The event plane and the activator are both Python and busy on every event; in one interpreter they
would contend for one lock, so `onnxfn up` runs the platform apart.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT
from shared.platform.status import fetch
from shared.supervisor import ChildProcess


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
        # Its own session (ChildProcess): a Ctrl-C meant for `onnxfn up` must not stop the functions
        # before the event plane has finished what is in flight; `stop()` ends it last.
        self.child = ChildProcess("onnxfn platform", argv, log=log, append=True, cwd=PROJECT_ROOT).start()
        self.state: dict[str, Any] = {}

    def _read_state(self) -> bool:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        if state.get("pid") != self.child.pid:
            return False
        self.state = state
        return True

    def start(self, timeout_s: float = 60.0) -> PlatformProcess:
        """Wait until the child has written its state file (it listens on every URL by then)."""
        self.child.wait_until(self._read_state, timeout_s)
        return self

    @property
    def gateway_url(self) -> str:
        return str(self.state["gateway"])

    @property
    def log_dir(self) -> str:
        return str(self.state.get("log_dir", ""))

    def url_for(self, service: str, tag: str = "") -> str:
        """The Service's URL, or its tag's (`tag-<svc>` routes) when `tag` is given."""
        if not tag:
            return str(self.state["urls"][service])
        for target in self.service(service)["traffic"]:
            if target["tag"] == tag:
                return str(target["url"])
        raise KeyError(f"{service} has no tag {tag!r}")

    def status(self) -> dict[str, Any]:
        data = fetch(self.gateway_url)
        if data is None:
            raise RuntimeError("the platform's /status did not answer")
        return data

    def service(self, name: str) -> dict[str, Any]:
        """One Service's entry in /status."""
        for service in self.status()["services"]:
            if service["name"] == name:
                return dict(service)
        raise KeyError(f"the platform serves no Service {name!r}")

    def revision(self, service: str, name: str | None = None) -> dict[str, Any]:
        """One revision's entry (the first when `name` is None)."""
        for revision in self.service(service)["revisions"]:
            if name is None or revision["revision"] == name:
                return dict(revision)
        raise KeyError(f"{service} has no revision {name!r}")

    def wait_zero(self, service: str, timeout_s: float = 120.0) -> None:
        """Block until no process of the Service is ready, starting or stopping."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(r["ready"] + r["starting"] + r["stopping"] == 0 for r in self.service(service)["revisions"]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{service} did not go back to zero within {timeout_s:.0f} s")

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.child.returncode

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM: the platform answers what is in flight and stops every function process."""
        self.child.stop(timeout_s)

    def __enter__(self) -> PlatformProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scaling_flags(idle_window: float | None, stable_window: float | None, max_processes: int | None) -> list[str]:
    """The `onnxfn platform` flags for the scaling options that were given."""
    flags: list[str] = []
    for flag, value in (("--idle-window", idle_window), ("--stable-window", stable_window),
                        ("--max-processes", max_processes)):  # fmt: skip
        if value is not None:
            flags += [flag, str(value)]
    return flags
