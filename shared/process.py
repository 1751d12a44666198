"""Start and stop function servers as real processes (benchmarks, tests, the embedded platform)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from shared.config import PROJECT_ROOT
from shared.supervisor import ChildProcess


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET a URL; (status, body), status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


class FunctionProcess:
    """`onnxfn serve NAME` on 127.0.0.1:PORT as a child process."""

    def __init__(
        self,
        function: str,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.function = function
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PORT": str(self.port), "ONNXFN_HOST": "127.0.0.1", **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        argv = command or [sys.executable, "-m", "shared.cli", "serve", function]
        self.child = ChildProcess(function, argv, env=full_env, log=log, cwd=PROJECT_ROOT).start()
        self.started_at = self.child.started_at

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.child.popen is not None
        return self.child.popen

    def ready(self, path: str = "/health/readiness") -> bool:
        return http_get(self.url + path, timeout=1.0)[0] == 200

    def wait_ready(self, timeout: float = 60.0, path: str = "/health/readiness") -> None:
        """Block until readiness answers 200; raises with the reason if the process dies or time runs out."""
        self.child.wait_until(lambda: self.ready(path), timeout)

    def worker_pids(self) -> list[int]:
        """PIDs of gunicorn's worker processes (children of the master, the shared engine aside)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split() if b"shared.engine" not in _cmdline(int(pid))]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit (SIGKILL after `timeout`); returns the exit code."""
        code = self.child.stop(timeout)
        assert code is not None
        return code

    def __enter__(self) -> FunctionProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


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


def process_started_at(pid: int) -> float:
    """When process `pid` started, in seconds since the epoch (from /proc)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
