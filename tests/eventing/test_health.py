"""A consumer thread of the plane that raises is seen (plane health, the ingress's /health), replaced
from its committed offsets so its events still arrive, and reported once it fails past its restarts."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from eventing_helpers import (
    Subscriber,
    collect,
    ids_of,
    produce,
    produce_raw,
    reply_with,
    request,
    spec_yaml,
    trigger_yaml,
)

from shared.eventing import plane as plane_module
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.plane import EventPlane
from shared.eventing.trigger import TriggerHandler
from shared.health import Health

Plane = Callable[[str], EventPlane]
pytestmark = pytest.mark.fault


RESULTS = "  filter: {attributes: {type: t.result}}"


def _break_trigger(monkeypatch: pytest.MonkeyPatch, name: str, times: int) -> list[int]:
    """Trigger `name`'s handler raises on its first `times` records (on the consumer thread)."""
    raised: list[int] = []
    original = TriggerHandler.__call__

    def handle(self: TriggerHandler, message: Any, finish: Callable[[], None]) -> None:
        if self.trigger.name == name and len(raised) < times:
            raised.append(message.offset())
            raise RuntimeError("the consumer thread broke")
        original(self, message, finish)

    monkeypatch.setattr(TriggerHandler, "__call__", handle)
    return raised


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _ingress_health(event_plane: EventPlane) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(event_plane.ingress_url + "/health", timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _spec(ns: str, subscriber: str) -> str:
    """Trigger `fn` to the subscriber and `res` to the results sink: two groups on one shared reader."""
    fn = trigger_yaml("fn", "  filter: {attributes: {type: t.request}}", subscriber)
    return spec_yaml(ns, [fn, trigger_yaml("res", RESULTS, "sink:results")])


def _failed(event_plane: EventPlane) -> list[Health]:
    return [h for h in event_plane.health() if h.failed]


def test_a_consumer_that_raises_is_reported_and_replaced_and_its_event_arrives(
    plane: Plane, kafka: KafkaConfig, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised = _break_trigger(monkeypatch, "fn", times=1)
    sub = Subscriber(reply_with("t.result")).start()
    try:
        event_plane = plane(_spec(ns, sub.url))
        status, body = _ingress_health(event_plane)
        assert status == 200 and {c["state"] for c in body["components"]} == {"ready"}
        events = [request("t.request", {"i": i}) for i in range(5)]
        produce(kafka, f"{ns}.input", events)

        _wait_for(lambda: bool(_failed(event_plane)))
        (dead,) = _failed(event_plane)
        assert dead.component.startswith("fanout-") and "the consumer thread broke" in dead.detail
        status, body = _ingress_health(event_plane)
        assert status == 503
        assert any(c["state"] == "failed" and "broke" in c["detail"] for c in body["components"])

        assert event_plane.recover() == []  # replaced, nothing left to report
        want = {e.id for e in events}
        seen = collect(kafka, [f"{ns}.results"], lambda s: want <= ids_of(s[f"{ns}.results"], "requestid"))
        assert want <= ids_of(seen[f"{ns}.results"], "requestid")
        assert len(raised) == 1
        health = {h.component: h for h in event_plane.health()}
        assert health[dead.component].state == "ready" and health[dead.component].restarts == 1
        assert _ingress_health(event_plane)[0] == 200
    finally:
        sub.stop()


def test_a_consumer_that_keeps_failing_is_reported_after_its_restarts(
    plane: Plane, kafka: KafkaConfig, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plane_module, "MAX_RESTARTS", 2)
    _break_trigger(monkeypatch, "fn", times=1000)
    sub = Subscriber(reply_with("t.result")).start()
    try:
        event_plane = plane(_spec(ns, sub.url))
        produce(kafka, f"{ns}.input", [request("t.request", {"i": 0})])
        problems: list[str] = []
        for _ in range(3):
            _wait_for(lambda: bool(_failed(event_plane)))
            problems = event_plane.recover()
        assert len(problems) == 1 and "failed again after 2 restarts" in problems[0] and "broke" in problems[0]
        assert sub.ids() == []  # nothing was delivered past the broken handler, and nothing committed past it
    finally:
        sub.stop()


def test_a_fatal_producer_error_fails_the_writer_and_is_reported(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    """librdkafka reports a fatal error (as after UNKNOWN_PRODUCER_ID when the broker restarted):
    the writer fails, refuses records instead of queueing them forever, and the plane reports it."""
    from confluent_kafka import KafkaError

    from shared.eventing.sink import ProduceError

    event_plane = plane(_spec(ns, "http://127.0.0.1:9/"))
    assert event_plane.recover() == [] and event_plane.writer is not None
    event_plane.writer._on_error(KafkaError(KafkaError._FATAL, "injected: unknown producer id", fatal=True))
    (problem,) = event_plane.recover()
    assert problem.startswith("kafka-writer failed") and "unknown producer id" in problem
    with pytest.raises(ProduceError, match="fatal producer error"):
        event_plane.writer.produce(f"{ns}.results", None, b"x", [], lambda error: None)
    status, body = _ingress_health(event_plane)
    assert status == 503 and any(
        c["component"] == "kafka-writer" and c["state"] == "failed" for c in body["components"]
    )


def test_a_consumer_that_stops_fetching_while_its_topic_grows_is_reported_stalled(
    kafka: KafkaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lag that does not move: records behind the consumer, nothing fetched, not paused -> failed
    with the figures (and so replaced by the plane's check)."""
    import uuid

    from shared.eventing import dispatcher as dispatcher_module
    from shared.eventing.broker_process import ensure_topics
    from shared.eventing.dispatcher import Dispatcher

    topic = f"stall-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, {topic: (1, 1)})
    stuck = False
    real_take = dispatcher_module.take

    def take(consumer: Any, timeout_s: float, batch: int = 500) -> list[Any]:
        return [] if stuck else real_take(consumer, timeout_s, batch)

    monkeypatch.setattr(dispatcher_module, "take", take)
    seen: list[int] = []

    def handle(message: Any, finish: Callable[[], None]) -> None:
        seen.append(message.offset())
        finish()

    consumer = Dispatcher("stuck", kafka, f"g-{topic}", [topic], handle)
    consumer.stall.stall_s = 0.5
    consumer.start()
    try:
        produce_raw(kafka, topic, [(None, b"a", [])])
        _wait_for(lambda: seen == [0])
        _wait_for(lambda: consumer.health()[0].state == "ready")
        stuck = True  # the fetch stops; the topic grows
        produce_raw(kafka, topic, [(None, b"b", []), (None, b"c", [])])
        _wait_for(lambda: consumer.health()[0].failed, timeout_s=15)
        detail = consumer.health()[0].detail
        assert re.fullmatch(r"stalled: [12] record\(s\) behind the topic, nothing fetched for \d+ s", detail), detail
    finally:
        consumer.stop(drain_s=0)
