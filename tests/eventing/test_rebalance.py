"""A consumer-group rebalance while a record is still being delivered (its subscriber retrying):
the partition stays where it is (cooperative-sticky), the record keeps its in-flight state and is
handled once; nothing is fetched again."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from shared.eventing.broker_process import KafkaConfig, ensure_topics
from shared.eventing.dispatcher import Dispatcher, Finish

pytestmark = pytest.mark.fault


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_member_joining_mid_retry_neither_moves_nor_redelivers_the_record(kafka: KafkaConfig) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic, group = f"rebalance-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, {topic: (1, 1)})
    producer = Producer(kafka.producer())
    producer.produce(topic, value=b"first")
    assert producer.flush(10) == 0

    handled: list[tuple[str, int]] = []
    held: list[Finish] = []
    lock = threading.Lock()

    def handler(member: str) -> Callable[[Any, Finish], None]:
        def handle(message: Any, finish: Finish) -> None:
            with lock:
                handled.append((member, message.offset()))
            if message.offset() == 0:
                held.append(finish)  # still being retried: not final until the test says so
            else:
                finish()

        return handle

    first = Dispatcher("first", kafka, group, [topic], handler("first"))
    second = Dispatcher("second", kafka, group, [topic], handler("second"))
    first.start()
    try:
        _wait(lambda: bool(held), 30, "the first member to start delivering offset 0")
        second.start()
        _wait(second.assigned.is_set, 30, "the rebalance that lets the second member in")
        held[0]()  # the delivery succeeds after the rebalance
        producer.produce(topic, value=b"second")
        assert producer.flush(10) == 0
        _wait(lambda: any(offset == 1 for _, offset in handled), 30, "offset 1 to be handled")
    finally:
        second.stop(drain_s=1.0)
        first.stop(drain_s=1.0)
    # Offset 0 would have been handled again by whoever got the partition after an eager revoke.
    assert handled == [("first", 0), ("first", 1)]
    consumer = Consumer(kafka.consumer(group))
    try:
        (committed,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    assert committed.offset == 2
