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
from collections.abc import Mapping
from dataclasses import dataclass

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

log = logging.getLogger(__name__)
# Records a dispatcher buffers before it pauses its partitions; HTTP concurrency is the sender's pool.
MAX_PENDING = 2000


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
        self.dispatchers: list[Dispatcher | SharedReader] = []
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
        brokers = {
            broker.path: TopicTarget(self.writer, broker.topic, "binary", f"Broker/{broker.name}")
            for broker in self.spec.brokers.values()
        }
        groups: list[Consumption] = []
        for trigger in self.spec.triggers:
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
        self.dispatchers.extend(self._consumers(groups))
        for dispatcher in self.dispatchers:
            dispatcher.start()
        self.ingress = IngressServer(brokers, self.options.ingress_host, self.options.ingress_port)
        self.ingress.start()
        deadline = time.monotonic() + ready_timeout_s
        for dispatcher in self.dispatchers:
            if not dispatcher.assigned.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"{dispatcher.name}: no partitions assigned within {ready_timeout_s:.0f} s")

    def _consumers(self, groups: list[Consumption]) -> list[Dispatcher | SharedReader]:
        """A shared reader per topic that several single-topic groups read (with `shared_fetch`), a
        dispatcher for every other group."""
        by_topic: dict[str, list[Consumption]] = {}
        if self.options.shared_fetch:
            for group in groups:
                if len(group.topics) == 1:
                    by_topic.setdefault(group.topics[0], []).append(group)
        shared = {topic: members for topic, members in by_topic.items() if len(members) > 1}
        out: list[Dispatcher | SharedReader] = []
        for topic, members in shared.items():
            out.append(
                SharedReader(
                    f"fanout-{topic}",
                    self.kafka,
                    topic,
                    [Member(g.name, g.group_id, g.handle, g.ordered, MAX_PENDING, g.offset_reset) for g in members],
                )
            )
        for group in groups:
            if len(group.topics) == 1 and group.topics[0] in shared:
                continue
            dispatcher = Dispatcher(
                group.name,
                self.kafka,
                group.group_id,
                list(group.topics),
                group.handle,
                ordered=group.ordered,
                max_pending=MAX_PENDING,
                offset_reset=group.offset_reset,
            )
            out.append(dispatcher)
        return out

    def problems(self) -> list[str]:
        """Components that stopped while the plane runs (a consumer thread that died, the ingress)."""
        if self.stopping.is_set():
            return []
        found = []
        for dispatcher in self.dispatchers:
            failed = getattr(dispatcher, "failed", None)
            if failed is not None or not dispatcher._thread.is_alive():
                found.append(f"{dispatcher.name} stopped ({failed!r})" if failed else f"{dispatcher.name} stopped")
        if self.ingress is not None and not self.ingress.alive:
            found.append("the broker ingress stopped")
        return found

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
