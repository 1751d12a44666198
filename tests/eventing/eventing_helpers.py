"""Test helpers: a configurable CloudEvents subscriber, YAML builders, Kafka produce/collect."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.kafka_binding import from_record, to_record
from shared.events import Event, decode_http, encode_http, new_event

# behaviour(event, attempt) -> (status, headers, body); attempt counts deliveries of that event id.
Behaviour = Callable[[Event, int], tuple[int, dict[str, str], bytes]]


def reply_with(result_type: str) -> Behaviour:
    """Answer 200 with a result event (binary mode) carrying the request id and data."""

    def behave(event: Event, attempt: int) -> tuple[int, dict[str, str], bytes]:
        result = new_event(
            result_type,
            "/test/subscriber",
            {"echo": event.data},
            {"requestid": event.id, "partitionkey": event.get("partitionkey")},
        )
        headers, body = encode_http("binary", [result])
        return 200, headers, body

    return behave


@dataclass
class Subscriber:
    """A tiny threaded HTTP subscriber on 127.0.0.1 that records what it got."""

    behaviour: Behaviour
    received: list[Event] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    port: int = 0
    # For batched delivery: (events, their attempt numbers) -> (status, headers, body).
    batch_behaviour: Callable[[list[Event], list[int]], tuple[int, dict[str, str], bytes]] | None = None
    batch_sizes: list[int] = field(default_factory=list)

    def start(self, port: int = 0) -> Subscriber:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode, events = decode_http({k.lower(): v for k, v in self.headers.items()}, body)
                with outer.lock:
                    outer.received.extend(events)
                    attempts = [outer.attempts.get(e.id, 0) + 1 for e in events]
                    outer.attempts.update({e.id: n for e, n in zip(events, attempts, strict=True)})
                    if mode == "batch":
                        outer.batch_sizes.append(len(events))
                if mode == "batch":
                    assert outer.batch_behaviour is not None, "this subscriber takes one event per request"
                    status, headers, payload = outer.batch_behaviour(events, attempts)
                else:
                    status, headers, payload = outer.behaviour(events[0], attempts[0])
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def ids(self) -> list[str]:
        with self.lock:
            return [e.id for e in self.received]


def spec_yaml(
    ns: str,
    triggers: Iterable[str],
    delivery: str = "retry: 3\n    backoffPolicy: linear\n    backoffDelay: PT0.05S\n    timeout: PT5S",
    partitions: int = 2,
) -> str:
    """A broker in namespace `ns` with a dead-letter sink, a results sink, an input source, and `triggers`."""
    head = f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: kafka-broker-config, namespace: {ns}}}
data: {{default.topic.partitions: "{partitions}"}}
---
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
  namespace: {ns}
  annotations: {{eventing.knative.dev/broker.class: Kafka}}
spec:
  config: {{apiVersion: v1, kind: ConfigMap, name: kafka-broker-config, namespace: {ns}}}
  delivery:
    {delivery}
    deadLetterSink:
      ref: {{apiVersion: eventing.knative.dev/v1alpha1, kind: KafkaSink, name: dlq, namespace: {ns}}}
---
apiVersion: eventing.knative.dev/v1alpha1
kind: KafkaSink
metadata: {{name: dlq, namespace: {ns}}}
spec: {{topic: {ns}.dlq, bootstrapServers: [x:9092], contentMode: structured}}
---
apiVersion: eventing.knative.dev/v1alpha1
kind: KafkaSink
metadata: {{name: results, namespace: {ns}}}
spec: {{topic: {ns}.results, bootstrapServers: [x:9092]}}
---
apiVersion: sources.knative.dev/v1beta1
kind: KafkaSource
metadata: {{name: input, namespace: {ns}}}
spec:
  bootstrapServers: [x:9092]
  topics: [{ns}.input]
  initialOffset: earliest
  ordering: unordered
  sink:
    ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default, namespace: {ns}}}
"""
    return head + "".join("---\n" + t.replace("$NS", ns) for t in triggers)


def trigger_yaml(name: str, filter_block: str, subscriber: str, annotations: str = "", delivery: str = "") -> str:
    """One Trigger (namespace `$NS`); `subscriber` is a uri or `sink:<KafkaSink name>`."""
    if subscriber.startswith("sink:"):
        ref = f"apiVersion: eventing.knative.dev/v1alpha1, kind: KafkaSink, name: {subscriber[5:]}, namespace: $NS"
        sub = "    ref: {" + ref + "}"
    else:
        sub = f"    uri: {subscriber}"
    meta_ann = "\n  annotations: {" + annotations + "}" if annotations else ""
    return (
        f"apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\n"
        f"  namespace: $NS{meta_ann}\nspec:\n  broker: default\n{filter_block}\n  subscriber:\n{sub}\n"
        + (f"  delivery:\n{delivery}\n" if delivery else "")
    )


def write_spec(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eventing.yaml").write_text(text)
    return directory


def request(type_: str, data: Any, key: str | None = None, **extensions: Any) -> Event:
    ext = dict(extensions)
    if key is not None:
        ext["partitionkey"] = key
    return new_event(type_, "/tests/eventing", data, ext)


def produce(kafka: KafkaConfig, topic: str, events: Iterable[Event], mode: str = "binary") -> None:
    from confluent_kafka import Producer

    producer = Producer(kafka.producer())
    for event in events:
        key, value, headers = to_record(event, mode)
        producer.produce(topic, value=value, key=key, headers=headers)
    assert producer.flush(10) == 0


def produce_raw(
    kafka: KafkaConfig, topic: str, records: Iterable[tuple[bytes | None, bytes | None, list[Any]]]
) -> list[tuple[int, int]]:
    """Produce plain records; returns their (partition, offset) in order."""
    from confluent_kafka import Producer

    producer = Producer(kafka.producer())
    records = list(records)
    positions: list[tuple[int, int] | None] = [None] * len(records)
    for index, (key, value, headers) in enumerate(records):

        def report(err: Any, msg: Any, index: int = index) -> None:
            assert err is None, err
            positions[index] = (msg.partition(), msg.offset())

        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
    assert producer.flush(10) == 0
    return [p for p in positions if p is not None]


def collect(
    kafka: KafkaConfig,
    topics: Iterable[str],
    until: Callable[[dict[str, list[Event]]], bool],
    timeout_s: float = 20.0,
) -> dict[str, list[Event]]:
    """Read `topics` from the beginning (no group) until `until(events by topic)` or the deadline."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(kafka.consumer(f"collect-{uuid.uuid4().hex}", **{"enable.partition.eof": False}))
    topics = list(topics)
    meta = consumer.list_topics(timeout=10)
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions])
    seen: dict[str, list[Event]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(seen):
            for message in consumer.consume(500, 0.1):
                if message.error() is None:
                    seen[message.topic()].append(from_record(message.headers(), message.value()))
    finally:
        consumer.close()
    return seen


def ids_of(events: Iterable[Event], attribute: str = "id") -> set[str]:
    return {str(e.attributes.get(attribute)) for e in events}
