"""One revision at run time: its processes, the requests waiting for one, and its autoscaler.

A request takes a slot on the least-busy ready process below `containerConcurrency`; when there is
none it waits (FIFO, within the revision's `timeoutSeconds`) and, if the revision has no process,
one is started: the cold start. Scale-up follows the KPA's arithmetic (in-flight plus waiting over
the concurrency target, as Knative autoscaling defines it), bounded by `max-scale` and by what this machine's cores
allow. Scale-down keeps the most any stable window needed; after the idle window (stable window +
max(scale-to-zero grace, pod retention), as Knative scale to zero defines it) with nothing in flight or waiting the
revision goes to `min-scale` (0 when it has no traffic). A process leaves the routing set, in the
event loop's thread, before it is stopped, so a request arriving at that moment starts a new one;
the process is stopped only once its in-flight requests are answered (then gunicorn's SIGTERM drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import available_cores
from shared.platform.instance import Instance, StartFailed
from shared.platform.metrics import PlatformMetrics
from shared.platform.spec import RevisionSpec

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """No process can take this request: 503 (start failed, shutting down) or 504 (timed out)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ScalingOptions:
    """Platform-wide scaling knobs (None: the revision's annotations and Knative's defaults)."""

    stable_window_s: float | None = None
    scale_to_zero_grace_s: float = 30.0
    retention_s: float | None = None
    idle_window_s: float | None = None
    max_processes: int | None = None  # per revision; None: cores / the container's CPU request
    start_timeout_s: float = 120.0


class RevisionRuntime:
    """Processes, waiting requests and scaling of one revision (event loop thread only)."""

    def __init__(
        self,
        spec: RevisionSpec,
        options: ScalingOptions,
        metrics: PlatformMetrics,
        log_dir: Path,
        extra_env: dict[str, str],
        *,
        clock: Callable[[], float] = time.monotonic,
        new_instance: Callable[[RevisionSpec, Path, dict[str, str]], Instance] = Instance,
    ) -> None:
        """`clock` (seconds, monotonic) times every scaling decision and `new_instance` makes a
        process; tests pass a manual clock and instances without processes."""
        self.spec = spec
        self.clock = clock
        self.new_instance = new_instance
        self.options = options
        self.metrics = metrics
        self.log_dir = log_dir
        self.extra_env = extra_env
        self.instances: list[Instance] = []
        self.retiring: set[Instance] = set()
        self.waiters: deque[asyncio.Future[Instance]] = deque()
        self.reachable = True
        self.last_active = clock()
        self.window: deque[tuple[float, int]] = deque()
        self.peak = 0
        self.last_cold_start: dict[str, Any] | None = None
        self.start_error: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    # -- state ----------------------------------------------------------------------------------------
    @property
    def ready(self) -> int:
        return sum(1 for i in self.instances if i.ready)

    @property
    def starting(self) -> int:
        return sum(1 for i in self.instances if not i.ready)

    @property
    def inflight(self) -> int:
        return sum(i.inflight for i in self.instances) + sum(i.inflight for i in self.retiring)

    @property
    def stable_window_s(self) -> float:
        return self.options.stable_window_s or self.spec.stable_window_s

    @property
    def idle_window_s(self) -> float:
        """Idle time before scaling to zero: stable window + max(grace, retention)."""
        if self.options.idle_window_s is not None:
            return self.options.idle_window_s
        retention = self.spec.retention_s if self.options.retention_s is None else self.options.retention_s
        return self.stable_window_s + max(self.options.scale_to_zero_grace_s, retention)

    @property
    def min_scale(self) -> int:
        """`min-scale`, ignored while the revision has no route (Knative's reachability rule)."""
        return min(self.spec.min_scale, self.max_scale) if self.reachable else 0

    @property
    def max_scale(self) -> int:
        bound = self.options.max_processes or max(1, int(available_cores() / max(self.spec.cpu, 0.1)))
        return min(bound, self.spec.max_scale) if self.spec.max_scale else bound

    def _observe(self) -> None:
        self.peak = max(self.peak, self.inflight + len(self.waiters))

    # -- requests -------------------------------------------------------------------------------------
    def _pick(self) -> Instance | None:
        limit = self.spec.container_concurrency
        best: Instance | None = None
        for inst in self.instances:
            if inst.ready and (not limit or inst.inflight < limit) and (best is None or inst.inflight < best.inflight):
                best = inst
        return best

    async def acquire(self, deadline: float) -> tuple[Instance, Instance | None]:
        """A process slot (counted in its in-flight) by `deadline` (monotonic); and the process this
        request started from zero, if it did (a cold start). Raises Unavailable."""
        if self.closed:
            raise Unavailable(503, f"revision {self.spec.name} is shutting down")
        inst = self._pick()
        if inst is not None:
            inst.inflight += 1
            self._observe()
            return inst, None
        cold = self._start() if not self.instances else None
        future: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self._observe()
        if cold is None:
            self._scale_up()
        await asyncio.wait({future}, timeout=max(0.0, deadline - time.monotonic()))
        if not future.done():
            future.cancel()
            self.waiters.remove(future)
            raise Unavailable(504, f"activator request timeout: no process of {self.spec.name} in time")
        return future.result(), cold

    def release(self, inst: Instance) -> None:
        """A request on `inst` is answered."""
        inst.inflight -= 1
        self.last_active = self.clock()
        if inst.draining:
            if inst.inflight == 0:
                inst.drained.set()
        else:
            self._dispatch()

    def lost(self, inst: Instance) -> None:
        """`inst` stopped answering (its process died): take it out and let it be replaced."""
        if inst in self.instances:
            log.warning("%s: process lost (%s)", inst.name, inst.log_tail(200))
            self._retire(inst)
            if self.waiters and not self.instances:
                self._start()

    def _dispatch(self) -> None:
        while self.waiters:
            inst = self._pick()
            if inst is None:
                return
            future = self.waiters.popleft()
            if not future.done():
                inst.inflight += 1
                future.set_result(inst)

    def record_cold_start(self, inst: Instance, arrived: float, forwarded: float, replied: float) -> None:
        """Observe one cold start (wall-clock times) with its parts from the process's timings."""
        t = inst.timings
        parts = {
            "process_start": t.pipeline_started - arrived,
            "model_load": t.model_load_s,
            "warmup": t.warmup_s,
            "ready_detect": t.probed_ready - t.ready_at,
            "first_inference": replied - forwarded,
        }
        total = replied - arrived
        self.metrics.observe_cold_start(self.spec.service, self.spec.name, total, parts)
        self.last_cold_start = {"seconds": total, "at": replied, "parts": parts}
        log.info(
            "%s cold start %.3f s (%s)", self.spec.name, total, ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        )

    # -- scaling --------------------------------------------------------------------------------------
    def _start(self) -> Instance:
        inst = self.new_instance(self.spec, self.log_dir, self.extra_env)
        self.instances.append(inst)
        self._spawn_task(self._boot(inst))
        return inst

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _boot(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                await loop.run_in_executor(None, inst.spawn)
            finally:
                inst.spawned.set()
            await inst.wait_ready(self.options.start_timeout_s)
        except (StartFailed, OSError) as exc:
            if inst.draining:  # retired while starting (idle, or shutting down): not a failure
                return
            self.metrics.starts.labels(self.spec.service, self.spec.name, "failed").inc()
            self.start_error = str(exc)
            log.error("%s: %s", self.spec.name, exc)
            if inst in self.instances:
                self._retire(inst)
            if not self.instances:
                while self.waiters:
                    future = self.waiters.popleft()
                    if not future.done():
                        future.set_exception(Unavailable(503, f"revision {self.spec.name} failed to start: {exc}"))
            return
        self.metrics.starts.labels(self.spec.service, self.spec.name, "ok").inc()
        self.start_error = None
        if inst not in self.instances:  # retired while starting
            return
        self._dispatch()

    def _scale_up(self) -> None:
        want = min(self.max_scale, max(1, self.spec.wanted(self.inflight + len(self.waiters))))
        while len(self.instances) < want:
            self._start()

    def _retire(self, inst: Instance) -> None:
        """Out of routing now; stopped once its in-flight requests are answered."""
        self.instances.remove(inst)
        inst.draining = True
        inst.close_idle()
        self.retiring.add(inst)
        if inst.inflight == 0:
            inst.drained.set()
        self._spawn_task(self._stop(inst))

    async def _stop(self, inst: Instance) -> None:
        await inst.drained.wait()
        await inst.spawned.wait()
        await asyncio.get_running_loop().run_in_executor(None, inst.stop)
        self.retiring.discard(inst)
        log.info("%s stopped", inst.name)

    def tick(self) -> None:
        """Autoscaler step: keep min-scale, scale down to what the stable window needed, or to zero."""
        now = self.clock()
        current = self.inflight + len(self.waiters)
        if current:
            self.last_active = now
        self.window.append((now, max(self.peak, current)))
        self.peak = current
        while self.window and self.window[0][0] < now - self.stable_window_s:
            self.window.popleft()
        if self.closed:
            return
        if now - self.last_active >= self.idle_window_s:
            target = self.min_scale
        else:
            needed = self.spec.wanted(max(value for _, value in self.window))
            target = min(self.max_scale, max(self.min_scale, 1, needed))
        while len(self.instances) < self.min_scale:
            self._start()
        extra = len(self.instances) - target
        if extra > 0:
            # Idle processes first, newest first.
            for inst in sorted(self.instances, key=lambda i: (i.inflight, not i.ready, -i.id))[:extra]:
                self._retire(inst)

    async def close(self) -> None:
        """Refuse new requests, fail the waiting ones, drain and stop every process."""
        self.closed = True
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(Unavailable(503, f"revision {self.spec.name} is shutting down"))
        for inst in list(self.instances):
            self._retire(inst)
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {
            "revision": self.spec.name,
            "model_version": self.spec.model_version,
            "ready": self.ready,
            "starting": self.starting,
            "stopping": len(self.retiring),
            "waiting": len(self.waiters),
            "inflight": self.inflight,
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "idle_window_s": self.idle_window_s,
            "idle_s": round(self.clock() - self.last_active, 3),
            "processes": [{"port": i.port, "ready": i.ready, "inflight": i.inflight} for i in self.instances],
            "last_cold_start": self.last_cold_start,
            "start_error": self.start_error,
        }
