"""DynamicBatcher: gathers the requests of one event loop into model runs.

Request coroutines `submit()` items (model feeds with a leading batch axis) and await their rows.
Nothing waits on a timer: the first item schedules a drain for the loop's next turn, by which time
every request that arrived in the same turn has queued too; while a run is in progress, new items
queue and go together in the next run. So a lone request runs at once and a loaded server forms
batches from concurrent connections. Items whose non-batch shapes differ run as separate groups.

A model run happens either inline on the loop (models so fast that a thread hand-off would cost
more than the run: HTTP-bound models) or in inference threads (onnxruntime releases the GIL, so
the loop keeps parsing requests meanwhile). With several inference threads, up to that many runs
proceed at once on the same session, each a batch of what was waiting when it started. The queue
is bounded: a full queue raises QueueFull (HTTP 429 with Retry-After) instead of growing latency
without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from shared.errors import InferenceFailed, QueueFull

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], Feeds]
# Called once per model run: (batch rows, queue seconds of each item, compute seconds).
BatchObserver = Callable[[int, list[float], float], None]


class RunTiming:
    """When one item's model run started and finished (perf_counter s) and the run's rows; filled
    by the batcher for a caller that passes one (a traced event)."""

    __slots__ = ("enqueued", "finished", "rows", "started")

    def __init__(self) -> None:
        self.enqueued = self.started = self.finished = 0.0
        self.rows = 0


class _Item:
    __slots__ = ("feeds", "future", "rows", "signature", "source", "t_enqueued", "timing")

    def __init__(self, feeds: Feeds, future: asyncio.Future[Feeds], source: int, timing: RunTiming | None) -> None:
        self.feeds = feeds
        self.source = source
        self.future = future
        self.timing = timing
        first = next(iter(feeds.values()))
        self.rows = int(first.shape[0]) if first.ndim else 1
        self.signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        self.t_enqueued = time.perf_counter()


class DynamicBatcher:
    """Batches one event loop's items in front of a model's run function."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        capacity: int,
        inline: bool = False,
        threads: int = 1,
        observe: BatchObserver | None = None,
        observe_sources: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.capacity = capacity
        self.inline = inline
        self._observe = observe
        self._observe_sources = observe_sources  # called per run with how many sources it served
        self._pending: deque[_Item] = deque()
        self._scheduled = False  # a drain is due on the loop's next turn
        self._running = 0  # runs in progress in the inference threads
        self.threads = 1 if inline else threads
        self._executor = None if inline else ThreadPoolExecutor(threads, thread_name_prefix="onnxfn-infer")

    # -- request side (on the loop) -----------------------------------------------------------------
    def submit(
        self, feeds: Feeds, *, admitted: bool = False, source: int = 0, timing: RunTiming | None = None
    ) -> asyncio.Future[Feeds]:
        """Queue one item; its future resolves to the item's output rows (`source`: who sent it;
        `timing`, when given, is filled with the run's times).

        Raises QueueFull when `capacity` items wait, unless `admitted` (the later items of one
        batched request whose first item was let in: a request larger than the queue still runs).
        """
        if not admitted and len(self._pending) >= self.capacity:
            raise QueueFull(f"batch queue full ({self.capacity} items waiting); retry later")
        loop = asyncio.get_running_loop()
        item = _Item(feeds, loop.create_future(), source, timing)
        self._pending.append(item)
        if not self._scheduled and self._running < self.threads:
            self._scheduled = True
            loop.call_soon(self._drain)
        return item.future

    async def infer(self, feeds: Feeds) -> Feeds:
        return await self.submit(feeds)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- batching (on the loop) ---------------------------------------------------------------------
    def _take(self) -> list[list[_Item]]:
        """Up to `max_batch_size` rows of queued items (at least one item), grouped by signature."""
        first = self._pending.popleft()
        groups: dict[tuple[Any, ...], list[_Item]] = {first.signature: [first]}
        rows = first.rows
        while self._pending and rows + self._pending[0].rows <= self.max_batch_size:
            item = self._pending.popleft()
            groups.setdefault(item.signature, []).append(item)
            rows += item.rows
        return list(groups.values())

    def _drain(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        if self._executor is None:
            if self._pending:
                groups = self._take()
                self._deliver(groups, [self._compute(items) for items in groups])
            if self._pending:
                self._scheduled = True
                loop.call_soon(self._drain)
            return
        while self._pending and self._running < self.threads:
            groups = self._take()
            self._running += 1
            running = loop.run_in_executor(self._executor, self._compute_all, groups)
            running.add_done_callback(partial(self._finished, groups))

    def _finished(self, groups: list[list[_Item]], done: asyncio.Future[list[Any]]) -> None:
        self._running -= 1
        self._deliver(groups, done.result())
        self._drain()

    def _compute_all(self, groups: list[list[_Item]]) -> list[tuple[Feeds | BaseException, float, float]]:
        return [self._compute(items) for items in groups]

    def _compute(self, items: list[_Item]) -> tuple[Feeds | BaseException, float, float]:
        """(outputs or the failure, started, finished) of one group's run."""
        started = time.perf_counter()
        try:
            if len(items) == 1:
                feeds = items[0].feeds
            else:
                feeds = {name: np.concatenate([i.feeds[name] for i in items]) for name in items[0].feeds}
            outcome: Feeds | BaseException = self._run(feeds)
        except Exception as exc:  # every item gets the failure; the batcher lives on
            log.exception("model run failed for a batch of %d item(s)", len(items))
            outcome = InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")
        return outcome, started, time.perf_counter()

    def _deliver(
        self, groups: Iterable[list[_Item]], results: list[tuple[Feeds | BaseException, float, float]]
    ) -> None:
        for items, (outcome, started, finished) in zip(groups, results, strict=True):
            offset = 0
            rows = sum(i.rows for i in items)
            for item in items:
                if item.timing is not None:
                    timing = item.timing
                    timing.enqueued, timing.started, timing.finished, timing.rows = (
                        item.t_enqueued,
                        started,
                        finished,
                        rows,
                    )
                stop = offset + item.rows
                if not item.future.done():  # done: the request went away (client disconnected)
                    if isinstance(outcome, BaseException):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result({name: value[offset:stop] for name, value in outcome.items()})
                offset = stop
            if self._observe is not None:
                self._observe(rows, [started - i.t_enqueued for i in items], finished - started)
            if self._observe_sources is not None:
                self._observe_sources(len({i.source for i in items}))
