"""One process of a revision: `onnxfn serve` under gunicorn, its readiness, and pooled connections.

The process is started with the revision's container environment and the runtime contract's
variables (`PORT`, `K_SERVICE`, `K_REVISION`, `K_CONFIGURATION`) plus `ONNXFN_MODEL_VERSION`.
Readiness is probed aggressively (every few milliseconds, as queue-proxy does on a cold start)
and the readiness body's timings become the parts of a cold start.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from shared.platform.http import read_response
from shared.platform.spec import RevisionSpec
from shared.process import FunctionProcess

PROBE_INTERVAL_S = 0.005
_ids = itertools.count(1)
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class StartFailed(RuntimeError):
    """The process exited or did not become ready in time."""


@dataclass
class StartTimings:
    """Wall-clock times of one start (time.time()), and the readiness body's own timings."""

    spawned: float = 0.0
    pipeline_started: float = 0.0
    model_load_s: float = 0.0
    warmup_s: float = 0.0
    ready_at: float = 0.0
    probed_ready: float = 0.0


class Instance:
    """A function process of one revision, reachable at 127.0.0.1:`port`."""

    def __init__(self, spec: RevisionSpec, log_dir: Path, extra_env: dict[str, str]) -> None:
        self.spec = spec
        self.id = next(_ids)
        self.name = f"{spec.name}-{self.id}"
        self.log_path = log_dir / f"{self.name}.log"
        self.extra_env = extra_env
        self.process: FunctionProcess | None = None
        self.port = 0
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.idle: list[Connection] = []
        self.timings = StartTimings()
        self.drained = asyncio.Event()
        self.spawned = asyncio.Event()  # set once spawn() has returned or failed

    def spawn(self) -> None:
        """Start the process (blocking: call it in an executor)."""
        self.timings.spawned = time.time()
        self.process = FunctionProcess(
            self.spec.function, env={**self.spec.process_env(), **self.extra_env}, log=self.log_path
        )
        self.port = self.process.port

    def exited(self) -> int | None:
        return None if self.process is None else self.process.proc.poll()

    async def _probe(self) -> dict[str, float] | None:
        """One readiness GET: the timings when ready, None otherwise."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return None
        try:
            writer.write(b"GET /health/readiness HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader, "GET"), 1.0)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return None
        finally:
            writer.close()
        if response.status != 200:
            return None
        body = response.data.split(b"\r\n\r\n", 1)[1]
        try:
            data = json.loads(body)
        except ValueError:
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}

    async def wait_ready(self, timeout_s: float) -> None:
        """Probe until ready; StartFailed with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.draining:
                raise StartFailed(f"{self.name} retired while starting")
            code = self.exited()
            if code is not None:
                raise StartFailed(f"{self.name} exited with code {code} before ready: {self.log_tail()}")
            timings = await self._probe()
            if timings is not None:
                t = self.timings
                t.probed_ready = time.time()
                t.pipeline_started = timings.get("started_at", t.spawned)
                t.model_load_s = timings.get("model_load_s", 0.0)
                t.warmup_s = timings.get("warmup_s", 0.0)
                t.ready_at = timings.get("ready_at", t.probed_ready)
                self.ready = True
                return
            await asyncio.sleep(PROBE_INTERVAL_S)
        raise StartFailed(f"{self.name} not ready within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"

    async def connection(self) -> tuple[Connection, bool]:
        """A pooled keep-alive connection (reused: True) or a new one."""
        while self.idle:
            conn = self.idle.pop()
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn, True
            conn[1].close()
        return await asyncio.open_connection("127.0.0.1", self.port), False

    def give_back(self, conn: Connection, reusable: bool) -> None:
        if reusable and not self.draining:
            self.idle.append(conn)
        else:
            conn[1].close()

    def close_idle(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    def stop(self) -> None:
        """SIGTERM and wait for gunicorn's graceful exit (blocking: call it in an executor)."""
        if self.process is not None:
            self.process.stop(timeout=self.spec.timeout_s)
