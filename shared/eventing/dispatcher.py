"""A consumer-group loop that hands each record to a handler and commits only final outcomes.

The handler gets the record and a `finish` callback, and calls it (from any thread) once the
record's outcome is final (delivered, replied, dead-lettered or filtered out). Offsets are committed
per partition up to the oldest unfinished record (`OffsetTracker`): at-least-once, nothing skipped.

Unordered: records run concurrently, bounded by pausing the partitions while `max_pending` are
unfinished. Ordered (the Kafka broker's `delivery.order: ordered`): one record in flight per
partition, the next one starts when the previous one is final.

`Lane` is that record-level part (tracker, ordered queues, handler) without a consumer: the shared
per-topic reader (`fanout.SharedReader`) feeds one lane per trigger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.offsets import OffsetTracker, TopicPartitionKey
from shared.health import Health, of_thread

log = logging.getLogger(__name__)
Finish = Callable[[], None]
Handler = Callable[[Any, Finish], None]
COMMIT_INTERVAL_S = 0.05


def take(consumer: Any, timeout_s: float, batch: int = 500) -> list[Any]:
    """Wait up to `timeout_s` for one record, then take what is already fetched without waiting.
    (`consume(n, timeout)` alone waits for n records or the whole timeout: latency on every hop.)"""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=batch, timeout=0)]


def usable(message: Any, name: str) -> bool:
    """A record, not an error event of the consumer; a lost offset is logged as an error."""
    from confluent_kafka import KafkaError

    error = message.error()
    if error is None:
        return True
    if error.code() == KafkaError._AUTO_OFFSET_RESET:
        log.error("%s: %s (the broker lost records, or they expired)", name, error.str())
    elif error.code() != KafkaError._PARTITION_EOF:
        log.warning("%s: consumer error: %s", name, error.str())
    return False


def commit_offsets(consumer: Any, points: dict[TopicPartitionKey, int], name: str, asynchronous: bool = True) -> None:
    """Commit `points` (next offset per partition); a failure is logged: those records come again."""
    from confluent_kafka import KafkaException, TopicPartition

    if not points:
        return
    offsets = [TopicPartition(topic, part, offset) for (topic, part), offset in points.items()]
    try:
        consumer.commit(offsets=offsets, asynchronous=asynchronous)
    except KafkaException as exc:
        log.warning("%s: commit failed (%s); the records will be delivered again", name, exc)


STALL_S = 30.0  # behind the topic with nothing fetched (and not paused) this long: stalled
STALL_CHECK_S = 5.0


class StallWatch:
    """Notices a consumer that stops advancing while its topic grows: records behind it (the
    broker's high watermark over its position), nothing fetched for `stall_s`, and not paused by
    its in-flight window. `stalled` then says so with the figures (None while it advances)."""

    def __init__(self, name: str, stall_s: float | None = None) -> None:
        self.name = name
        self.stall_s = STALL_S if stall_s is None else stall_s
        self.last_fetch = time.monotonic()
        self.last_check = self.last_fetch
        self.stalled: str | None = None

    def fetched(self, count: int) -> None:
        if count:
            self.last_fetch = time.monotonic()
            self.stalled = None

    def check(self, consumer: Any, paused: bool) -> None:
        """Call from the consumer loop; reads its assignment and asks the broker only every STALL_CHECK_S."""
        now = time.monotonic()
        if now - self.last_check < min(STALL_CHECK_S, self.stall_s):
            return
        self.last_check = now
        idle = now - self.last_fetch
        if paused or idle < self.stall_s:
            return
        partitions = consumer.assignment()
        if not partitions:
            return
        from confluent_kafka import KafkaException

        behind = 0
        try:
            for tp in consumer.position(partitions):
                if tp.offset >= 0:
                    _, high = consumer.get_watermark_offsets(tp, timeout=2)
                    behind += max(0, high - tp.offset)
        except KafkaException as exc:  # the broker does not answer: nothing to conclude now
            log.debug("%s: no watermarks (%s)", self.name, exc)
            return
        if behind and self.stalled is None:
            self.stalled = f"{behind} record(s) behind the topic, nothing fetched for {idle:.0f} s"
            log.warning("%s: stalled: %s", self.name, self.stalled)


class HandlerFailed(RuntimeError):
    """A record's handler raised: the consumer stops rather than stall on a record never final."""


class Lane:
    """The records of one consumer group: `accept` in consumption order, `handle(message, finish)`
    for each, the offsets tracked until final. Ordered: one record in flight per partition."""

    def __init__(self, name: str, handle: Handler, ordered: bool = False):
        self.name = name
        self.handle = handle
        self.ordered = ordered
        self.tracker = OffsetTracker()
        self._lock = threading.Lock()
        self._waiting: dict[TopicPartitionKey, deque[Any]] = {}
        self._busy: set[TopicPartitionKey] = set()
        self.closed = False
        # A handler that raised: its record is neither delivered nor final, so the consumer that owns
        # this lane stops (`check`) and its supervisor starts it again from the committed offsets.
        self.failure: BaseException | None = None

    def check(self) -> None:
        """Raise HandlerFailed if a handler raised (called on the consumer thread)."""
        if self.failure is not None:
            raise HandlerFailed(f"{self.name}: handler raised {type(self.failure).__name__}: {self.failure}")

    def close(self) -> None:
        """Start nothing more: records still queued behind an ordered partition are left (not final)."""
        with self._lock:
            self.closed = True
            self._waiting.clear()

    def drop(self, tps: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Forget revoked partitions; returns their last commit points."""
        points = self.tracker.forget(tps)
        with self._lock:
            for tp in tps:
                self._waiting.pop(tp, None)
                self._busy.discard(tp)
        return points

    # -- records -------------------------------------------------------------------------------
    def _start(self, message: Any) -> None:
        """Hand `message` to the handler; in ordered mode, go on with the partition's next record when
        the handler finished synchronously (a loop, not recursion), else from its `finish`."""
        while message is not None:
            tp = (message.topic(), message.partition())
            offset = message.offset()
            lock = threading.Lock()
            state = {"finished": False, "inline": True}

            def finish(tp: TopicPartitionKey = tp, offset: int = offset, lock: Any = lock, state: Any = state) -> None:
                with lock:
                    if state["finished"]:
                        return
                    state["finished"] = True
                    inline = state["inline"]
                self.tracker.finish(tp, offset)
                if self.ordered and not inline:
                    self._start(self._pop_next(tp))

            try:
                self.handle(message, finish)
            except Exception as exc:
                log.exception("%s: handler failed on %s[%d]@%d; stopping its consumer", self.name, *tp, offset)
                self.failure = self.failure or exc
            with lock:
                state["inline"] = False
                go_on = state["finished"]
            message = self._pop_next(tp) if self.ordered and go_on else None

    def _pop_next(self, tp: TopicPartitionKey) -> Any:
        with self._lock:
            queue = self._waiting.get(tp)
            if not queue or self.closed:
                self._busy.discard(tp)
                return None
            return queue.popleft()

    def accept(self, message: Any) -> None:
        tp = (message.topic(), message.partition())
        self.tracker.add(tp, message.offset())
        if self.ordered:
            with self._lock:
                if tp in self._busy:
                    self._waiting.setdefault(tp, deque()).append(message)
                    return
                self._busy.add(tp)
        self._start(message)


class Dispatcher:
    """One consumer group on `topics`; `handle(message, finish)` for every record."""

    def __init__(
        self,
        name: str,
        config: KafkaConfig,
        group_id: str,
        topics: list[str],
        handle: Handler,
        *,
        ordered: bool = False,
        max_pending: int = 500,
        offset_reset: str = "earliest",
        lane: Lane | None = None,
        start_at: dict[TopicPartitionKey, int] | None = None,
    ):
        """`lane` and `start_at` take over a group from a shared reader: its records in flight stay
        tracked (and are not delivered again), and the first assignment starts at `start_at`."""
        self.name = name
        self.group_id = group_id
        self.topics = topics
        self.lane = lane or Lane(name, handle, ordered)
        self._start_at = dict(start_at or {})
        self.stall = StallWatch(name)
        self.max_pending = max_pending
        self._config = config.consumer(group_id, **{"auto.offset.reset": offset_reset})
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self.failed: BaseException | None = None

    @property
    def tracker(self) -> OffsetTracker:
        return self.lane.tracker

    @property
    def ordered(self) -> bool:
        return self.lane.ordered

    @ordered.setter
    def ordered(self, value: bool) -> None:
        self.lane.ordered = value

    def start(self) -> None:
        self._thread.start()

    def health(self) -> list[Health]:
        """Ready once it has partitions; failed when its consumer thread raised or ended, or stalled."""
        return [of_thread(self.name, self._thread.is_alive(), self.assigned.is_set(), self.failed, self.stall.stalled)]

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop consuming, give in-flight records `drain_s` to finish, commit, leave the group."""
        self._drain_s = drain_s
        self._stop.set()
        self._thread.join(timeout=drain_s + 15)

    # -- consumer loop -------------------------------------------------------------------------
    def _commit(self, consumer: Any, points: dict[TopicPartitionKey, int], asynchronous: bool = True) -> None:
        commit_offsets(consumer, points, self.name, asynchronous)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Cooperative-sticky: `partitions` are only the ones added; those it keeps are untouched."""
        log.debug("%s: assigned %s", self.name, [(p.topic, p.partition) for p in partitions])
        if self._start_at:
            for tp in partitions:
                offset = self._start_at.pop((tp.topic, tp.partition), None)
                if offset is not None:
                    tp.offset = offset
            self._start_at.clear()  # later assignments (a rebalance) start at the committed offsets
            consumer.incremental_assign(partitions)
        self.assigned.set()

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Only the partitions that move: commit what is final of them, forget their records."""
        tps = [(p.topic, p.partition) for p in partitions]
        self._commit(consumer, self.lane.drop(tps), asynchronous=False)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        """Taken away without a revoke (session expired): another member owns them; no commit."""
        dropped = self.lane.drop([(p.topic, p.partition) for p in partitions])
        if dropped:
            log.warning(
                "%s: lost partitions %s; their records in flight may be delivered again", self.name, list(dropped)
            )

    def _run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(self._config)
        try:
            consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
            paused = False
            last_commit = time.monotonic()
            while not self._stop.is_set():
                pending = self.tracker.in_flight
                if not paused and pending >= self.max_pending:
                    consumer.pause(consumer.assignment())
                    paused = True
                elif paused and pending < self.max_pending // 2:
                    consumer.resume(consumer.assignment())
                    paused = False
                messages = take(consumer, 0.02 if paused else 0.05)
                self.stall.fetched(len(messages))
                self.stall.check(consumer, paused)
                for message in messages:
                    if usable(message, self.name):
                        self.lane.accept(message)
                self.lane.check()
                now = time.monotonic()
                if now - last_commit >= COMMIT_INTERVAL_S:
                    self._commit(consumer, self.tracker.commit_points())
                    last_commit = now
            deadline = time.monotonic() + getattr(self, "_drain_s", 5.0)
            while self.tracker.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.tracker.in_flight > 0:
                log.info("%s: stopping with %d record(s) not final; they will be delivered again",
                         self.name, self.tracker.in_flight)  # fmt: skip
            self._commit(consumer, self.tracker.commit_points(), asynchronous=False)
        except BaseException as exc:
            self.failed = exc
            log.exception("%s: dispatcher stopped", self.name)
        finally:
            consumer.close()
