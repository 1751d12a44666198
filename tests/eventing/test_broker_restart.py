"""A broker that restarts empty on the same address: the plane's writer notices and fails loudly,
naming what was lost, instead of writing on as if nothing happened."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from shared.eventing.broker_process import EmbeddedBroker, KafkaConfig, ensure_topics
from shared.eventing.sink import UNACKED_S, BrokerLostRecords, KafkaWriter
from shared.health import FAILED

pytestmark = pytest.mark.fault


def _write(writer: KafkaWriter, topic: str, count: int) -> list[Exception | None]:
    """Write `count` records to partition-keyed `topic` and wait for every acknowledgement."""
    results: list[Exception | None] = []
    done = threading.Semaphore(0)

    def acked(err: Exception | None) -> None:
        results.append(err)
        done.release()

    for i in range(count):
        writer.produce(topic, b"k", f"{i}".encode(), [], acked)
    for _ in range(count):
        assert done.acquire(timeout=20), "a record was never acknowledged"
    return results


def test_a_partition_whose_log_went_back_fails_the_writer_with_what_was_lost(kafka: KafkaConfig) -> None:
    """A topic deleted and recreated under a writer that does not watch it: the first
    acknowledgement at a lower offset than before is the sign."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    topic = f"restart-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, {topic: (1, 1)})
    writer = KafkaWriter(kafka)
    try:
        assert _write(writer, topic, 20) == [None] * 20
        assert writer.health().state != FAILED
        admin = AdminClient(kafka.admin())
        admin.delete_topics([topic])[topic].result(10)
        ensure_topics(kafka, {topic: (1, 1)})
        assert _write(writer, topic, 1) == [None]
        assert isinstance(writer.failed, BrokerLostRecords)
        assert f"{topic}[0]: the broker acknowledged offset 0 after 19: its log went back" in str(writer.failed)
        assert "up to 20 record(s) there are lost" in str(writer.failed)
        assert writer.health().state == FAILED
    finally:
        writer.close(timeout_s=2)


def test_a_broker_restarted_empty_fails_the_writer_that_waits_on_it() -> None:
    """The idempotent producer's records after the restart are never acknowledged (the new broker
    does not know its producer id): after UNACKED_S the writer is failed, and says why."""
    broker = EmbeddedBroker()
    kafka = broker.start()
    writer = KafkaWriter(kafka)
    try:
        ensure_topics(kafka, {"restart.t": (1, 1)})
        assert _write(writer, "restart.t", 5) == [None] * 5
        broker.stop()
        broker.start()
        ensure_topics(kafka, {"restart.t": (1, 1)})
        writer.produce("restart.t", b"k", b"after", [], lambda err: None)
        deadline = time.monotonic() + UNACKED_S + 10
        while writer.health().state != FAILED and time.monotonic() < deadline:
            time.sleep(0.1)
        health = writer.health()
        assert health.state == FAILED, health
        assert "1 record(s) not acknowledged for" in health.detail
    finally:
        writer.close(timeout_s=2)
        broker.stop()


def test_a_watched_topic_gone_after_a_restart_fails_the_writer() -> None:
    broker = EmbeddedBroker()
    kafka = broker.start()
    writer = KafkaWriter(kafka)
    try:
        ensure_topics(kafka, {"restart.a": (2, 1), "restart.b": (1, 1)})
        writer.watch(["restart.a", "restart.b"])
        _write(writer, "restart.a", 5)
        broker.stop()
        broker.start()
        deadline = time.monotonic() + 15  # it probes every second once it has seen the broker down
        while writer.failed is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(writer.failed, BrokerLostRecords)
        assert "topic(s) gone: restart.a, restart.b (deleted, or the broker restarted empty)" in str(writer.failed)
    finally:
        writer.close(timeout_s=2)
        broker.stop()
