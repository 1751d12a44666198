"""`onnxfn worker NAME`: a function's consume-infer-produce loop over Kafka, with no HTTP hop.

It reads the broker topic under the consumer group of the function's Trigger (so a trigger moved
from HTTP delivery to a worker keeps its offsets), applies that Trigger's filter, runs what is
fetched as one batch through the function's pipeline (preprocess, the dynamic batcher and the
model, postprocess; up to 4 x the function's `max_batch_size` events a pass, each model run at most
`max_batch_size` rows, no added wait for a lone event), and
writes each result to the broker topic in Kafka binary mode, where downstream triggers and
KafkaSinks take it as they take an HTTP reply.

- Failures: an event the function refuses (a 4xx error event) or that still fails after the
  Trigger's retries is dead-lettered with `knativeerrordest`/`knativeerrorcode`/`knativeerrordata`,
  one by one; a record that is no CloudEvent is dead-lettered wrapped. No dead-letter sink: an
  error event with the reason goes to the broker topic instead, so nothing vanishes.
- Offsets: a record is final once its result (or dead letter) is acknowledged by Kafka; commits
  go up to the oldest record not final (at-least-once; one delivery in normal operation). Batches
  run one after the other, so per-partition order is kept (ordered mode holds by construction).
- SIGTERM: stop fetching, finish the batch, wait for acknowledgements, commit, leave the group.
- `GET /health/readiness` (200 once the model is loaded and partitions assigned; else 503 with the
  reason, as a Service's: a GPU asked for and not usable stays there, alive), `/health/liveness`
  and `/metrics` (the function's metrics and the worker's: events by outcome, batch sizes, lag).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from shared import tracing
from shared.errors import FunctionError, InvalidEvent
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.delivery import Outcome, dead_letter_event, failed_reply
from shared.eventing.dispatcher import COMMIT_INTERVAL_S, commit_offsets, take, usable
from shared.eventing.kafka_binding import binary_attributes, from_record, wrap_record
from shared.eventing.offsets import OffsetTracker
from shared.eventing.sink import KafkaWriter, TopicTarget
from shared.eventing.spec import EventingSpec, TriggerSpec
from shared.events import ERROR_EVENT_TYPE, Event, result_event
from shared.pipeline import Pipeline
from shared.readiness import readiness_state
from shared.service_files import SpecError
from shared.stop_signal import StopSignal

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
MAX_IN_FLIGHT = 4096  # records fetched and not final before the worker waits for acknowledgements
LAG_EVERY_S = 5.0
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker reads and writes, resolved from the eventing YAML."""

    function: str
    trigger: TriggerSpec
    broker_topic: str
    dead_letter: tuple[str, str] | None  # (topic, content mode)

    @classmethod
    def of(cls, spec: EventingSpec, function: str) -> WorkerPlan:
        """The one Trigger whose subscriber is Service `function`; SpecError when none or several."""
        found = [
            t
            for t in spec.triggers
            if t.subscriber.ref is not None and t.subscriber.ref.kind == "Service" and t.subscriber.ref.name == function
        ]
        if len(found) != 1:
            names = ", ".join(t.name for t in found) or "none"
            raise SpecError(f"worker {function}: exactly one Trigger must subscribe Service {function} (found {names})")
        trigger = found[0]
        broker = spec.brokers[f"{trigger.namespace}/{trigger.broker}"]
        dead = trigger.delivery.dead_letter
        dead_letter = None
        if dead is not None:
            ref = dead.ref
            if ref is not None and ref.kind == "KafkaSink":
                sink = spec.sinks[f"{ref.namespace}/{ref.name}"]
                dead_letter = (sink.topic, sink.content_mode)
            elif ref is not None and ref.kind == "Broker":
                dead_letter = (spec.brokers[f"{ref.namespace}/{ref.name}"].topic, "binary")
            else:
                raise SpecError(
                    f"worker {function}: Trigger/{trigger.name}'s deadLetterSink must be a KafkaSink or Broker"
                )
        return cls(function, trigger, broker.topic, dead_letter)


class WorkerMetrics:
    """The worker's own series, on the pipeline's registry (one /metrics for both)."""

    def __init__(self, pipeline: Pipeline) -> None:
        registry = pipeline.metrics.registry
        name = pipeline.config.name
        self.registry = registry
        events = Counter(
            "onnxfn_worker_events", "Records handled by outcome", ["function", "outcome"], registry=registry
        )
        self.outcome = {o: events.labels(name, o) for o in ("result", "dead_letter", "filtered")}
        self.batch = Histogram(
            "onnxfn_worker_batch_size", "Events per run", ["function"], buckets=BATCH_BUCKETS, registry=registry
        ).labels(name)
        self.lag = Gauge(
            "onnxfn_worker_lag", "Records behind the topic's end", ["function", "partition"], registry=registry
        )
        self.function = name


class KafkaWorker:
    """The loop (`run`) and what it needs: consumer, writer, pipeline on its own event loop."""

    def __init__(
        self,
        plan: WorkerPlan,
        kafka: KafkaConfig,
        pipeline: Pipeline,
        assign_all: bool = False,
        writer: KafkaWriter | None = None,
    ) -> None:
        """`assign_all`: read every partition without joining the consumer group (no ~3 s group join
        at a cold start); only for a group's one consumer, as `onnxfn up` runs it. Offsets are the
        group's, committed the same way."""
        self.plan = plan
        self.assign_all = assign_all
        self.kafka = kafka
        self.pipeline = pipeline
        self.metrics = WorkerMetrics(pipeline)
        self.tracker = OffsetTracker()
        self.assigned = threading.Event()
        self.stop = StopSignal()
        self.failed: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="worker-loop", daemon=True)
        # Made first thing by `main`: an idempotent producer's first acknowledgement waits ~0.5 s
        # for its producer id, which then overlaps the model load instead of the first batch.
        self.writer: KafkaWriter | None = writer
        self._lag_at = 0.0
        self._first_batch_logged = False

    @property
    def ready(self) -> bool:
        return self.failed is None and self.assigned.is_set() and self.pipeline.ready

    def not_ready_reason(self) -> str:
        """Why readiness is 503, as a Service's readiness says it (the model's load failure first)."""
        if self.failed is not None:
            return f"stopped: {self.failed}"
        if not self.pipeline.ready:
            return self.pipeline.not_ready_error().message
        return f"waiting for partitions of {self.plan.broker_topic} (consumer group {self.plan.trigger.group_id})"

    # -- one batch -----------------------------------------------------------------------------
    def _run_batch(self, events: list[Event]) -> list[Event] | FunctionError:
        """Results in order, or the retryable error that remained after the Trigger's retries."""
        delivery = self.plan.trigger.delivery
        attempt = 0
        while True:
            future = asyncio.run_coroutine_threadsafe(self.pipeline.process_batch(events), self._loop)
            try:
                return future.result()
            except FunctionError as exc:
                attempt += 1
                if attempt > (delivery.retry or 0) or self.stop.is_set():
                    return exc
                log.warning(
                    "worker %s: batch of %d failed (%s); retry %d", self.plan.function, len(events), exc, attempt
                )
                self.stop.wait(delivery.delay_s(attempt))

    def _send(self, target: TopicTarget, event: Event, message: Any) -> None:
        tp, offset = (message.topic(), message.partition()), message.offset()

        def acked(err: Exception | None) -> None:
            if err is not None:  # not final: never committed; the worker stops and it is read again
                self.failed = self.failed or err
                return
            self.tracker.finish(tp, offset)

        target.send(event, acked)

    def _dead_letter(self, event: Event, outcome: Outcome, message: Any) -> None:
        """To the Trigger's deadLetterSink; without one, an error event with the reason goes to the
        broker topic (not the event itself: the worker's own filter would take it again)."""
        self.metrics.outcome["dead_letter"].inc()
        assert self.writer is not None
        if self.plan.dead_letter is None:
            log.error("worker %s: event %s failed (%s); no deadLetterSink", self.plan.function, event.id, outcome.error)
            data = {"status": outcome.status, "message": outcome.error}
            p = self.pipeline
            error = result_event(event, ERROR_EVENT_TYPE, p.source, data, p.model_version, p.revision)
            self._send(TopicTarget(self.writer, self.plan.broker_topic), error, message)
            return
        topic, mode = self.plan.dead_letter
        dead = dead_letter_event(event, f"worker:{self.plan.function}", outcome)
        self._send(TopicTarget(self.writer, topic, mode), dead, message)

    def handle(self, messages: list[Any], results_to: TopicTarget) -> None:
        """Decode, filter, run, write: each record ends final once its write is acknowledged."""
        batch: list[tuple[Event, Any]] = []
        match = self.plan.trigger.filter.match
        filtered = 0
        for message in messages:
            tp, offset, headers = (message.topic(), message.partition()), message.offset(), message.headers()
            # Filter on the headers first: records for other triggers are never decoded.
            attributes = binary_attributes(headers)
            if attributes is not None and not match(attributes):
                self.tracker.passed(tp, offset)
                filtered += 1
                continue
            self.tracker.add(tp, offset)
            try:
                event = from_record(headers, message.value())
            except InvalidEvent as exc:
                wrapped = wrap_record(
                    topic=message.topic(), partition=message.partition(), offset=offset,
                    timestamp_ms=message.timestamp()[1], key=message.key(), headers=headers,
                    value=message.value(), namespace=self.plan.trigger.namespace, source_name=self.plan.trigger.name,
                )  # fmt: skip
                self._dead_letter(wrapped, Outcome(False, error=f"invalid CloudEvent: {exc.message}"), message)
                continue
            if attributes is None and not match(event.attributes):  # structured mode
                self.tracker.finish(tp, offset)
                filtered += 1
                continue
            batch.append((event, message))
        if filtered:
            self.metrics.outcome["filtered"].inc(filtered)
        if not batch:
            return
        self.metrics.batch.observe(len(batch))
        started = time.monotonic()
        results = self._run_batch([event for event, _ in batch])
        if not self._first_batch_logged:
            self._first_batch_logged = True
            log.info(
                "worker %s: first batch of %d at %.2f s after the process started, run in %.3f s",
                self.plan.function, len(batch), _process_age_s(), time.monotonic() - started,
            )  # fmt: skip
        for index, (event, message) in enumerate(batch):
            if isinstance(results, FunctionError):
                body = orjson.dumps(results.to_json())
                self._dead_letter(event, Outcome(False, results.status, body=body, error=results.message), message)
                continue
            result = results[index]
            failed = failed_reply(result)
            if failed is not None:
                self._dead_letter(event, failed, message)
                continue
            self.metrics.outcome["result"].inc()
            self._send(results_to, result, message)

    # -- the loop ------------------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        if not self.assigned.is_set():
            log.info(
                "worker %s: %d partition(s) assigned %.2f s after the process started",
                self.plan.function, len(partitions), _process_age_s(),
            )  # fmt: skip
        self.assigned.set()

    def _assign_all(self, consumer: Any) -> None:
        """Every partition of the broker topic, each from the group's committed offset."""
        from confluent_kafka import TopicPartition

        topic = self.plan.broker_topic
        meta = consumer.list_topics(topic, timeout=10.0).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"worker {self.plan.function}: topic {topic}: {meta.error}")
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        consumer.assign(partitions)  # no offset given: the committed one, else auto.offset.reset
        self._on_assign(consumer, partitions)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Between batches (callbacks run inside poll): wait for what is written, commit it."""
        assert self.writer is not None
        self.writer.flush(10.0)
        self._commit(consumer, asynchronous=False)
        self.tracker.forget([(p.topic, p.partition) for p in partitions])

    def _commit(self, consumer: Any, asynchronous: bool = True) -> None:
        commit_offsets(consumer, self.tracker.commit_points(), f"worker {self.plan.function}", asynchronous)

    def _measure_lag(self, consumer: Any) -> None:
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        for tp in consumer.position(consumer.assignment()):
            try:
                _, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            except Exception:  # a metric only: never fail the loop for it
                continue
            behind = max(0, high - tp.offset) if tp.offset >= 0 else high
            self.metrics.lag.labels(self.metrics.function, str(tp.partition)).set(behind)

    def _hold_until_ready(self, consumer: Any) -> list[Any] | None:
        """While the model loads: keep the consumer polled (a group join and its rebalances happen
        inside poll) with its partitions paused, and keep whatever record a poll still returns (one
        fetched before the pause took effect); they are the first batch once the model is ready.
        None when stopped first. A record dropped here would be skipped for good: the commits after
        the first batch go past it."""
        early: list[Any] = []
        while not self.pipeline.wait_ready(0.1):
            if self.stop.is_set():
                return None
            message = consumer.poll(0)
            if message is not None and usable(message, f"worker {self.plan.function}"):
                early.append(message)
            held = consumer.assignment()
            if held:
                consumer.pause(held)
        held = consumer.assignment()
        if held:
            consumer.resume(held)
        mine = {(tp.topic, tp.partition) for tp in held}
        kept = [m for m in early if (m.topic(), m.partition()) in mine]  # a revoked partition's are its new owner's
        if kept:
            log.info(
                "worker %s: %d record(s) fetched while the model loaded, handled first",
                self.plan.function, len(kept),
            )  # fmt: skip
        return kept

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0) or a failure (1)."""
        from confluent_kafka import Consumer

        self._loop_thread.start()
        self._loop.call_soon_threadsafe(self.pipeline.start)
        self.writer = self.writer or KafkaWriter(self.kafka)
        results_to = TopicTarget(self.writer, self.plan.broker_topic, "binary")
        limit = self.pipeline.layout.max_batch_size
        consumer = Consumer(self.kafka.consumer(self.plan.trigger.group_id))
        try:
            if self.assign_all:
                self._assign_all(consumer)
            else:
                consumer.subscribe([self.plan.broker_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
            early = self._hold_until_ready(consumer)
            if early is None:
                return 0
            if early:
                self.handle(early, results_to)
            last_commit = time.monotonic()
            while not self.stop.is_set() and self.failed is None:
                while self.tracker.in_flight >= MAX_IN_FLIGHT and self.failed is None:
                    self.writer.flush(0.05)
                # up to 4 model runs a pass: their preprocess and writes overlap the next run
                messages = [
                    m
                    for m in take(consumer, 0.05, batch=max(0, 4 * limit - 1))
                    if usable(m, f"worker {self.plan.function}")
                ]
                if messages:
                    self.handle(messages, results_to)
                now = time.monotonic()
                if now - last_commit >= COMMIT_INTERVAL_S:
                    self._commit(consumer)
                    last_commit = now
                self._measure_lag(consumer)
                health = self.writer.health()
                if health.failed:
                    self.failed = RuntimeError(health.detail)
            left = self.writer.flush(10.0)
            if left:
                log.error(
                    "worker %s: %d write(s) not acknowledged at stop; read again next time", self.plan.function, left
                )
            self._commit(consumer, asynchronous=False)
        finally:
            consumer.close()
            self.writer.close(timeout_s=2.0)
            self.pipeline.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self.failed is not None:
            log.error("worker %s: stopped: %s", self.plan.function, self.failed)
            return 1
        return 0


def _process_age_s() -> float:
    """Seconds since this process started (from /proc: includes the interpreter's start and imports)."""
    from shared.process import process_started_at

    return time.time() - process_started_at(os.getpid())


def serve_health(worker: KafkaWorker, host: str, port: int) -> ThreadingHTTPServer:
    """Readiness, liveness and /metrics on a small threaded HTTP server (probes and Prometheus)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/metrics":
                status, body, kind = 200, generate_latest(worker.metrics.registry), "text/plain; version=0.0.4"
            elif self.path == "/health/readiness":
                reason = None if worker.ready else worker.not_ready_reason()
                status = 200 if reason is None else 503
                body, kind = orjson.dumps(readiness_state(worker.plan.function, reason)), "application/json"
            elif self.path == "/health/liveness":
                ok = worker.failed is None
                status, body, kind = (
                    (200 if ok else 503),
                    (b"alive" if ok else str(worker.failed).encode()),
                    "text/plain",
                )
            else:
                status, body, kind = 404, b"not found", "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    return server


def main(
    function: str,
    eventing_dir: Path,
    knative_dir: Path | None,
    kafka: KafkaConfig,
    host: str,
    port: int,
    assign_all: bool = False,
    writer: KafkaWriter | None = None,
) -> int:
    """`onnxfn worker`: resolve the plan, load the function, serve until stopped (`worker_cli`)."""
    from shared.config import Settings
    from shared.contract import load_handler
    from shared.eventing import spec
    from shared.metrics import Metrics

    plan = WorkerPlan.of(spec.load(eventing_dir, knative_dir), function)
    writer = writer or KafkaWriter(kafka)
    # One process holds the session: the in-process batcher, never a separate engine, and the
    # onnxruntime threads of the whole machine (the layout divides cores among HTTP workers).
    settings = Settings.from_env(
        {"ONNXFN_WORKERS": "1", **os.environ, "ONNXFN_ENGINE": "per-worker"}, function=function
    )
    log.info("worker %s: imports done %.2f s after the process started", function, _process_age_s())
    handler = load_handler(settings.function)
    tracing.configure(handler.config.name)
    pipeline = Pipeline(handler, settings, Metrics(handler.config.name))
    pipeline.server_started_at = time.time() - _process_age_s()
    worker = KafkaWorker(plan, kafka, pipeline, assign_all, writer)
    worker.stop.install()
    server = serve_health(worker, host, port)
    dead = plan.dead_letter[0] if plan.dead_letter else "none (error events to the broker topic)"
    print(
        f"worker {function}: Trigger/{plan.trigger.name} (group {plan.trigger.group_id}) on {plan.broker_topic}; "
        f"dead letters to {dead}; health and metrics on http://{host}:{server.server_address[1]}/",
        flush=True,
    )
    try:
        return worker.run()
    finally:
        server.shutdown()
        tracing.shutdown()
