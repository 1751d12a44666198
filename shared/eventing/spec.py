"""Load `eventing/*.yaml` (and the Service names in `knative/`) into the plane's resolved objects.

Kinds: ConfigMap (broker config), Broker (class Kafka), KafkaSource, Trigger, KafkaSink. Each
document is first validated against its kind's schema (`schema.py`: unknown fields, types, enums,
durations), then one resolve step follows references and merges delivery specs. Loading rejects,
with the file, the resource and a path in the message: a Trigger whose broker or subscriber does not
exist, a dead-letter sink that does not exist, and a loop (a function whose result types a chain of
triggers routes back into itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared import service_files
from shared.eventing import schema
from shared.eventing.filters import MATCH_ALL, Filter, FilterError, compile_trigger_filter
from shared.eventing.schema import parse_duration
from shared.service_files import SERVICE_API, SpecError

__all__ = ["EventingSpec", "SpecError", "check_loops", "load", "parse_duration"]

ORDER_ANNOTATION = "kafka.eventing.knative.dev/delivery.order"
# Ours, ignored by Knative: deliver up to N events in one batched-CloudEvents request (the subscriber
# must accept `application/cloudevents-batch+json`, as every onnxfn function does).
BATCH_ANNOTATION = "onnxfn.dev/delivery.batch"
# Ours: `worker` runs the subscriber as `onnxfn worker NAME` (Kafka consume-infer-produce, no HTTP
# hop; a Deployment scaled on lag by KEDA on a cluster, started on lag by `onnxfn up`); `http` (the
# default) is Knative's one-request-per-event delivery.
DELIVERY_ANNOTATION = "onnxfn.dev/delivery"
DELIVERY_MODES = ("http", "worker")
CLASS_ANNOTATION = "eventing.knative.dev/broker.class"
DEFAULT_BACKOFF_DELAY_S = 1.0  # Kafka data plane default when `retry` is set without a delay
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Ref:
    api_version: str
    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class Destination:
    """A `ref` (Service, KafkaSink, Broker) and/or a `uri`."""

    ref: Ref | None = None
    uri: str | None = None


@dataclass(frozen=True)
class Delivery:
    """A delivery spec; None fields are unset (so that a Trigger's spec overrides its Broker's)."""

    retry: int | None = None
    backoff_policy: str | None = None
    backoff_delay_s: float | None = None
    timeout_s: float | None = None
    dead_letter: Destination | None = None

    def merged_over(self, base: Delivery | None) -> Delivery:
        """This (a Trigger's) spec field by field over `base` (its Broker's): a field the Trigger
        sets wins, zero included (`retry: 0` means no retry, not the Broker's)."""
        if base is None:
            return self

        def pick(own: Any, inherited: Any) -> Any:
            return own if own is not None else inherited

        return Delivery(
            retry=pick(self.retry, base.retry),
            backoff_policy=pick(self.backoff_policy, base.backoff_policy),
            backoff_delay_s=pick(self.backoff_delay_s, base.backoff_delay_s),
            timeout_s=pick(self.timeout_s, base.timeout_s),
            dead_letter=pick(self.dead_letter, base.dead_letter),
        )

    def delay_s(self, retry_number: int) -> float:
        """Backoff before retry `retry_number` (1-based): delay*n linear, delay*2^n exponential."""
        delay = self.backoff_delay_s if self.backoff_delay_s is not None else DEFAULT_BACKOFF_DELAY_S
        if self.backoff_policy == "linear":
            return delay * retry_number
        return delay * round(2.0**retry_number)


@dataclass(frozen=True)
class BrokerSpec:
    name: str
    namespace: str
    partitions: int
    replication_factor: int
    delivery: Delivery | None
    bootstrap_servers: str = ""  # the ConfigMap's `bootstrap.servers` (what a cluster's clients use)

    @property
    def topic(self) -> str:
        return f"knative-broker-{self.namespace}-{self.name}"

    @property
    def path(self) -> str:
        return f"/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class KafkaSinkSpec:
    name: str
    namespace: str
    topic: str
    content_mode: str
    num_partitions: int | None
    replication_factor: int | None


@dataclass(frozen=True)
class TriggerSpec:
    name: str
    namespace: str
    broker: str
    filter: Filter
    subscriber: Destination
    delivery: Delivery
    ordered: bool
    batch: int = 1
    worker: bool = False  # `onnxfn.dev/delivery: worker`

    @property
    def group_id(self) -> str:
        return f"knative-trigger-{self.namespace}-{self.name}"


@dataclass(frozen=True)
class KafkaSourceSpec:
    name: str
    namespace: str
    topics: tuple[str, ...]
    consumer_group: str
    initial_offset: str
    ordered: bool
    sink: Destination
    delivery: Delivery
    extensions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EventingSpec:
    brokers: dict[str, BrokerSpec]
    sinks: dict[str, KafkaSinkSpec]
    sources: list[KafkaSourceSpec]
    triggers: list[TriggerSpec]
    services: frozenset[str]

    def functions(self) -> list[str]:
        """Functions (Services) that some trigger or source delivers to, in a stable order."""
        names = {
            d.ref.name
            for d in [t.subscriber for t in self.triggers] + [s.sink for s in self.sources]
            if d.ref is not None and d.ref.kind == "Service"
        }
        return sorted(names)


class _Doc:
    """One validated YAML document, for error messages with file, kind/name and field path."""

    def __init__(self, path: Path, raw: dict[str, Any], resource: schema.Resource):
        self.path = path
        self.resource = resource
        self.name = resource.metadata.name
        self.namespace = resource.metadata.namespace
        self.annotations = resource.metadata.annotations
        self.label = f"{path.name}: {raw.get('kind')}/{self.name}"

    def error(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.label}: {where}: {message}")


def _read_docs(directory: Path) -> list[_Doc]:
    """Every document of every YAML file in `directory`, validated against its kind's schema."""
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        raise SpecError(f"{directory}: no YAML files")
    docs = []
    for path in files:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise SpecError(f"{path.name}: not valid YAML: {exc}") from None
        for raw in loaded:
            if raw is None:
                continue
            if not isinstance(raw, dict) or "kind" not in raw:
                raise SpecError(f"{path.name}: every document must be an object with a kind")
            name = (raw.get("metadata") or {}).get("name", "?") if isinstance(raw.get("metadata"), dict) else "?"
            label = f"{path.name}: {raw['kind']}/{name}"
            if raw["kind"] not in schema.KINDS:
                kinds = ", ".join(schema.KINDS)
                raise SpecError(f"{label}: kind: unsupported kind {raw['kind']!r} ({kinds})")
            try:
                resource = schema.parse(raw)
            except schema.SchemaError as exc:
                raise SpecError(f"{label}: {exc}") from None
            docs.append(_Doc(path, raw, resource))
    return docs


def _destination(node: schema.Destination, namespace: str) -> Destination:
    ref = node.ref
    if ref is None:
        return Destination(None, node.uri)
    return Destination(Ref(ref.apiVersion, ref.kind, ref.name, ref.namespace or namespace), None)


def _delivery(d: _Doc, node: schema.DeliverySpec | None, where: str) -> Delivery | None:
    if node is None:
        return None

    def seconds(value: str | None, field_name: str) -> float | None:
        return None if value is None else parse_duration(value, f"{d.label}: {where}.{field_name}")

    return Delivery(
        retry=node.retry,
        backoff_policy=node.backoffPolicy,
        backoff_delay_s=seconds(node.backoffDelay, "backoffDelay"),
        timeout_s=seconds(node.timeout, "timeout"),
        dead_letter=_destination(node.deadLetterSink, d.namespace) if node.deadLetterSink is not None else None,
    )


def _batch(d: _Doc, ordered: bool) -> int:
    where = f"metadata.annotations.{BATCH_ANNOTATION}"
    value = d.annotations.get(BATCH_ANNOTATION)
    if value is None:
        return 1
    try:
        batch = int(value)
    except ValueError:
        raise d.error(where, f"{value!r}: expected a whole number of events") from None
    if not 1 <= batch <= 1000:
        raise d.error(where, f"{batch}: expected 1 to 1000 events")
    if ordered and batch > 1:
        raise d.error(where, "batched delivery needs an unordered trigger")
    return batch


def _worker(d: _Doc, subscriber: Destination) -> bool:
    where = f"metadata.annotations.{DELIVERY_ANNOTATION}"
    value = d.annotations.get(DELIVERY_ANNOTATION) or "http"
    if value not in DELIVERY_MODES:
        raise d.error(where, f"{value!r}: expected one of {', '.join(DELIVERY_MODES)}")
    if value == "worker" and (subscriber.ref is None or subscriber.ref.kind != "Service"):
        raise d.error(where, "a worker runs a function: the subscriber must be a Service ref")
    return value == "worker"


def _trigger_ordered(d: _Doc) -> bool:
    value = d.annotations.get(ORDER_ANNOTATION) or "unordered"
    if value not in ("ordered", "unordered"):
        raise d.error(f"metadata.annotations.{ORDER_ANNOTATION}", f"{value!r}: expected ordered or unordered")
    return value == "ordered"


def _int_text(d: _Doc, data: Mapping[str, Any], key: str, default: int) -> int:
    raw = data.get(key)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise d.error(f"data.{key}", f"{raw!r} is not an integer") from None


def service_names(knative_dir: Path | None) -> frozenset[str]:
    """Knative Service names committed in `knative/`; the function folders when it has none."""
    names = service_files.service_names(knative_dir) if knative_dir is not None else frozenset()
    if names:
        return names
    from shared.contract import function_names

    return frozenset(function_names())


class _Resolver:
    """The references between validated documents: ConfigMaps, Brokers, sinks and Services."""

    def __init__(self, docs: list[_Doc], services: frozenset[str]) -> None:
        self.docs = docs
        self.services = services
        self.config_maps = {
            (d.namespace, d.name): d.resource.data for d in docs if isinstance(d.resource, schema.ConfigMap)
        }
        self.brokers: dict[str, BrokerSpec] = {}
        self.sinks: dict[str, KafkaSinkSpec] = {}

    def broker(self, d: _Doc, resource: schema.Broker) -> None:
        broker_class = d.annotations.get(CLASS_ANNOTATION)
        if broker_class not in ("Kafka", "KafkaNamespaced"):
            raise d.error(f"metadata.annotations.{CLASS_ANNOTATION}", f"{broker_class!r}: expected Kafka")
        data: Mapping[str, str] = {}
        config = resource.spec.config
        if config is not None:
            if config.kind != "ConfigMap":
                raise d.error("spec.config.kind", "must be ConfigMap")
            key = (config.namespace or d.namespace, config.name)
            if key not in self.config_maps:
                raise d.error("spec.config", f"ConfigMap {key[0]}/{key[1]} is not defined")
            data = self.config_maps[key]
        self.brokers[f"{d.namespace}/{d.name}"] = BrokerSpec(
            d.name,
            d.namespace,
            _int_text(d, data, "default.topic.partitions", 10),
            _int_text(d, data, "default.topic.replication.factor", 1),
            _delivery(d, resource.spec.delivery, "spec.delivery"),
            str(data.get("bootstrap.servers", "")),
        )

    def sink(self, d: _Doc, resource: schema.KafkaSink) -> None:
        spec = resource.spec
        self.sinks[f"{d.namespace}/{d.name}"] = KafkaSinkSpec(
            d.name, d.namespace, spec.topic, spec.contentMode, spec.numPartitions, spec.replicationFactor
        )

    def check_destination(self, d: _Doc, dest: Destination, where: str) -> None:
        if dest.ref is None:
            return
        key = f"{dest.ref.namespace}/{dest.ref.name}"
        kind = dest.ref.kind
        if kind == "Service":
            if dest.ref.api_version not in ("", SERVICE_API):
                raise d.error(where, f"Service apiVersion must be {SERVICE_API}")
            if dest.ref.name not in self.services:
                known = ", ".join(sorted(self.services)) or "none"
                raise d.error(where, f"subscriber Service {dest.ref.name!r} does not exist (known: {known})")
        elif kind == "KafkaSink":
            if key not in self.sinks:
                raise d.error(where, f"KafkaSink {key} is not defined")
        elif kind == "Broker":
            if key not in self.brokers:
                raise d.error(where, f"Broker {key} is not defined")
        else:
            raise d.error(where, f"unsupported destination kind {kind!r} (Service, KafkaSink, Broker)")

    def trigger(self, d: _Doc, resource: schema.Trigger) -> TriggerSpec:
        spec = resource.spec
        if spec.brokerRef is not None:
            broker_key = f"{spec.brokerRef.namespace or d.namespace}/{spec.brokerRef.name}"
        else:
            broker_key = f"{d.namespace}/{spec.broker or 'default'}"
        if broker_key not in self.brokers:
            raise d.error("spec.broker", f"Broker {broker_key} is not defined")
        try:
            flt = compile_trigger_filter(spec.filter, spec.filters, "spec")
        except FilterError as exc:
            raise d.error("filter", str(exc)) from None
        subscriber = _destination(spec.subscriber, d.namespace)
        self.check_destination(d, subscriber, "spec.subscriber")
        own = _delivery(d, spec.delivery, "spec.delivery")
        base = self.brokers[broker_key].delivery
        delivery = own.merged_over(base) if own else (base or Delivery())
        if delivery.dead_letter:
            self.check_destination(d, delivery.dead_letter, "spec.delivery.deadLetterSink")
        ordered = _trigger_ordered(d)
        broker = self.brokers[broker_key].name
        return TriggerSpec(
            d.name, d.namespace, broker, flt, subscriber, delivery, ordered, _batch(d, ordered), _worker(d, subscriber)
        )

    def source(self, d: _Doc, resource: schema.KafkaSource) -> KafkaSourceSpec:
        spec = resource.spec
        sink = _destination(spec.sink, d.namespace)
        self.check_destination(d, sink, "spec.sink")
        default_delivery = Delivery(retry=10, backoff_policy="exponential", backoff_delay_s=0.3, timeout_s=600.0)
        return KafkaSourceSpec(
            d.name,
            d.namespace,
            tuple(spec.topics),
            spec.consumerGroup or f"knative-kafka-source-{d.namespace}-{d.name}",
            spec.initialOffset,
            spec.ordering == "ordered",
            sink,
            _delivery(d, spec.delivery, "spec.delivery") or default_delivery,
            dict(spec.ceOverrides.extensions) if spec.ceOverrides is not None else {},
        )


def load(directory: Path, knative_dir: Path | None = None, services: Iterable[str] | None = None) -> EventingSpec:
    """Read, validate and resolve every resource in `directory`. Raises SpecError naming file and field."""
    docs = _read_docs(directory)
    resolver = _Resolver(docs, frozenset(services) if services is not None else service_names(knative_dir))
    for d in docs:
        if isinstance(d.resource, schema.Broker):
            resolver.broker(d, d.resource)
        elif isinstance(d.resource, schema.KafkaSink):
            resolver.sink(d, d.resource)
    for d in docs:
        if isinstance(d.resource, schema.Broker) and d.resource.spec.delivery is not None:
            delivery = resolver.brokers[f"{d.namespace}/{d.name}"].delivery
            if delivery is not None and delivery.dead_letter is not None:
                resolver.check_destination(d, delivery.dead_letter, "spec.delivery.deadLetterSink")
    triggers = [resolver.trigger(d, d.resource) for d in docs if isinstance(d.resource, schema.Trigger)]
    sources = [resolver.source(d, d.resource) for d in docs if isinstance(d.resource, schema.KafkaSource)]
    result = EventingSpec(resolver.brokers, resolver.sinks, sources, triggers, resolver.services)
    check_loops(result)
    return result


def _result_types(function: str) -> tuple[str, ...]:
    from shared.contract import load_handler

    try:
        return load_handler(function).config.result_types
    except ValueError:
        return ()


def check_loops(spec: EventingSpec, result_types: Any = None) -> None:
    """Reject a function whose results reach it again through the broker's triggers."""
    result_types = result_types or _result_types
    to_function = [
        (t, t.subscriber.ref.name)
        for t in spec.triggers
        if t.subscriber.ref is not None and t.subscriber.ref.kind == "Service" and t.filter is not MATCH_ALL
    ]
    for t in spec.triggers:
        if t.filter is MATCH_ALL and t.subscriber.ref is not None and t.subscriber.ref.kind == "Service":
            raise SpecError(f"Trigger/{t.name}: matches every event, so {t.subscriber.ref.name}'s replies loop back")
    produces = {fn: result_types(fn) for _, fn in to_function}
    edges: dict[str, list[tuple[str, str, str]]] = {fn: [] for fn in produces}
    for fn, types in produces.items():
        for event_type in types:
            for trigger, target in to_function:
                if trigger.filter.may_match_type(event_type):
                    edges[fn].append((target, trigger.name, event_type))

    def visit(fn: str, stack: list[str], steps: list[str]) -> None:
        for target, trigger, event_type in edges.get(fn, []):
            step = f"{fn} answers {event_type}, which Trigger/{trigger} sends to {target}"
            if target in stack:
                cycle = [*steps[stack.index(target) :], step]
                raise SpecError("loop: " + "; ".join(cycle))
            visit(target, [*stack, target], [*steps, step])

    for fn in edges:
        visit(fn, [fn], [])
