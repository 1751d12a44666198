"""Event plane on the embedded broker with test subscribers: flow, retries, dead letter, filters,
a subscriber that is down for a while, ordered delivery, malformed records, the ingress.

Every test checks that each input event id reaches the result or dead-letter topic.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

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
from shared.eventing.broker_process import KafkaConfig, free_port
from shared.eventing.fanout import SharedReader
from shared.eventing.ingress import IngressServer
from shared.eventing.plane import EventPlane
from shared.eventing.sink import KafkaWriter, TopicTarget
from shared.events import ERROR_EVENT_TYPE, Event, encode_http, new_event

Plane = Callable[[str], EventPlane]
RESULTS = "  filter: {attributes: {type: t.result}}"


def _all_reached(ns: str, results: set[str], dead: set[str]) -> Callable[[dict[str, list[Event]]], bool]:
    def done(seen: dict[str, list[Event]]) -> bool:
        return results <= ids_of(seen[f"{ns}.results"], "requestid") and dead <= ids_of(seen[f"{ns}.dlq"])

    return done


def test_flow_retry_poison_and_non_cloudevent_reply(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    ok = reply_with("t.result")

    def behave(event: Event, attempt: int) -> tuple[int, dict[str, str], bytes]:
        mode = event.data.get("mode")
        if mode == "poison":
            return 400, {"Content-Type": "application/json", "kne-reason": "bad"}, b'{"error": "InvalidInput"}'
        if mode == "flaky" and attempt <= 2:
            return (503 if attempt == 1 else 429), {"Retry-After": "0"}, b"busy"
        if mode == "junk":
            return 200, {"Content-Type": "text/plain"}, b"not a cloudevent"
        return ok(event, attempt)

    sub = Subscriber(behave).start()
    try:
        plane(spec_yaml(ns, [trigger_yaml("fn", '  filter: {attributes: {type: t.request}}', sub.url),
                             trigger_yaml("res", RESULTS, "sink:results")]))  # fmt: skip
        normal = [request("t.request", {"mode": "ok", "i": i}, key=str(i % 4)) for i in range(40)]
        flaky = [request("t.request", {"mode": "flaky"}) for _ in range(3)]
        poison = request("t.request", {"mode": "poison"})
        junk = request("t.request", {"mode": "junk"})
        produce(kafka, f"{ns}.input", [*normal[:20], poison, *flaky, junk, *normal[20:]])
        good = {e.id for e in normal + flaky}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], _all_reached(ns, good, {poison.id, junk.id}))
        assert good <= ids_of(seen[f"{ns}.results"], "requestid")
        dead = {e.id: e for e in seen[f"{ns}.dlq"]}
        assert set(dead) == {poison.id, junk.id}
        p = dead[poison.id].attributes
        assert p["knativeerrordest"] == sub.url and p["knativeerrorcode"] == "400" and p["reason"] == "bad"
        assert base64.b64decode(p["knativeerrordata"]) == b'{"error": "InvalidInput"}'
        assert dead[poison.id].data == {"mode": "poison"}
        j = dead[junk.id].attributes
        assert j["knativeerrorcode"] == "200" and base64.b64decode(j["knativeerrordata"]) == b"not a cloudevent"
        assert all(sub.attempts[e.id] == 3 for e in flaky)
        assert sub.attempts[poison.id] == 1 and sub.attempts[junk.id] == 1  # not retried
    finally:
        sub.stop()


def test_filters_of_each_kind(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    def accept(event: Event, attempt: int) -> tuple[int, dict[str, str], bytes]:
        return 202, {}, b""

    filters = {
        "attrs": "  filter: {attributes: {type: f.a, source: ''}}",
        "exact": "  filters: [{exact: {color: red}}]",
        "prefix": "  filters: [{prefix: {type: f.}}, {prefix: {subject: img-}}]",
        "suffix": "  filters: [{suffix: {source: /edge}}]",
        "all": "  filters: [{all: [{exact: {type: f.b}}, {exact: {color: blue}}]}]",
        "any": "  filters: [{any: [{exact: {color: red}}, {exact: {color: green}}]}]",
        "not": "  filters: [{not: {prefix: {type: f.}}}]",
    }
    subs = {name: Subscriber(accept).start() for name in filters}
    try:
        triggers = [trigger_yaml(name, block, subs[name].url) for name, block in filters.items()]
        triggers.append(trigger_yaml("everything", "  filter: {}", "sink:results"))
        plane(spec_yaml(ns, triggers))
        events = {
            "a-red": Event({"specversion": "1.0", "id": "a-red", "source": "/x/edge", "type": "f.a", "color": "red"}),
            "b-blue": Event(
                {
                    "specversion": "1.0",
                    "id": "b-blue",
                    "source": "/x",
                    "type": "f.b",
                    "color": "blue",
                    "subject": "img-1",
                }
            ),
            "g-green": Event({"specversion": "1.0", "id": "g-green", "source": "/y", "type": "g.c", "color": "green"}),
        }
        produce(kafka, f"{ns}.input", events.values())
        want = set(events)
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], lambda s: want <= ids_of(s[f"{ns}.results"]))
        assert want <= ids_of(seen[f"{ns}.results"])
        expected = {
            "attrs": {"a-red"},
            "exact": {"a-red"},
            "prefix": {"b-blue"},
            "suffix": {"a-red"},
            "all": {"b-blue"},
            "any": {"a-red", "g-green"},
            "not": {"g-green"},
        }
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(set(subs[n].ids()) != ids for n, ids in expected.items()):
            time.sleep(0.05)
        assert {n: set(s.ids()) for n, s in subs.items()} == expected
    finally:
        for sub in subs.values():
            sub.stop()


def test_subscriber_down_for_a_while_gets_its_events(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    delivery = "    retry: 20\n    backoffPolicy: linear\n    backoffDelay: PT0.05S\n    timeout: PT2S"
    plane(spec_yaml(ns, [trigger_yaml("fn", '  filter: {attributes: {type: t.request}}', url, delivery=delivery),
                         trigger_yaml("res", RESULTS, "sink:results")]))  # fmt: skip
    events = [request("t.request", {"i": i}) for i in range(20)]
    produce(kafka, f"{ns}.input", events)
    # Down: the port accepts and hangs up at once, so every attempt fails; once the plane has failed
    # 40 attempts (several retry rounds), the real subscriber comes up on the same port.
    refused = _hang_up_until(port, attempts=40)
    assert refused >= 40
    sub = Subscriber(reply_with("t.result")).start(port)
    try:
        want = {e.id for e in events}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], _all_reached(ns, want, set()))
        assert want <= ids_of(seen[f"{ns}.results"], "requestid")
        assert seen[f"{ns}.dlq"] == []
    finally:
        sub.stop()


def _hang_up_until(port: int, attempts: int, timeout_s: float = 20.0) -> int:
    """Listen on `port`, closing every connection at once, until `attempts` connections came."""
    import socket

    count = 0
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        deadline = time.monotonic() + timeout_s
        while count < attempts and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()
            count += 1
    return count


def test_ordered_trigger_keeps_per_key_order(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    order: dict[str, list[int]] = {}
    lock = threading.Lock()
    ok = reply_with("t.result")

    def behave(event: Event, attempt: int) -> tuple[int, dict[str, str], bytes]:
        if event.data["seq"] % 7 == 3 and attempt == 1:
            return 503, {}, b"retry me"  # a retry must not let later events of the key overtake
        with lock:
            order.setdefault(event.get("partitionkey"), []).append(event.data["seq"])
        return ok(event, attempt)

    sub = Subscriber(behave).start()
    try:
        ordered = "kafka.eventing.knative.dev/delivery.order: ordered"
        plane(spec_yaml(ns, [trigger_yaml("fn", '  filter: {attributes: {type: t.request}}', sub.url, ordered),
                             trigger_yaml("res", RESULTS, "sink:results")], partitions=2))  # fmt: skip
        events = [request("t.request", {"seq": i}, key=f"k{i % 5}") for i in range(100)]
        produce(kafka, f"{ns}.input", events)
        want = {e.id for e in events}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], _all_reached(ns, want, set()))
        assert want <= ids_of(seen[f"{ns}.results"], "requestid")
        for key, seqs in order.items():
            firsts = list(dict.fromkeys(seqs))
            assert firsts == sorted(firsts), key
            assert len(firsts) == 20
    finally:
        sub.stop()


def test_malformed_records_are_dead_lettered_and_the_plane_keeps_running(
    plane: Plane, kafka: KafkaConfig, ns: str
) -> None:
    sub = Subscriber(reply_with("t.result")).start()
    try:
        raw = "  filter: {attributes: {type: dev.knative.kafka.event}}"
        plane(spec_yaml(ns, [trigger_yaml("fn", '  filter: {attributes: {type: t.request}}', sub.url),
                             trigger_yaml("res", RESULTS, "sink:results"),
                             trigger_yaml("raw", raw, "sink:dlq")]))  # fmt: skip
        records = [
            (b"k", b"just bytes", []),
            (None, b'{"v": 1}', [("content-type", b"application/json")]),
            (None, b"x", [("ce_id", b"1"), ("ce_source", b"/s"), ("ce_specversion", b"1.0")]),  # no ce_type
            (None, b"{nope", [("content-type", b"application/cloudevents+json")]),
        ]
        positions = produce_raw(kafka, f"{ns}.input", records)
        # Garbage written straight into the broker topic reaches the dead-letter topic too.
        broker_positions = produce_raw(kafka, f"knative-broker-{ns}-default", [(None, b"garbage", [("ce_id", b"z")])])
        after = request("t.request", {"after": True})
        produce(kafka, f"{ns}.input", [after])
        wrapped = {f"partition:{p}/offset:{o}" for p, o in positions}
        garbage = {f"partition:{p}/offset:{o}" for p, o in broker_positions}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], _all_reached(ns, {after.id}, wrapped | garbage))
        dead = {e.id: e for e in seen[f"{ns}.dlq"]}
        assert wrapped | garbage <= set(dead)
        assert {dead[i].type for i in wrapped} == {"dev.knative.kafka.event"}
        assert dead[f"partition:{positions[0][0]}/offset:{positions[0][1]}"].attributes["key"] == "k"
        # Every trigger that sees the garbage dead-letters it (with the reason); the `raw` trigger also
        # routes its wrapped form to the same topic as an ordinary event, so pick the dead letters.
        letters = [e for e in seen[f"{ns}.dlq"] if e.id in garbage and "knativeerrordata" in e.attributes]
        assert letters
        assert all("invalid CloudEvent" in base64.b64decode(e.attributes["knativeerrordata"]).decode() for e in letters)
        assert after.id in ids_of(seen[f"{ns}.results"], "requestid")
    finally:
        sub.stop()


def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_publish_through_the_broker_ingress(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    sub = Subscriber(reply_with("t.result")).start()
    try:
        p = plane(spec_yaml(ns, [trigger_yaml("fn", '  filter: {attributes: {type: t.request}}', sub.url),
                                 trigger_yaml("res", RESULTS, "sink:results")]))  # fmt: skip
        url = f"{p.ingress_url}/{ns}/default"
        binary, structured = request("t.request", {"m": "b"}, key="x"), request("t.request", {"m": "s"})
        assert _post(url, *encode_http("binary", [binary])) == 202
        assert _post(url, *encode_http("structured", [structured])) == 202
        assert _post(url, {"Content-Type": "application/json"}, b'{"no": "attributes"}') == 400
        assert _post(url, *encode_http("batch", [binary, structured])) == 400
        assert _post(f"{p.ingress_url}/{ns}/nope", *encode_http("binary", [binary])) == 404
        assert _post(url, {"Content-Type": "application/json", "ce-id": "1"}, b"x" * (2 << 20)) == 413
        want = {binary.id, structured.id}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq", f"knative-broker-{ns}-default"],
                       _all_reached(ns, want, set()))  # fmt: skip
        assert want <= ids_of(seen[f"{ns}.results"], "requestid")
        stored = {e.id: e for e in seen[f"knative-broker-{ns}-default"]}
        assert stored[binary.id].get("partitionkey") == "x"
    finally:
        sub.stop()


def test_ingress_answers_503_when_kafka_is_unreachable() -> None:
    writer = KafkaWriter(KafkaConfig(f"127.0.0.1:{free_port()}"), **{"message.timeout.ms": 300})
    server = IngressServer({"/ns/default": TopicTarget(writer, "knative-broker-ns-default")})
    server.start()
    try:
        event = request("t.request", {"x": 1})
        assert _post(f"{server.url}/ns/default", *encode_http("binary", [event])) == 503
    finally:
        server.stop()
        writer.close(timeout_s=1)


def test_structured_dead_letter_body_is_json(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    """The dead-letter KafkaSink is in structured mode: one JSON envelope per record."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    sub = Subscriber(lambda e, a: (400, {}, b"no")).start()
    try:
        plane(spec_yaml(ns, [trigger_yaml("fn", "  filter: {attributes: {type: t.request}}", sub.url)]))
        event = request("t.request", {"x": 1})
        produce(kafka, f"{ns}.input", [event])
        seen = collect(kafka, [f"{ns}.dlq"], lambda s: event.id in ids_of(s[f"{ns}.dlq"]))
        assert event.id in ids_of(seen[f"{ns}.dlq"])
        consumer = Consumer(kafka.consumer("raw-read"))
        consumer.assign([TopicPartition(f"{ns}.dlq", p, OFFSET_BEGINNING) for p in (0, 1)])
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.2)
        consumer.close()
        assert message is not None
        envelope = orjson.loads(message.value())
        assert envelope["id"] == event.id and envelope["knativeerrorcode"] == "400"
    finally:
        sub.stop()


@pytest.mark.fault
def test_a_burst_at_a_cold_subscriber_is_delivered_once(
    plane: Plane, kafka: KafkaConfig, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst larger than a trigger's in-flight window while its subscriber is still starting (a
    function at zero): the trigger is detached onto its own consumer and still sends each event once."""
    monkeypatch.setattr(plane_module, "MAX_PENDING", 20)
    warm = threading.Event()
    ok = reply_with("t.result")

    def cold_then_ok(event: Event, attempt: int) -> tuple[int, dict[str, str], bytes]:
        warm.wait(30)  # every request waits until the "cold start" is over
        return ok(event, attempt)

    sub = Subscriber(cold_then_ok).start()
    try:
        event_plane = plane(spec_yaml(ns, [trigger_yaml("fn", "  filter: {attributes: {type: t.request}}", sub.url),
                                           trigger_yaml("res", RESULTS, "sink:results")]))  # fmt: skip
        events = [request("t.request", {"i": i}, key=str(i % 8)) for i in range(200)]
        produce(kafka, f"{ns}.input", events)
        (reader,) = [c for c in event_plane.dispatchers if isinstance(c, SharedReader)]
        deadline = time.monotonic() + 30
        while not reader.detached and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [m.name for m in reader.detached] == ["trigger-fn"]
        warm.set()
        want = {e.id for e in events}
        seen = collect(kafka, [f"{ns}.results"], lambda s: want <= ids_of(s[f"{ns}.results"], "requestid"))
        answered = [str(e.attributes["requestid"]) for e in seen[f"{ns}.results"]]
        assert set(answered) == want and len(answered) == len(want)  # every result once
        assert sorted(sub.ids()) == sorted(want)  # every event sent once
    finally:
        warm.set()
        sub.stop()


@pytest.mark.fault
def test_batched_delivery_retries_what_failed_retryably_and_dead_letters_the_rest(
    plane: Plane, kafka: KafkaConfig, ns: str
) -> None:
    """A trigger with `onnxfn.dev/delivery.batch`: each event's outcome inside the batched reply
    counts. A 503 for one event is retried (that event alone), a 400 is dead-lettered with its
    reason, a batch answered 503 as a whole is sent again, the rest become results."""
    whole_failed = threading.Event()
    flaky_failed: set[str] = set()  # flaky events answered 503 once, inside a batched reply

    def batch(events: list[Event], _attempts: list[int]) -> tuple[int, dict[str, str], bytes]:
        if not whole_failed.is_set():
            whole_failed.set()
            return 503, {"Retry-After": "0"}, b"starting"
        replies = []
        for event in events:
            mode = event.data.get("mode")
            if mode == "poison" or (mode == "flaky" and event.id not in flaky_failed):
                if mode == "flaky":
                    flaky_failed.add(event.id)
                status = 400 if mode == "poison" else 503
                data = {"status": status, "message": f"{mode} event", "error": "x"}
                replies.append(new_event(ERROR_EVENT_TYPE, "/fn", data, {"requestid": event.id}))
            else:
                replies.append(new_event("t.result", "/fn", {"echo": event.data}, {"requestid": event.id}))
        headers, body = encode_http("batch", replies)
        return 200, headers, body

    sub = Subscriber(reply_with("t.result"), batch_behaviour=batch).start()
    try:
        annotations = "onnxfn.dev/delivery.batch: '8'"
        fn = trigger_yaml("fn", "  filter: {attributes: {type: t.request}}", sub.url, annotations=annotations)
        plane(spec_yaml(ns, [fn, trigger_yaml("res", RESULTS, "sink:results")]))
        normal = [request("t.request", {"mode": "ok", "i": i}) for i in range(20)]
        flaky = [request("t.request", {"mode": "flaky"}) for _ in range(2)]
        poison = request("t.request", {"mode": "poison"})
        produce(kafka, f"{ns}.input", [*normal, *flaky, poison])
        good = {e.id for e in normal + flaky}
        seen = collect(kafka, [f"{ns}.results", f"{ns}.dlq"], _all_reached(ns, good, {poison.id}))
        results = [str(e.attributes["requestid"]) for e in seen[f"{ns}.results"]]
        assert set(results) == good and len(results) == len(good)  # each once
        (dead,) = seen[f"{ns}.dlq"]
        assert dead.id == poison.id and dead.attributes["knativeerrorcode"] == "400"
        assert b"poison event" in base64.b64decode(dead.attributes["knativeerrordata"])
        assert max(sub.batch_sizes) > 1  # delivered in batches
        assert flaky_failed == {e.id for e in flaky}  # each got its own 503, then was retried
        assert sub.attempts[poison.id] <= 2  # the whole-batch 503, then its own 400: not retried after
    finally:
        sub.stop()
