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

from shared import tracing
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.kafka_binding import Headers, to_record
from shared.events import Event, with_traceparent
from shared.health import FAILED, Health, of_thread

log = logging.getLogger(__name__)
Acked = Callable[[Exception | None], None]
UNREACHABLE_S = 10.0  # no broker answering for this long fails the writer (and `up` exits 1)
PROBE_EVERY_S = 5.0  # how often the writer asks a broker for metadata while all looks well
UNACKED_S = 10.0  # records waiting this long with no acknowledgement at all fail the writer


class ProduceError(RuntimeError):
    """The broker did not acknowledge a record."""


class BrokerLostRecords(ProduceError):
    """The cluster no longer has what it acknowledged: a watched topic is gone or has other
    partitions, or a partition's log went back (a broker restarted empty, a topic recreated)."""


class KafkaWriter:
    """A producer shared by every target in the plane, with a callback-serving thread."""

    def __init__(self, config: KafkaConfig, **extra: Any):
        from confluent_kafka import Producer

        self._stop = threading.Event()
        self.failed: BaseException | None = None
        self._unreachable_since: float | None = None  # set by ALL_BROKERS_DOWN or a failed probe
        self._probed_at = time.monotonic()
        self._progress_at = time.monotonic()  # last delivery report, or last time nothing was waiting
        self._watched: dict[str, int | None] = {}  # topic -> partitions at the first look
        self._acked: dict[tuple[str, int], int] = {}  # (topic, partition) -> highest acknowledged offset
        self._producer = Producer(config.producer(error_cb=self._on_error, **extra))
        self._thread = threading.Thread(target=self._serve, name="kafka-writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                self._producer.poll(0.05)
                if len(self._producer) == 0:
                    self._progress_at = time.monotonic()
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

    def watch(self, topics: list[str]) -> None:
        """Check these topics at every probe: gone, or a different partition count, fails the
        writer with BrokerLostRecords (so `up` stops and says what was lost)."""
        self._watched.update({topic: None for topic in topics if topic not in self._watched})
        self._probed_at = 0.0  # take the first look at once

    def _lost(self, reason: str) -> None:
        if self.failed is None:
            self.failed = BrokerLostRecords(reason)
            log.error("kafka-writer: %s", reason)

    def _check_topics(self, metadata: Any) -> None:
        gone: list[str] = []
        changed: dict[str, str] = {}
        for topic, had in self._watched.items():
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                gone.append(topic)
            elif had is None:
                self._watched[topic] = len(found.partitions)
            elif len(found.partitions) != had:
                changed[topic] = f"{topic} has {len(found.partitions)} partition(s), had {had}"
        if gone or changed:
            reached = sum(n + 1 for (t, _), n in self._acked.items() if t in gone or t in changed)
            what = [f"topic(s) gone: {', '.join(gone)}"] if gone else []
            what += [f"recreated: {c}" for c in changed.values()]
            self._lost(
                f"{'; '.join(what)} (deleted, or the broker restarted empty): records on them not yet delivered "
                f"are lost" + (f"; this plane's own writes had reached {reached} record(s) there" if reached else "")
            )

    def _check_offset(self, topic: str, partition: int, offset: int) -> None:
        """A partition's acknowledged offsets only grow; one that went back lost its log."""
        last = self._acked.get((topic, partition), -1)
        if offset < last:
            self._lost(
                f"{topic}[{partition}]: the broker acknowledged offset {offset} after {last}: its log went back "
                f"(the broker restarted empty, or the topic was recreated); up to {last + 1} record(s) there are lost"
            )
        self._acked[(topic, partition)] = max(last, offset)

    @property
    def unreachable(self) -> bool:
        """Every broker was down at the last look (a probe clears it once one answers)."""
        return self._unreachable_since is not None

    def _probe(self) -> None:
        """On the writer's thread: a metadata request every PROBE_EVERY_S (every second while no
        broker answers), since an idle writer gets no other sign that the brokers went away; it
        also checks the watched topics."""
        from confluent_kafka import KafkaException

        now = time.monotonic()
        every = 1.0 if self._unreachable_since is not None else PROBE_EVERY_S
        if now - self._probed_at < every:
            return
        self._probed_at = now
        try:
            metadata = self._producer.list_topics(timeout=1.0)  # all topics: asking for one may create it
        except KafkaException as exc:
            if self._unreachable_since is None:
                self._unreachable_since = now
                log.warning("kafka-writer: no broker reachable (%s)", exc)
            return
        if self._unreachable_since is not None:
            log.warning("kafka-writer: a broker answers again after %.1f s", now - self._unreachable_since)
            self._progress_at = now  # what waited for it gets its UNACKED_S from now
        self._unreachable_since = None
        self._check_topics(metadata)

    def health(self) -> Health:
        """Failed when its delivery-report thread raised or ended before `close()`, when no broker
        has answered for UNREACHABLE_S, or when records have waited UNACKED_S with no report at all
        (a broker that restarted and lost this producer's state answers, but never acknowledges)."""
        alive = self._thread.is_alive() or self._stop.is_set()
        found = of_thread("kafka-writer", alive, True, self.failed)
        if found.failed or self._stop.is_set():
            return found
        now = time.monotonic()
        if self._unreachable_since is not None:
            down_s = now - self._unreachable_since
            state = FAILED if down_s >= UNREACHABLE_S else found.state
            return Health("kafka-writer", state, f"no broker reachable for {down_s:.0f} s")
        waiting, stuck_s = len(self._producer), now - self._progress_at
        if waiting and stuck_s >= UNACKED_S:
            return Health(
                "kafka-writer",
                FAILED,
                f"{waiting} record(s) not acknowledged for {stuck_s:.0f} s although the broker answers "
                "(it restarted and lost this producer's state?)",
            )
        return found

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers, on_acked: Acked) -> None:
        """Queue one record; `on_acked(None)` once the broker has it, `on_acked(error)` if it fails.
        Raises ProduceError once the writer has failed."""
        if self.failed is not None:
            raise ProduceError(str(self.failed))

        def report(err: Any, msg: Any) -> None:
            self._progress_at = time.monotonic()
            if err is None:
                self._check_offset(topic, msg.partition(), msg.offset())
            on_acked(None if err is None else ProduceError(f"{topic}: {err.str()}"))

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
        if tracing.enabled():
            event, on_acked = self._traced(event, on_acked)
        key, value, headers = to_record(event, self.content_mode)
        self.writer.produce(self.topic, key, value, headers, on_acked)

    def _traced(self, event: Event, on_acked: Acked) -> tuple[Event, Acked]:
        """The Kafka write as a span (ended at the broker's acknowledgement); the record carries it."""
        attributes = {"messaging.system": "kafka", "messaging.destination.name": self.topic}
        span = tracing.start(f"produce {self.topic}", event.get("traceparent"), kind="producer", attributes=attributes)

        def acked(err: Exception | None) -> None:
            tracing.end(span, error=str(err) if err is not None else "")
            on_acked(err)

        return with_traceparent(event, tracing.traceparent(span)), acked

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
