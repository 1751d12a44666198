"""One way to run a child process: argv, env, log file, a readiness condition, and a stop that ends
its whole process group (SIGTERM to the leader, SIGKILL to the group when time runs out).

Every launcher in the project goes through `ChildProcess`: function servers (`shared.process`), the
platform (`shared.platform.child`), the embedded broker, the shared inference engine and the peers of
the benchmarks. Each child runs in its own session, so a terminal's Ctrl-C reaches only the parent,
which then stops its children in the order it needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO


class ChildExited(RuntimeError):
    """The child exited before it was ready (the message carries the end of its log)."""


class ChildProcess:
    """A child process in its own session; `start`, `wait_until`, `stop` (also as a context manager)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        append: bool = False,
        cwd: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        """`die_with_parent`: the kernel sends the child SIGTERM when the thread that started it
        ends (Linux PR_SET_PDEATHSIG), so a parent killed with SIGKILL leaves no orphan."""
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.log_path = log
        self._append = append
        self.cwd = cwd
        self._die_with_parent = die_with_parent
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> ChildProcess:
        """Launch it (output to the log file, or discarded)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab" if self._append else "wb")  # noqa: SIM115 - closed in stop()
        self.started_at = time.time()
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )
        return self

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while it runs."""
        return self._running().poll()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _running(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen

    def log_tail(self, chars: int = 2000) -> str:
        """The end of its log ('' without one)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> float:
        """Poll `ready` until it holds; returns the seconds since launch. Raises ChildExited if the
        child exits first, TimeoutError (after stopping it) if time runs out."""
        proc = self._running()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_tail()
                reason = f"{self.name} exited with code {proc.returncode} before ready"
                raise ChildExited(reason + (f":\n{tail}" if tail else ""))
            if ready():
                return time.time() - self.started_at
            time.sleep(poll_s)
        self.stop(timeout_s=5)
        raise TimeoutError(f"{self.name} was not ready within {timeout_s:.0f} s")

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for it to exit; subprocess.TimeoutExpired when it does not in time."""
        return self._running().wait(timeout_s)

    def send_signal(self, signum: int) -> None:
        if self.alive:
            self._running().send_signal(signum)

    def stop(self, timeout_s: float = 30.0, signum: int = signal.SIGTERM) -> int | None:
        """`signum` to the leader, wait up to `timeout_s`, then SIGKILL the group; whatever of the
        group outlives the leader is killed too. Returns the exit code (None if never started)."""
        if self.popen is None:
            return None
        proc = self.popen
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> ChildProcess:
        return self if self.popen is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it goes away (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
