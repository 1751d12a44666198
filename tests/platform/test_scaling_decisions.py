"""The autoscaler's decisions on a manual clock with instances that start no process: cold start
from zero, scale-up by the concurrency target and max-scale, scale-down to the stable window's
need, to zero after the idle window, never below min-scale. No sleeps, no gunicorn."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, cast

import pytest

from shared.platform.metrics import PlatformMetrics
from shared.platform.revision import RevisionRuntime, ScalingOptions
from shared.platform.spec import RevisionSpec

SPEC = RevisionSpec(
    name="fn-v1",
    service="fn",
    function="fn",
    model_version="1",
    env={},
    container_concurrency=1,
    timeout_s=30.0,
    min_scale=0,
    max_scale=3,
    target=None,
    utilization=100.0,
    stable_window_s=10.0,
    retention_s=0.0,
    cpu=1.0,
)
_ids = itertools.count(1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeInstance:
    """What the runtime needs of a process, ready as soon as it is asked."""

    def __init__(self, spec: RevisionSpec, log_dir: Path, extra_env: dict[str, str]) -> None:
        self.id = next(_ids)
        self.name = f"{spec.name}-{self.id}"
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.stopped = False
        self.drained = asyncio.Event()
        self.spawned = asyncio.Event()

    def spawn(self) -> None:
        pass

    async def wait_ready(self, timeout_s: float) -> None:
        self.ready = True

    def close_idle(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def log_tail(self, chars: int = 600) -> str:
        return ""


def _runtime(clock: Clock, spec: RevisionSpec = SPEC) -> RevisionRuntime:
    metrics = PlatformMetrics(lambda: [])
    factory: Any = FakeInstance
    options = ScalingOptions(max_processes=8)  # more than max-scale: the Service's bound applies
    return RevisionRuntime(spec, options, metrics, Path("/nonexistent"), {}, clock=clock, new_instance=factory)


async def _settle(runtime: RevisionRuntime) -> None:
    """Let the boot and stop tasks the runtime spawned run to completion."""
    while runtime.tasks:
        await asyncio.gather(*list(runtime.tasks))


def _deadline() -> float:
    return time.monotonic() + 5


async def _scale_up_then_down() -> None:
    clock = Clock()
    runtime = _runtime(clock)
    first, cold = await runtime.acquire(_deadline())
    assert cold is first and len(runtime.instances) == 1  # the cold start

    # Four requests at once, one each per process (containerConcurrency 1): three processes
    # (max-scale), the fourth request waits for a slot.
    waiting = [asyncio.ensure_future(runtime.acquire(_deadline())) for _ in range(3)]
    await asyncio.sleep(0)
    await _settle(runtime)
    assert len(runtime.instances) == 3
    got = [w for w in waiting if w.done()]
    assert len(got) == 2 and len(runtime.waiters) == 1
    runtime.release(first)  # its slot goes to the waiting request
    await asyncio.gather(*waiting)
    for future in waiting:
        runtime.release(future.result()[0])

    runtime.tick()  # the window still remembers four in flight
    assert len(runtime.instances) == 3
    clock.now += SPEC.stable_window_s + 1
    runtime.tick()  # idle, but within the idle window: keep one
    assert len(runtime.instances) == 1
    await _settle(runtime)
    assert len(runtime.retiring) == 0

    clock.now += runtime.idle_window_s
    runtime.tick()
    await _settle(runtime)
    assert runtime.instances == [] and runtime.retiring == set()


async def _min_scale_holds() -> None:
    clock = Clock()
    runtime = _runtime(clock, dataclasses.replace(SPEC, min_scale=1))
    runtime.tick()
    await _settle(runtime)
    assert runtime.ready == 1  # started without a request
    clock.now += 10 * runtime.idle_window_s
    runtime.tick()
    await _settle(runtime)
    assert runtime.ready == 1
    runtime.reachable = False  # no route to it: min-scale no longer applies
    runtime.tick()
    await _settle(runtime)
    assert runtime.instances == []


async def _request_while_stopping_starts_a_new_process() -> None:
    clock = Clock()
    runtime = _runtime(clock)
    acquired, _ = await runtime.acquire(_deadline())
    old = cast(FakeInstance, acquired)
    runtime.release(acquired)
    clock.now += runtime.idle_window_s + 1
    runtime.tick()  # out of routing now; its stop has not run yet
    assert runtime.instances == [] and len(runtime.retiring) == 1 and not old.stopped
    new, cold = await runtime.acquire(_deadline())
    assert new is not acquired and cold is new  # a request arriving meanwhile gets a new process
    await _settle(runtime)
    assert old.stopped and runtime.instances == [new]


@pytest.mark.parametrize(
    "scenario", [_scale_up_then_down, _min_scale_holds, _request_while_stopping_starts_a_new_process]
)
def test_scaling_decisions(scenario: Any) -> None:
    asyncio.run(scenario())
