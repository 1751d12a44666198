"""One fetch per topic, one consumer group (offsets) per trigger: the shared reader.

Every Trigger of a broker reads the same broker topic. With one consumer group per trigger, each
record is fetched once per trigger, and the broker's cost is per fetch. `SharedReader` fetches a
topic once and hands each record to each of its members (one per trigger), which keep Knative's
semantics: each member has its own consumer group id and committed offsets, its own in-flight
window, ordered or unordered delivery, and commits only final outcomes (at-least-once).

- Start: the reader is a plain consumer with `assign()` over the topic's partitions (no group
  membership). Per partition it starts at the lowest position of its members; a member's position
  is its group's committed offset, or, when the group has none, its `auto.offset.reset` (earliest
  or latest) resolved to the partition's watermark. A member gets only the records at or above its
  own position (records below it are skipped for that member).
- Commits: per member, standalone offset commits under the member's group id (a consumer with that
  `group.id` that never subscribes), every `COMMIT_INTERVAL_S`, up to the oldest unfinished record.
- Detach (no head-of-line blocking across triggers): the reader never pauses. When a member's
  in-flight window is full (its subscriber is down, slow, or at zero and starting), the member is
  detached: it stops receiving from the reader, its position is committed synchronously (per
  partition: the oldest unfinished record, else the next record it would have got) and its
  committer closes. Then it goes on alone as a `Dispatcher` subscribed to its own group that takes
  over its lane: the records in flight stay tracked and are answered once (not sent again), the
  dispatcher starts at the next record the member would have got, and its commits still stop at the
  oldest unfinished record, so a crash delivers again and loses nothing. A detached member stays on
  its own consumer until the plane restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.dispatcher import COMMIT_INTERVAL_S, Dispatcher, Handler, Lane, StallWatch, take, usable
from shared.health import Health, of_thread

log = logging.getLogger(__name__)
OFFSET_RESETS = ("earliest", "latest")


@dataclass
class Member:
    """One consumer group served by a shared reader (a trigger)."""

    name: str
    group_id: str
    handle: Handler
    ordered: bool = False
    max_pending: int = 2000
    offset_reset: str = "earliest"
    lane: Lane = field(init=False)
    starts: dict[int, int] = field(default_factory=dict)  # partition -> first offset it gets
    next: dict[int, int] = field(default_factory=dict)  # partition -> next offset it would get
    committer: Any = None
    dedicated: Dispatcher | None = None

    def __post_init__(self) -> None:
        if self.offset_reset not in OFFSET_RESETS:
            raise ValueError(f"{self.name}: offset reset {self.offset_reset!r}: expected earliest or latest")
        self.lane = Lane(self.name, self.handle, self.ordered)


def start_positions(
    partitions: list[int],
    committed: dict[int, int | None],
    watermarks: dict[int, tuple[int, int]],
    offset_reset: str,
) -> dict[int, int]:
    """A member's first offset per partition: committed, else earliest (low) or latest (high) watermark."""
    out: dict[int, int] = {}
    for part in partitions:
        offset = committed.get(part)
        if offset is None or offset < 0:
            low, high = watermarks[part]
            offset = low if offset_reset == "earliest" else high
        out[part] = offset
    return out


class SharedReader:
    """Fetches `topic` once and feeds each member's lane; same life cycle as a `Dispatcher`."""

    def __init__(self, name: str, config: KafkaConfig, topic: str, members: list[Member]):
        self.name = name
        self.config = config
        self.topic = topic
        self.members = members
        self.active: list[Member] = []
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._drain_s = 5.0
        self.failed: BaseException | None = None
        self.stall = StallWatch(name)
        self._thread = threading.Thread(target=self._run, name=f"fanout-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def health(self) -> list[Health]:
        """Its own state, then that of each member that was detached onto a dispatcher of its own."""
        own = of_thread(self.name, self._thread.is_alive(), self.assigned.is_set(), self.failed, self.stall.stalled)
        return [own, *(h for m in self.members if m.dedicated is not None for h in m.dedicated.health())]

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop reading, give in-flight records `drain_s` to finish, commit; stop detached members."""
        self._drain_s = drain_s
        self._stop.set()
        dedicated = [m.dedicated for m in self.members if m.dedicated is not None]
        for dispatcher in dedicated:
            dispatcher._stop.set()
        self._thread.join(timeout=drain_s + 15)
        for dispatcher in dedicated:
            dispatcher.stop(drain_s)

    @property
    def detached(self) -> list[Member]:
        return [m for m in self.members if m.dedicated is not None]

    # -- positions and commits -----------------------------------------------------------------
    def _positions(self, probe: Any) -> dict[int, int]:
        """Each member's start per partition (sets `member.starts`); returns the reader's (their minimum)."""
        from confluent_kafka import TopicPartition

        meta = probe.list_topics(self.topic, timeout=10)
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"{self.name}: topic {self.topic} has no partitions")
        partitions = sorted(topic.partitions)
        watermarks = {p: probe.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10) for p in partitions}
        reader: dict[int, int] = {}
        for member in self.members:
            asked = [TopicPartition(self.topic, p) for p in partitions]
            committed = {tp.partition: tp.offset for tp in member.committer.committed(asked, timeout=10)}
            member.starts = start_positions(partitions, committed, watermarks, member.offset_reset)
            member.next = dict(member.starts)
            for part, offset in member.starts.items():
                reader[part] = min(reader.get(part, offset), offset)
            log.debug("%s: %s starts at %s", self.name, member.name, member.starts)
        return reader

    def _commit(self, member: Member, points: dict[int, int], asynchronous: bool = True) -> bool:
        from confluent_kafka import KafkaException, TopicPartition

        if not points:
            return True
        offsets = [TopicPartition(self.topic, part, offset) for part, offset in points.items()]
        try:
            member.committer.commit(offsets=offsets, asynchronous=asynchronous)
            return True
        except KafkaException as exc:
            log.warning("%s: commit failed (%s); the records will be delivered again", member.name, exc)
            return False

    def _commit_finished(self, member: Member, asynchronous: bool = True) -> None:
        points = {part: offset for (_, part), offset in member.lane.tracker.commit_points().items()}
        self._commit(member, points, asynchronous)
        if asynchronous:
            member.committer.poll(0)  # serve the commit results

    def _position(self, member: Member) -> dict[int, int]:
        """Per partition: the oldest record not final, else the next record the member would get."""
        out = {}
        for part, following in member.next.items():
            oldest = member.lane.tracker.first_unfinished((self.topic, part))
            out[part] = following if oldest is None else oldest
        return out

    def detach(self, member: Member) -> None:
        """Move `member` onto its own consumer group (see the module docstring). Reader thread only."""
        self.active.remove(member)
        position = self._position(member)
        if not self._commit(member, position, asynchronous=False):
            log.error("%s: position %s not committed at detach; it resumes from an older one", member.name, position)
        member.committer.close()
        member.committer = None
        following = {(self.topic, part): offset for part, offset in member.next.items()}
        log.warning(
            "%s: %d record(s) in flight (subscriber down or slow): detached from the shared reader of %s, "
            "continues on its own consumer from %s, its records in flight kept",
            member.name, member.lane.tracker.in_flight, self.topic, member.next,
        )  # fmt: skip
        member.dedicated = Dispatcher(
            member.name,
            self.config,
            member.group_id,
            [self.topic],
            member.handle,
            ordered=member.ordered,
            max_pending=member.max_pending,
            offset_reset=member.offset_reset,
            lane=member.lane,
            start_at=following,
        )
        member.dedicated.start()

    # -- the loop ------------------------------------------------------------------------------
    def _dispatch(self, messages: list[Any]) -> None:
        active = self.active
        for message in messages:
            if not usable(message, self.name):
                continue
            part = message.partition()
            offset = message.offset()
            full = None
            for member in active:
                if offset < member.starts[part]:
                    continue
                member.next[part] = offset + 1
                member.lane.accept(message)
                if member.lane.tracker.in_flight >= member.max_pending:
                    full = [*(full or ()), member]
            if full:
                for member in full:
                    self.detach(member)
                active = self.active

    def _run(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        consumer = None
        try:
            for member in self.members:
                member.committer = Consumer(self.config.consumer(member.group_id))
            consumer = Consumer(self.config.consumer(f"onnxfn-fanout-{self.topic}"))
            positions = self._positions(consumer)
            consumer.assign([TopicPartition(self.topic, part, offset) for part, offset in positions.items()])
            for member in self.members:
                if member.offset_reset == "latest":  # keep "latest" from moving on past records until the first commit
                    self._commit(member, member.starts, asynchronous=False)
            self.active = list(self.members)
            self.assigned.set()
            last_commit = time.monotonic()
            while not self._stop.is_set():
                messages = take(consumer, 0.05)
                self.stall.fetched(len(messages))
                self.stall.check(consumer, paused=False)  # it never pauses
                self._dispatch(messages)
                for member in self.members:
                    member.lane.check()
                now = time.monotonic()
                if now - last_commit >= COMMIT_INTERVAL_S:
                    for member in self.active:
                        self._commit_finished(member)
                    last_commit = now
            deadline = time.monotonic() + self._drain_s
            while any(m.lane.tracker.in_flight for m in self.active) and time.monotonic() < deadline:
                time.sleep(0.01)
            for member in self.active:
                if member.lane.tracker.in_flight > 0:
                    log.info("%s: stopping with %d record(s) not final; they will be delivered again",
                             member.name, member.lane.tracker.in_flight)  # fmt: skip
                self._commit_finished(member, asynchronous=False)
        except BaseException as exc:
            self.failed = exc
            log.exception("%s: shared reader stopped", self.name)
        finally:
            for member in self.members:
                if member.committer is not None:
                    member.committer.close()
                    member.committer = None
            if consumer is not None:
                consumer.close()
