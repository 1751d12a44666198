"""The embedded event plane: the eventing YAML carried out against one Kafka cluster.

It creates the topics the YAML implies (broker topics with the ConfigMap's partition count, the
sources' input topics, the KafkaSinks' topics), then runs one consumer group per KafkaSource and per
Trigger, and the broker ingress. Functions (Service subscribers) are reached at the URLs given.

With `PlaneOptions.shared_fetch` (the default), the consumer groups that read the same single topic
(the triggers of a broker) share one `fanout.SharedReader`, which fetches the topic once and keeps
per-group offsets, windows and ordering; a group alone on its topics gets its own `Dispatcher`.
Without it, every group is a `Dispatcher` of its own (each record fetched once per trigger).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from shared.eventing.broker_process import KafkaConfig, ensure_topics
from shared.eventing.delivery import HttpSubscriber
from shared.eventing.dispatcher import Dispatcher, Handler
from shared.eventing.fanout import Member, SharedReader
from shared.eventing.ingress import IngressServer
from shared.eventing.sender import Sender, Target
from shared.eventing.sink import KafkaWriter, TopicTarget
from shared.eventing.source import SourceHandler
from shared.eventing.spec import Delivery, Destination, EventingSpec
from shared.eventing.trigger import TriggerHandler
from shared.health import Health

log = logging.getLogger(__name__)
# Records a dispatcher buffers before it pauses its partitions; HTTP concurrency is the sender's pool.
MAX_PENDING = 2000
MAX_RESTARTS = 3  # replacements of one failed consumer group before `up` gives up and exits 1
Consumer = Dispatcher | SharedReader


@dataclass(frozen=True)
class PlaneOptions:
    ingress_host: str = "127.0.0.1"
    ingress_port: int = 0
    concurrency: int = 50  # unordered HTTP deliveries in flight per trigger (the Kafka broker's 50)
    input_partitions: int | None = None  # partitions of source topics it creates (default: the broker's)
    shared_fetch: bool = True  # one shared reader per topic read by several groups (see fanout)


@dataclass(frozen=True)
class Consumption:
    """One consumer group the plane runs: a trigger or a KafkaSource."""

    name: str
    group_id: str
    topics: tuple[str, ...]
    handle: Handler
    ordered: bool
    offset_reset: str = "earliest"


class EventPlane:
    """Start with `start()`, stop with `stop()`; `ingress_url` and `topics()` describe it."""

    def __init__(
        self,
        spec: EventingSpec,
        kafka: KafkaConfig,
        function_urls: Mapping[str, str],
        options: PlaneOptions | None = None,
    ):
        self.spec = spec
        self.kafka = kafka
        self.function_urls = dict(function_urls)
        self.options = options or PlaneOptions()
        self.stopping = threading.Event()
        self.writer: KafkaWriter | None = None
        self.ingress: IngressServer | None = None
        self.dispatchers: list[Consumer] = []
        self._factories: dict[str, Callable[[], Consumer]] = {}
        self.restarts: dict[str, int] = {}
        self.last_failure: dict[str, str] = {}  # consumer name -> why it was last replaced
        # Components outside the plane that `health()` reports too (`up`: the broker, the platform).
        self.health_sources: list[Callable[[], list[Health]]] = []
        self.senders: dict[str, Sender] = {}
        missing = [name for name in spec.functions() if name not in self.function_urls]
        if missing:
            raise ValueError(f"no URL for function(s) {', '.join(missing)}")

    def topics(self) -> dict[str, tuple[int, int]]:
        """Every topic the plane uses: name -> (partitions, replication factor)."""
        out: dict[str, tuple[int, int]] = {}
        default = next(iter(self.spec.brokers.values()), None)
        base = (default.partitions, default.replication_factor) if default else (1, 1)
        for broker in self.spec.brokers.values():
            out[broker.topic] = (broker.partitions, broker.replication_factor)
        for source in self.spec.sources:
            for topic in source.topics:
                out.setdefault(topic, (self.options.input_partitions or base[0], base[1]))
        for sink in self.spec.sinks.values():
            out.setdefault(sink.topic, (sink.num_partitions or base[0], sink.replication_factor or base[1]))
        return out

    @property
    def ingress_url(self) -> str:
        return self.ingress.url if self.ingress else ""

    def _target(self, dest: Destination, delivery: Delivery, namespace: str) -> Target:
        assert self.writer is not None
        if dest.uri:
            return HttpSubscriber(dest.uri, delivery, namespace, self.stopping)
        assert dest.ref is not None
        key = f"{dest.ref.namespace}/{dest.ref.name}"
        if dest.ref.kind == "KafkaSink":
            sink = self.spec.sinks[key]
            return TopicTarget(self.writer, sink.topic, sink.content_mode, f"KafkaSink/{sink.name}")
        if dest.ref.kind == "Broker":
            return TopicTarget(self.writer, self.spec.brokers[key].topic, "binary", f"Broker/{dest.ref.name}")
        return HttpSubscriber(self.function_urls[dest.ref.name], delivery, namespace, self.stopping)

    def _dead_letter(self, delivery: Delivery, namespace: str) -> Target | None:
        if delivery.dead_letter is None:
            return None
        return self._target(delivery.dead_letter, Delivery(timeout_s=delivery.timeout_s), namespace)

    def start(self, ready_timeout_s: float = 30.0) -> None:
        """Create topics, start dispatchers and ingress; return once every group has its partitions."""
        ensure_topics(self.kafka, self.topics())
        self.writer = KafkaWriter(self.kafka)
        self.writer.watch(sorted(self.topics()))
        brokers = {
            broker.path: TopicTarget(self.writer, broker.topic, "binary", f"Broker/{broker.name}")
            for broker in self.spec.brokers.values()
        }
        groups: list[Consumption] = []
        for trigger in self.spec.triggers:
            if trigger.worker:  # consumed by `onnxfn worker` (see worker_scaler), not delivered over HTTP
                continue
            target = self._target(trigger.subscriber, trigger.delivery, trigger.namespace)
            http = isinstance(target, HttpSubscriber)
            sender = Sender(
                f"Trigger/{trigger.name}",
                target,
                brokers[f"/{trigger.namespace}/{trigger.broker}"],
                self._dead_letter(trigger.delivery, trigger.namespace),
                concurrency=self.options.concurrency,
                batch=trigger.batch,
            )
            self.senders[f"Trigger/{trigger.name}"] = sender
            broker = self.spec.brokers[f"{trigger.namespace}/{trigger.broker}"]
            # A Kafka topic keeps per-partition order by itself (idempotent producer), so only HTTP
            # subscribers need one-in-flight-per-partition.
            groups.append(
                Consumption(
                    f"trigger-{trigger.name}",
                    trigger.group_id,
                    (broker.topic,),
                    TriggerHandler(trigger, sender),
                    trigger.ordered and http,
                )
            )
        for source in self.spec.sources:
            target = self._target(source.sink, source.delivery, source.namespace)
            http = isinstance(target, HttpSubscriber)
            sender = Sender(
                f"KafkaSource/{source.name}",
                target,
                None,
                self._dead_letter(source.delivery, source.namespace),
                concurrency=self.options.concurrency,
            )
            self.senders[f"KafkaSource/{source.name}"] = sender
            groups.append(
                Consumption(
                    f"source-{source.name}",
                    source.consumer_group,
                    tuple(source.topics),
                    SourceHandler(source, sender),
                    source.ordered and http,
                    source.initial_offset,
                )
            )
        self._factories = self._consumers(groups)
        self.dispatchers.extend(make() for make in self._factories.values())
        for dispatcher in self.dispatchers:
            dispatcher.start()
        self.ingress = IngressServer(brokers, self.options.ingress_host, self.options.ingress_port, health=self.health)
        self.ingress.start()
        deadline = time.monotonic() + ready_timeout_s
        for dispatcher in self.dispatchers:
            if not dispatcher.assigned.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"{dispatcher.name}: no partitions assigned within {ready_timeout_s:.0f} s")

    def _consumers(self, groups: list[Consumption]) -> dict[str, Callable[[], Consumer]]:
        """Name -> how to make it: a shared reader per topic that several single-topic groups read
        (with `shared_fetch`), a dispatcher for every other group. `recover` makes one again."""
        by_topic: dict[str, list[Consumption]] = {}
        if self.options.shared_fetch:
            for group in groups:
                if len(group.topics) == 1:
                    by_topic.setdefault(group.topics[0], []).append(group)
        shared = {topic: members for topic, members in by_topic.items() if len(members) > 1}
        out: dict[str, Callable[[], Consumer]] = {}

        def reader(topic: str, members: list[Consumption]) -> Callable[[], Consumer]:
            return lambda: SharedReader(
                f"fanout-{topic}",
                self.kafka,
                topic,
                [Member(g.name, g.group_id, g.handle, g.ordered, MAX_PENDING, g.offset_reset) for g in members],
            )

        def dispatcher(group: Consumption) -> Callable[[], Consumer]:
            return lambda: Dispatcher(
                group.name,
                self.kafka,
                group.group_id,
                list(group.topics),
                group.handle,
                ordered=group.ordered,
                max_pending=MAX_PENDING,
                offset_reset=group.offset_reset,
            )

        for topic, members in shared.items():
            out[f"fanout-{topic}"] = reader(topic, members)
        for group in groups:
            if not (len(group.topics) == 1 and group.topics[0] in shared):
                out[group.name] = dispatcher(group)
        return out

    def health(self) -> list[Health]:
        """Every long-lived component: the consumer groups (with their restarts), the writer, the ingress."""
        found = [
            replace(h, restarts=self.restarts.get(h.component, 0), detail=h.detail or self._replaced_after(h.component))
            for consumer in self.dispatchers
            for h in consumer.health()
        ]
        found += [sender.health() for sender in self.senders.values()]
        if self.writer is not None:
            found.append(self.writer.health())
        if self.ingress is not None:
            found.append(self.ingress.own_health())
        for source in self.health_sources:
            found += source()
        return found

    def _replaced_after(self, name: str) -> str:
        """Why the consumer `name` was last replaced ('' if it never was)."""
        reason = self.last_failure.get(name)
        return f"replaced after: {reason}" if reason else ""

    def recover(self) -> list[str]:
        """Replace each consumer group that failed (from its committed offsets, so what it had in
        flight is delivered again), at most MAX_RESTARTS times each; returns what could not be
        recovered (a group over its restarts, the writer, the ingress)."""
        if self.stopping.is_set():
            return []
        problems = []
        for index, consumer in enumerate(self.dispatchers):
            failed = [h for h in consumer.health() if h.failed]
            if not failed:
                continue
            reason = "; ".join(f"{h.component}: {h.detail}" for h in failed)
            done = self.restarts.get(consumer.name, 0)
            if done >= MAX_RESTARTS:
                problems.append(f"{consumer.name} failed again after {done} restarts ({reason})")
                continue
            log.error("%s failed (%s): restarting it from its committed offsets", consumer.name, reason)
            consumer.stop(drain_s=0.0)
            replacement = self._factories[consumer.name]()
            replacement.start()
            self.dispatchers[index] = replacement
            self.restarts[consumer.name] = done + 1
            self.last_failure[consumer.name] = reason
        others = [sender.health() for sender in self.senders.values()]
        others += [self.writer.health()] if self.writer is not None else []
        others += [self.ingress.own_health()] if self.ingress is not None else []
        others += [h for source in self.health_sources for h in source()]
        return problems + [f"{h.component} failed ({h.detail})" for h in others if h.failed]

    def stop(self) -> None:
        """Stop consuming, let in-flight deliveries settle briefly, commit, flush, close."""
        self.stopping.set()
        if self.ingress is not None:
            self.ingress.stop()
            self.ingress = None
        for dispatcher in self.dispatchers:
            dispatcher._stop.set()
        for dispatcher in self.dispatchers:
            dispatcher.stop(drain_s=2.0)
        for sender in self.senders.values():
            sender.close()
        if self.writer is not None:
            self.writer.close()
        self.dispatchers.clear()
