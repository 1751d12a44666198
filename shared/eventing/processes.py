"""Function servers for the embedded plane: `onnxfn serve NAME` on a free loopback port each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared.eventing.broker_process import free_port


class FunctionProcess:
    """One function under gunicorn, bound to 127.0.0.1; ready when /health/readiness answers 200."""

    def __init__(self, name: str, log_dir: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.port = port or free_port()
        self.log_path = log_dir / f"{name}.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        env = {**os.environ, "PORT": str(self.port), "ONNXFN_HOST": "127.0.0.1", **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "serve", self.name],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/readiness", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"function {self.name} exited with {self.process.returncode}:\n{tail}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"function {self.name} not ready on port {self.port} in time (log: {self.log_path})")

    def stop(self, timeout_s: float = 25.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_functions(names: list[str], log_dir: Path, timeout_s: float = 180.0) -> dict[str, FunctionProcess]:
    """Start every function, then wait until all are ready (stopping them all on failure)."""
    processes = {name: FunctionProcess(name, log_dir) for name in names}
    try:
        for process in processes.values():
            process.start()
        deadline = time.monotonic() + timeout_s
        for process in processes.values():
            process.wait_ready(deadline)
    except BaseException:
        for process in processes.values():
            process.stop(timeout_s=5)
        raise
    return processes
