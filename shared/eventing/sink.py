"""Writing events to Kafka topics: one shared producer, and KafkaSink / broker-topic targets.

`KafkaWriter` owns a producer (acks=all, idempotent, so per-partition order is kept) and a thread
that serves its delivery callbacks. `TopicTarget` is a KafkaSink (or the broker's own topic): it
turns an event into a record in the sink's content mode, keyed by `partitionkey`, and reports the
broker's acknowledgement through a callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.kafka_binding import Headers, to_record
from shared.events import Event
from shared.health import FAILED, Health, of_thread

log = logging.getLogger(__name__)
Acked = Callable[[Exception | None], None]
UNREACHABLE_S = 10.0  # no broker answering for this long fails the writer (and `up` exits 1)
PROBE_EVERY_S = 5.0  # how often the writer asks a broker for metadata while all looks well


class ProduceError(RuntimeError):
    """The broker did not acknowledge a record."""


class KafkaWriter:
    """A producer shared by every target in the plane, with a callback-serving thread."""

    def __init__(self, config: KafkaConfig, **extra: Any):
        from confluent_kafka import Producer

        self._stop = threading.Event()
        self.failed: BaseException | None = None
        self._unreachable_since: float | None = None  # set by ALL_BROKERS_DOWN or a failed probe
        self._probed_at = time.monotonic()
        self._last_topic: str | None = None  # what the probe asks about (not the whole cluster)
        self._producer = Producer(config.producer(error_cb=self._on_error, **extra))
        self._thread = threading.Thread(target=self._serve, name="kafka-writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                self._producer.poll(0.05)
                self._probe()
        except BaseException as exc:
            self.failed = exc
            log.exception("kafka-writer: stopped serving delivery reports")

    def _on_error(self, error: Any) -> None:
        """librdkafka's error callback: a fatal error (the idempotent producer lost its state, as
        after UNKNOWN_PRODUCER_ID) ends this writer; every later record would fail."""
        from confluent_kafka import KafkaError

        if error.fatal():
            self.failed = self.failed or ProduceError(f"fatal producer error: {error.str()}")
            log.error("kafka-writer: %s; no record can be written any more", error.str())
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                log.warning("kafka-writer: no broker reachable (%s)", error.str())
        else:
            log.debug("kafka-writer: %s", error.str())

    @property
    def unreachable(self) -> bool:
        """Every broker was down at the last look (a probe clears it once one answers)."""
        return self._unreachable_since is not None

    def _probe(self) -> None:
        """On the writer's thread: a metadata request every PROBE_EVERY_S (every second while no
        broker answers), since an idle writer gets no other sign that the brokers went away."""
        from confluent_kafka import KafkaException

        now = time.monotonic()
        every = 1.0 if self._unreachable_since is not None else PROBE_EVERY_S
        if now - self._probed_at < every:
            return
        self._probed_at = now
        try:
            self._producer.list_topics(topic=self._last_topic, timeout=1.0)
        except KafkaException as exc:
            if self._unreachable_since is None:
                self._unreachable_since = now
                log.warning("kafka-writer: no broker reachable (%s)", exc)
            return
        if self._unreachable_since is not None:
            log.warning("kafka-writer: a broker answers again after %.1f s", now - self._unreachable_since)
        self._unreachable_since = None

    def health(self) -> Health:
        """Failed when its delivery-report thread raised or ended before `close()`, or when no
        broker has answered for UNREACHABLE_S."""
        alive = self._thread.is_alive() or self._stop.is_set()
        found = of_thread("kafka-writer", alive, True, self.failed)
        since = self._unreachable_since
        if found.failed or since is None or self._stop.is_set():
            return found
        down_s = time.monotonic() - since
        state = FAILED if down_s >= UNREACHABLE_S else found.state
        return Health("kafka-writer", state, f"no broker reachable for {down_s:.0f} s")

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers, on_acked: Acked) -> None:
        """Queue one record; `on_acked(None)` once the broker has it, `on_acked(error)` if it fails.
        Raises ProduceError once the writer has failed."""
        if self.failed is not None:
            raise ProduceError(str(self.failed))

        def report(err: Any, _msg: Any) -> None:
            on_acked(None if err is None else ProduceError(f"{topic}: {err.str()}"))

        self._last_topic = topic
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
                return
            except BufferError:
                time.sleep(0.005)  # queue full: the writer thread drains it

    def flush(self, timeout_s: float = 10.0) -> int:
        remaining: int = self._producer.flush(timeout_s)
        return remaining

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (briefly when no broker is reachable), then stop; what is left is said loudly."""
        left = self.flush(1.0 if self.unreachable else timeout_s)
        if left:
            # Their input records are not committed either, so they are read and written again on
            # the next start; purged here so that close() does not wait out message.timeout.ms.
            log.error("kafka-writer: %d record(s) not acknowledged at shutdown: not written", left)
            self._producer.purge()
            self._producer.poll(0)
        self._stop.set()
        self._thread.join(timeout=2)
        self._producer.close()


class TopicTarget:
    """A KafkaSink (or the broker topic): events -> records on one topic."""

    def __init__(self, writer: KafkaWriter, topic: str, content_mode: str = "binary", name: str = ""):
        self.writer = writer
        self.topic = topic
        self.content_mode = content_mode
        self.name = name or topic

    def send(self, event: Event, on_acked: Acked) -> None:
        key, value, headers = to_record(event, self.content_mode)
        self.writer.produce(self.topic, key, value, headers, on_acked)

    def send_and_wait(self, event: Event, timeout_s: float = 10.0) -> None:
        """Produce and block until acknowledged; raises ProduceError (or TimeoutError)."""
        done = threading.Event()
        outcome: list[Exception | None] = []

        def acked(err: Exception | None) -> None:
            outcome.append(err)
            done.set()

        self.send(event, acked)
        if not done.wait(timeout_s):
            raise TimeoutError(f"{self.topic}: no acknowledgement within {timeout_s:.0f} s")
        if outcome[0] is not None:
            raise outcome[0]

    def __repr__(self) -> str:
        return f"TopicTarget({self.name!r} -> {self.topic!r}, {self.content_mode})"
