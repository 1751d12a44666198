"""The shared reader: start positions per member, skipping below a member's start, per-group
commits, and detaching a member whose window is full onto its own consumer group."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from shared.eventing.broker_process import KafkaConfig, ensure_topics
from shared.eventing.dispatcher import Finish
from shared.eventing.fanout import Member, SharedReader, start_positions


def test_start_positions_committed_else_reset() -> None:
    marks = {0: (2, 10), 1: (0, 7), 2: (0, 0)}
    committed: dict[int, int | None] = {0: 5, 1: -1001, 2: None}
    assert start_positions([0, 1, 2], committed, marks, "earliest") == {0: 5, 1: 0, 2: 0}
    assert start_positions([0, 1, 2], committed, marks, "latest") == {0: 5, 1: 7, 2: 0}


def _topic(kafka: KafkaConfig, partitions: int, per_partition: int) -> str:
    from confluent_kafka import Producer

    topic = f"fanout-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, {topic: (partitions, 1)})
    producer = Producer(kafka.producer())
    for i in range(per_partition):
        for part in range(partitions):
            producer.produce(topic, value=f"{part}:{i}".encode(), partition=part)
    assert producer.flush(10) == 0
    return topic


def _commit(kafka: KafkaConfig, group: str, topic: str, offsets: dict[int, int]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.consumer(group))
    consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    consumer.close()


def _committed(kafka: KafkaConfig, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.consumer(group))
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        consumer.close()


def _high_watermark(kafka: KafkaConfig, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.consumer("probe"))
    try:
        high: int = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
        return high
    finally:
        consumer.close()


def _until(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Recorder:
    """A handler that records (partition, offset) and finishes at once (or holds the finish)."""

    def __init__(self, hold: bool = False):
        self.hold = hold
        self.seen: list[tuple[int, int]] = []
        self.held: list[Finish] = []
        self.lock = threading.Lock()

    def __call__(self, message: Any, finish: Finish) -> None:
        with self.lock:
            self.seen.append((message.partition(), message.offset()))
            if self.hold:
                self.held.append(finish)
                return
        finish()

    def release(self) -> None:
        with self.lock:
            self.hold = False
            held, self.held = self.held, []
        for finish in held:
            finish()

    def offsets(self, partition: int) -> list[int]:
        with self.lock:
            return sorted({o for p, o in self.seen if p == partition})


def test_each_member_starts_at_its_own_offset_and_commits_under_its_own_group(kafka: KafkaConfig) -> None:
    topic = _topic(kafka, partitions=2, per_partition=10)
    prefix = uuid.uuid4().hex[:8]
    _commit(kafka, f"{prefix}-a", topic, {0: 3, 1: 0})  # a: from 3 on partition 0
    _commit(kafka, f"{prefix}-c", topic, {0: 8})  # c: from 8 on 0, none on 1 -> latest there
    a, b, c = Recorder(), Recorder(), Recorder()
    reader = SharedReader(
        "t",
        kafka,
        topic,
        [
            Member("a", f"{prefix}-a", a),
            Member("b", f"{prefix}-b", b),  # nothing committed: earliest
            Member("c", f"{prefix}-c", c, offset_reset="latest"),
        ],
    )
    reader.start()
    try:
        assert reader.assigned.wait(20), reader.failed
        # latest = the high watermark the broker reports (Tansu's may lag behind the records produced)
        high = _high_watermark(kafka, topic, 1)
        assert reader.members[2].starts == {0: 8, 1: high}
        _until(lambda: len(b.offsets(0)) == 10 and len(b.offsets(1)) == 10, what="b's records")
        _until(lambda: len(a.offsets(0)) == 7 and len(c.offsets(0)) == 2, what="a's and c's records")
        assert a.offsets(0) == list(range(3, 10)) and a.offsets(1) == list(range(10))
        _until(lambda: c.offsets(1) == list(range(high, 10)), what="c's records on partition 1")
        assert c.offsets(0) == [8, 9]
        for name in "abc":
            _until(
                lambda name=name: _committed(kafka, f"{prefix}-{name}", topic, 2) == {0: 10, 1: 10},  # type: ignore[misc]
                what=f"{name}'s commits",
            )
        assert not reader.detached
    finally:
        reader.stop(drain_s=1)
    assert reader.failed is None


@pytest.mark.fault
def test_a_member_whose_window_is_full_is_detached_and_gets_each_record_once(kafka: KafkaConfig) -> None:
    topic = _topic(kafka, partitions=1, per_partition=12)
    prefix = uuid.uuid4().hex[:8]
    fast, slow = Recorder(), Recorder(hold=True)
    reader = SharedReader(
        "t",
        kafka,
        topic,
        [Member("fast", f"{prefix}-fast", fast, max_pending=4), Member("slow", f"{prefix}-slow", slow, max_pending=4)],
    )
    reader.start()
    try:
        assert reader.assigned.wait(20), reader.failed
        # slow holds its records: its window (4) fills, it is detached; fast goes on unblocked.
        _until(lambda: len(fast.offsets(0)) == 12, what="fast's records")
        _until(lambda: _committed(kafka, f"{prefix}-fast", topic, 1) == {0: 12}, what="fast's commits")
        _until(lambda: [m.name for m in reader.detached] == ["slow"], what="slow detached")
        member = reader.members[1]
        assert member.committer is None  # the shared phase commits nothing more for slow
        assert member.dedicated is not None
        # Its own consumer takes over its lane: the records held in the shared phase stay in flight
        # (not sent again) and it goes on from the next one; its commit stays at the oldest
        # unfinished record, so a crash now would deliver them again.
        _until(lambda: len(slow.offsets(0)) == 12, what="slow's records past the shared phase")
        assert sorted(slow.seen) == [(0, offset) for offset in range(12)]  # each once
        assert _committed(kafka, f"{prefix}-slow", topic, 1) in ({}, {0: 0})
        slow.release()
        _until(lambda: _committed(kafka, f"{prefix}-slow", topic, 1) == {0: 12}, what="slow's commits")
        assert sorted(slow.seen) == [(0, offset) for offset in range(12)]
    finally:
        reader.stop(drain_s=1)
    assert reader.failed is None
