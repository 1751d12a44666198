"""DynamicBatcher: gathers concurrent requests inside one process into one model run.

Request threads `submit()` items (model feeds with a leading batch axis) and block until their rows
come back. One batcher thread takes what is queued (up to `max_batch_size` rows), waits at most
`max_queue_delay` for more only while other requests of this process are still on their way (so a
lone request never waits), groups items whose non-batch shapes agree (bucketed sequence lengths),
concatenates, runs, and hands each item its rows. The queue is bounded: a full queue raises
QueueFull (HTTP 429 with Retry-After) instead of growing latency without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.errors import InferenceFailed, QueueFull

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], Feeds]
# Called once per model run: (batch rows, queue seconds of each item, compute seconds).
BatchObserver = Callable[[int, list[float], float], None]


class _Item:
    __slots__ = ("done", "error", "feeds", "outputs", "rows", "signature", "t_enqueued")

    def __init__(self, feeds: Feeds) -> None:
        self.feeds = feeds
        first = next(iter(feeds.values()))
        self.rows = int(first.shape[0]) if first.ndim else 1
        self.signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        self.outputs: Feeds | None = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()
        self.t_enqueued = time.perf_counter()


class DynamicBatcher:
    """One batching thread in front of a model's run function."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        capacity: int,
        observe: BatchObserver | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.timeout_s = timeout_s
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=capacity)
        self._observe = observe
        self._carry: _Item | None = None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="onnxfn-batcher", daemon=True)
        self._thread.start()

    # -- request side -------------------------------------------------------------------------------
    def arriving(self) -> None:
        """Tell the batcher a request has arrived and will submit soon (lets it wait for company)."""
        with self._inflight_lock:
            self._inflight += 1

    def left(self) -> None:
        """The request announced by `arriving()` is finished (answered or failed)."""
        with self._inflight_lock:
            self._inflight -= 1

    def submit(self, feeds: Feeds) -> _Item:
        """Queue one item; raises QueueFull when the queue is at capacity."""
        item = _Item(feeds)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"batch queue full ({self._queue.maxsize} items waiting); retry later") from None
        return item

    def result(self, item: _Item) -> Feeds:
        """Block until `item` has run; returns its output rows."""
        if not item.done.acquire(timeout=self.timeout_s):
            raise InferenceFailed(f"inference did not finish within {self.timeout_s:.0f} s")
        if item.error is not None:
            raise item.error
        assert item.outputs is not None
        return item.outputs

    def infer(self, feeds: Feeds) -> Feeds:
        """Submit and wait: the convenience path for one item."""
        return self.result(self.submit(feeds))

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # -- batching thread ----------------------------------------------------------------------------
    def _gather(self) -> list[_Item]:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        batch, rows = [first], first.rows
        deadline = first.t_enqueued + self.max_queue_delay_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._inflight <= len(batch):
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if rows + item.rows > self.max_batch_size:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            groups: dict[tuple[Any, ...], list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.signature, []).append(item)
            for items in groups.values():
                self._run_group(items)

    def _run_group(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            if len(items) == 1:
                feeds = items[0].feeds
            else:
                feeds = {name: np.concatenate([i.feeds[name] for i in items]) for name in items[0].feeds}
            outputs = self._run(feeds)
            offset = 0
            for item in items:
                stop = offset + item.rows
                item.outputs = {name: value[offset:stop] for name, value in outputs.items()}
                offset = stop
        except Exception as exc:  # every item gets the failure; the thread lives on
            log.exception("model run failed for a batch of %d item(s)", len(items))
            error = InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")
            for item in items:
                item.error = error
        finished = time.perf_counter()
        for item in items:
            item.done.release()
        if self._observe is not None:
            rows = sum(i.rows for i in items)
            self._observe(rows, [started - i.t_enqueued for i in items], finished - started)
