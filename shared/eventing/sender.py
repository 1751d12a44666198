"""Send one event to a destination and settle its outcome: reply, dead letter, or done.

A destination is an HTTP subscriber (a function, or any `uri`) or a Kafka topic (a KafkaSink, the
broker topic). HTTP deliveries run on a bounded thread pool; a reply goes to `reply_to` (the broker
topic for triggers; none for sources, whose replies Knative discards). A failed delivery goes to the
dead-letter destination with the `knativeerror*` extensions, or is dropped with an error log when
there is none. `finish()` is called only once the outcome is final and acknowledged by Kafka; a
record Kafka does not acknowledge stays uncommitted (and is delivered again after a restart).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from shared import tracing
from shared.eventing.delivery import Abandoned, HttpSubscriber, Outcome, dead_letter_event
from shared.eventing.sink import TopicTarget
from shared.events import Event, with_traceparent
from shared.health import FAILED, READY, Health

log = logging.getLogger(__name__)
# Batched requests one batched sender keeps in flight (each carries up to `batch` events).
BATCH_REQUESTS_IN_FLIGHT = 4
Finish = Callable[[], None]
Target = HttpSubscriber | TopicTarget


class TracedFinish:
    """`finish` of an event whose delivery is traced: ends the delivery's span when it is called."""

    __slots__ = ("finish", "span")

    def __init__(self, span: tracing.Span | tracing.PassedOn | None, finish: Finish) -> None:
        self.span = span
        self.finish = finish

    def __call__(self) -> None:
        tracing.end(self.span)
        self.finish()


def _trace_outcome(finish: Finish, outcome: Outcome) -> None:
    """The outcome on the delivery's span, and each attempt as a child span when it was retried."""
    if not isinstance(finish, TracedFinish) or not isinstance(finish.span, tracing.Span) or not finish.span.sampled:
        return
    span = finish.span
    span.attributes.update({"onnxfn.delivery.attempts": outcome.attempts, "onnxfn.delivery.ok": outcome.ok})
    if outcome.status is not None:
        span.attributes["http.response.status_code"] = outcome.status
    if not outcome.ok:
        span.error = outcome.error or f"status {outcome.status}"
    if len(outcome.tries) > 1:
        for number, (start, end, status, error) in enumerate(outcome.tries, 1):
            attrs = {"onnxfn.delivery.attempt": number, **({"http.response.status_code": status} if status else {})}
            tracing.record(f"attempt {number}", span, start, end, attrs, kind="client", error=error)


def describe(target: Target) -> str:
    """The `knativeerrordest` of a target."""
    return target.url if isinstance(target, HttpSubscriber) else f"kafka://{target.topic}"


class Sender:
    """Delivers to one destination on behalf of a trigger or a source named `owner`."""

    def __init__(
        self,
        owner: str,
        target: Target,
        reply_to: TopicTarget | None,
        dead_letter: Target | None,
        concurrency: int = 50,
        batch: int = 1,
    ):
        self.owner = owner
        self.target = target
        self.reply_to = reply_to
        self.dead_letter_target = dead_letter
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"send-{owner}")
        self.on_outcome: Callable[[Event, Outcome], None] | None = None  # for tests and `up`
        self.batch = batch if isinstance(target, HttpSubscriber) else 1
        self._closed = False
        self._queue: queue.SimpleQueue[tuple[Event, Finish] | None] = queue.SimpleQueue()
        self._batchers = [
            threading.Thread(target=self._batch_loop, name=f"batch-{owner}-{i}", daemon=True)
            for i in range(BATCH_REQUESTS_IN_FLIGHT if self.batch > 1 else 0)
        ]
        for thread in self._batchers:
            thread.start()

    def send(self, event: Event, finish: Finish) -> None:
        if tracing.enabled():
            span = tracing.start(
                f"deliver {self.owner}",
                event.get("traceparent"),
                kind="producer" if isinstance(self.target, TopicTarget) else "client",
                attributes={"onnxfn.destination": describe(self.target), "cloudevents.event_type": event.type},
            )
            event, finish = with_traceparent(event, tracing.traceparent(span)), TracedFinish(span, finish)
        if isinstance(self.target, TopicTarget):
            acked = self._acked(event, finish, f"sink {self.target.name}")
            if self.on_outcome is not None:
                acked = self._reported(event, acked)
            self.target.send(event, acked)
        elif self.batch > 1:
            self._queue.put((event, finish))
        else:
            self.pool.submit(self._deliver, self.target, event, finish)

    def _batch_loop(self) -> None:
        """Take what is waiting (up to `batch` events, no added wait) and deliver it in one request."""
        assert isinstance(self.target, HttpSubscriber)
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            while len(items) < self.batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # for the next batcher
                    break
                items.append(item)
            events = [event for event, _ in items]
            try:
                outcomes = self.target.deliver_batch(events)
            except Abandoned:
                continue  # shutting down: not final, not committed
            except Exception as exc:  # a bug must not lose the events: dead-letter them with the error
                log.exception("%s: batched delivery of %d events failed", self.owner, len(events))
                outcomes = [Outcome(False, error=f"{type(exc).__name__}: {exc}") for _ in events]
            for (event, finish), outcome in zip(items, outcomes, strict=True):
                self._settle(self.target, event, outcome, finish)

    def _acked(self, event: Event, finish: Finish, what: str) -> Callable[[Exception | None], None]:
        def acked(err: Exception | None) -> None:
            if err is None:
                finish()
            else:
                log.error("%s: event %s not acknowledged by %s (%s); left uncommitted", self.owner, event.id, what, err)

        return acked

    def _reported(self, event: Event, acked: Callable[[Exception | None], None]) -> Callable[[Exception | None], None]:
        """`acked`, telling `on_outcome` first (a write to a topic has no other outcome)."""
        hook = self.on_outcome
        assert hook is not None

        def reported(err: Exception | None) -> None:
            hook(event, Outcome(err is None, error="" if err is None else str(err)))
            acked(err)

        return reported

    def _deliver(self, target: HttpSubscriber, event: Event, finish: Finish) -> None:
        try:
            outcome = target.deliver(event)
        except Abandoned:
            return  # shutting down: not final, not committed
        except Exception as exc:  # a bug must not lose the event: dead-letter it with the error
            log.exception("%s: delivery of %s failed", self.owner, event.id)
            outcome = Outcome(False, error=f"{type(exc).__name__}: {exc}")
        self._settle(target, event, outcome, finish)

    def _settle(self, target: HttpSubscriber, event: Event, outcome: Outcome, finish: Finish) -> None:
        """Reply into the broker, dead-letter, or finish, by the delivery's outcome."""
        if self.on_outcome is not None:
            self.on_outcome(event, outcome)
        _trace_outcome(finish, outcome)
        if not outcome.ok:
            self.fail(event, outcome, describe(target), finish)
        elif outcome.reply is not None and self.reply_to is not None:
            self.reply_to.send(outcome.reply, self._acked(outcome.reply, finish, "the broker (reply)"))
        else:
            finish()

    def fail(self, event: Event, outcome: Outcome, destination: str, finish: Finish) -> None:
        """Dead-letter `event`, or drop it with an error log when there is no dead-letter sink."""
        dls = self.dead_letter_target
        detail = f"status {outcome.status}" if outcome.status is not None else outcome.error
        if dls is None:
            log.error("%s: event %s failed (%s) with no dead-letter sink; dropped", self.owner, event.id, detail)
            finish()
            return
        log.warning("%s: event %s failed (%s); sent to the dead-letter sink", self.owner, event.id, detail)
        failed = dead_letter_event(event, destination, outcome)
        if isinstance(dls, TopicTarget):
            dls.send(failed, self._acked(event, finish, f"dead-letter sink {dls.name}"))
            return

        def post() -> None:
            try:
                result = dls.deliver(failed)
            except Abandoned:
                return
            if not result.ok:
                log.error("%s: dead-letter sink failed for %s; dropped", self.owner, event.id)
            finish()

        self.pool.submit(post)

    def health(self) -> Health:
        """Failed when one of its batched-delivery threads ended while the plane runs."""
        dead = sum(not thread.is_alive() for thread in self._batchers)
        if dead and not self._closed:
            return Health(f"sender {self.owner}", FAILED, f"{dead} batched-delivery thread(s) ended")
        return Health(f"sender {self.owner}", READY)

    def close(self) -> None:
        self._closed = True
        for _ in self._batchers:
            self._queue.put(None)
        self.pool.shutdown(wait=False, cancel_futures=True)
