"""Load `eventing/*.yaml` (and the Service names in `knative/`) into typed, checked objects.

Kinds: ConfigMap (broker config), Broker (class Kafka), KafkaSource, Trigger, KafkaSink. Loading
rejects, with the file and a path in the message: unknown fields, a Trigger whose broker or
subscriber does not exist, a dead-letter sink that does not exist, and a loop (a function whose
result types a chain of triggers routes back into itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared import service_files
from shared.eventing.filters import MATCH_ALL, Filter, FilterError, compile_trigger_filter
from shared.service_files import SERVICE_API, SpecError

__all__ = ["EventingSpec", "SpecError", "check_loops", "load", "parse_duration"]

ORDER_ANNOTATION = "kafka.eventing.knative.dev/delivery.order"
# Ours, ignored by Knative: deliver up to N events in one batched-CloudEvents request (the subscriber
# must accept `application/cloudevents-batch+json`, as every onnxfn function does).
BATCH_ANNOTATION = "onnxfn.dev/delivery.batch"
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


_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: Any, where: str) -> float:
    """ISO-8601 duration (`PT0.5S`, `PT1M30S`, `P1D`) -> seconds."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise SpecError(f"{where}: {text!r} is not an ISO-8601 duration (e.g. PT0.5S)")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


class _Doc:
    """One YAML document being read, for error messages with file and path."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path = path
        self.doc = doc
        meta = doc.get("metadata") or {}
        self.name = str(meta.get("name", "?"))
        self.label = f"{path.name}: {doc.get('kind')}/{self.name}"

    def error(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.label}: {where}: {message}")

    def fields(self, node: Any, allowed: Iterable[str], where: str, required: Iterable[str] = ()) -> dict[str, Any]:
        if node is None:
            node = {}
        if not isinstance(node, dict):
            raise self.error(where, "expected an object")
        allowed = set(allowed)
        unknown = sorted(set(node) - allowed)
        if unknown:
            raise self.error(where, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        missing = [name for name in required if node.get(name) in (None, "", [], {})]
        if missing:
            raise self.error(where, f"missing required field(s) {', '.join(missing)}")
        return node


_META = ("name", "namespace", "annotations", "labels")


def _destination(d: _Doc, node: Any, where: str, namespace: str) -> Destination:
    node = d.fields(node, ("ref", "uri", "CACerts", "audience"), where)
    ref = None
    if node.get("ref") is not None:
        r = d.fields(node["ref"], ("apiVersion", "kind", "name", "namespace"), where + ".ref", ("kind", "name"))
        ref = Ref(str(r.get("apiVersion", "")), str(r["kind"]), str(r["name"]), str(r.get("namespace", namespace)))
    uri = node.get("uri")
    if ref is None and not uri:
        raise d.error(where, "needs a ref or a uri")
    if ref is not None and uri:
        raise d.error(where, "a uri relative to a ref is not supported by the embedded plane; use one")
    return Destination(ref, str(uri) if uri else None)


def _delivery(d: _Doc, node: Any, where: str, namespace: str) -> Delivery | None:
    if node is None:
        return None
    allowed = ("retry", "backoffPolicy", "backoffDelay", "timeout", "deadLetterSink", "format", "retryAfterMax")
    node = d.fields(node, allowed, where)
    retry = node.get("retry")
    if retry is not None and (not isinstance(retry, int) or isinstance(retry, bool) or retry < 0):
        raise d.error(where + ".retry", "must be an integer >= 0")
    policy = node.get("backoffPolicy")
    if policy is not None and policy not in ("linear", "exponential"):
        raise d.error(where + ".backoffPolicy", f"{policy!r}: expected linear or exponential")
    delay = node.get("backoffDelay")
    timeout = node.get("timeout")
    dls = node.get("deadLetterSink")
    return Delivery(
        retry=retry,
        backoff_policy=policy,
        backoff_delay_s=parse_duration(delay, f"{d.label}: {where}.backoffDelay") if delay is not None else None,
        timeout_s=parse_duration(timeout, f"{d.label}: {where}.timeout") if timeout is not None else None,
        dead_letter=_destination(d, dls, where + ".deadLetterSink", namespace) if dls is not None else None,
    )


def _batch(d: Any, value: Any, ordered: bool) -> int:
    where = f"metadata.annotations.{BATCH_ANNOTATION}"
    if value is None:
        return 1
    try:
        batch = int(str(value))
    except ValueError:
        raise d.error(where, f"{value!r}: expected a whole number of events") from None
    if not 1 <= batch <= 1000:
        raise d.error(where, f"{batch}: expected 1 to 1000 events")
    if ordered and batch > 1:
        raise d.error(where, "batched delivery needs an unordered trigger")
    return batch


def _meta(d: _Doc) -> tuple[str, str, dict[str, str]]:
    meta = d.fields(d.doc.get("metadata"), _META, "metadata", ("name",))
    return d.name, str(meta.get("namespace", "default")), dict(meta.get("annotations") or {})


def _order(d: _Doc, value: str | None, where: str, default: str) -> bool:
    value = value or default
    if value not in ("ordered", "unordered"):
        raise d.error(where, f"{value!r}: expected ordered or unordered")
    return value == "ordered"


def _int_text(d: _Doc, data: Mapping[str, Any], key: str, default: int) -> int:
    raw = data.get(key)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise d.error(f"data.{key}", f"{raw!r} is not an integer") from None


def _top(d: _Doc, spec_fields: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    d.fields(d.doc, ("apiVersion", "kind", "metadata", "spec", "status"), "")
    return d.fields(d.doc.get("spec"), spec_fields, "spec", required)


def _read_docs(directory: Path) -> list[_Doc]:
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        raise SpecError(f"{directory}: no YAML files")
    docs = []
    for path in files:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise SpecError(f"{path.name}: not valid YAML: {exc}") from None
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise SpecError(f"{path.name}: every document must be an object with a kind")
            docs.append(_Doc(path, doc))
    return docs


def service_names(knative_dir: Path | None) -> frozenset[str]:
    """Knative Service names committed in `knative/`; the function folders when it has none."""
    names = service_files.service_names(knative_dir) if knative_dir is not None else frozenset()
    if names:
        return names
    from shared.contract import function_names

    return frozenset(function_names())


def load(directory: Path, knative_dir: Path | None = None, services: Iterable[str] | None = None) -> EventingSpec:
    """Read and check every resource in `directory`. Raises SpecError with a clear message."""
    docs = _read_docs(directory)
    config_maps: dict[tuple[str, str], dict[str, Any]] = {}
    for d in docs:
        if d.doc["kind"] == "ConfigMap":
            d.fields(d.doc, ("apiVersion", "kind", "metadata", "data"), "")
            name, ns, _ = _meta(d)
            config_maps[(ns, name)] = dict(d.doc.get("data") or {})

    brokers: dict[str, BrokerSpec] = {}
    sinks: dict[str, KafkaSinkSpec] = {}
    raw_triggers: list[tuple[_Doc, dict[str, Any], str, dict[str, str]]] = []
    raw_sources: list[tuple[_Doc, dict[str, Any], str]] = []
    for d in docs:
        kind = d.doc["kind"]
        if kind == "ConfigMap":
            continue
        name, ns, annotations = _meta(d)
        if kind == "Broker":
            spec = _top(d, ("config", "delivery"))
            broker_class = annotations.get(CLASS_ANNOTATION)
            if broker_class not in ("Kafka", "KafkaNamespaced"):
                raise d.error(f"metadata.annotations.{CLASS_ANNOTATION}", f"{broker_class!r}: expected Kafka")
            data: dict[str, Any] = {}
            if spec.get("config") is not None:
                cfg = d.fields(spec["config"], ("apiVersion", "kind", "name", "namespace"), "spec.config", ("name",))
                if cfg.get("kind", "ConfigMap") != "ConfigMap":
                    raise d.error("spec.config.kind", "must be ConfigMap")
                key = (str(cfg.get("namespace", ns)), str(cfg["name"]))
                if key not in config_maps:
                    raise d.error("spec.config", f"ConfigMap {key[0]}/{key[1]} is not defined")
                data = config_maps[key]
            brokers[f"{ns}/{name}"] = BrokerSpec(
                name,
                ns,
                _int_text(d, data, "default.topic.partitions", 10),
                _int_text(d, data, "default.topic.replication.factor", 1),
                _delivery(d, spec.get("delivery"), "spec.delivery", ns),
            )
        elif kind == "KafkaSink":
            allowed = ("topic", "bootstrapServers", "contentMode", "numPartitions", "replicationFactor", "auth")
            spec = _top(d, allowed, ("topic", "bootstrapServers"))
            mode = spec.get("contentMode", "binary")
            if mode not in ("binary", "structured"):
                raise d.error("spec.contentMode", f"{mode!r}: expected binary or structured")
            sinks[f"{ns}/{name}"] = KafkaSinkSpec(
                name, ns, str(spec["topic"]), mode, spec.get("numPartitions"), spec.get("replicationFactor")
            )
        elif kind == "Trigger":
            spec = _top(d, ("broker", "brokerRef", "filter", "filters", "subscriber", "delivery"), ("subscriber",))
            raw_triggers.append((d, spec, ns, annotations))
        elif kind == "KafkaSource":
            source_fields = (
                "bootstrapServers", "topics", "consumerGroup", "initialOffset", "consumers", "ordering",
                "sink", "delivery", "ceOverrides", "net",
            )  # fmt: skip
            raw_sources.append((d, _top(d, source_fields, ("bootstrapServers", "topics", "sink")), ns))
        else:
            raise d.error("kind", f"unsupported kind {kind!r} (ConfigMap, Broker, KafkaSource, Trigger, KafkaSink)")

    services_set = frozenset(services) if services is not None else service_names(knative_dir)

    def check_destination(d: _Doc, dest: Destination, where: str) -> None:
        if dest.ref is None:
            return
        key = f"{dest.ref.namespace}/{dest.ref.name}"
        kind = dest.ref.kind
        if kind == "Service":
            if dest.ref.api_version not in ("", SERVICE_API):
                raise d.error(where, f"Service apiVersion must be {SERVICE_API}")
            if dest.ref.name not in services_set:
                known = ", ".join(sorted(services_set)) or "none"
                raise d.error(where, f"subscriber Service {dest.ref.name!r} does not exist (known: {known})")
        elif kind == "KafkaSink":
            if key not in sinks:
                raise d.error(where, f"KafkaSink {key} is not defined")
        elif kind == "Broker":
            if key not in brokers:
                raise d.error(where, f"Broker {key} is not defined")
        else:
            raise d.error(where, f"unsupported destination kind {kind!r} (Service, KafkaSink, Broker)")

    for broker in brokers.values():
        if broker.delivery and broker.delivery.dead_letter:
            check_destination(
                next(d for d in docs if d.doc["kind"] == "Broker" and d.name == broker.name),
                broker.delivery.dead_letter,
                "spec.delivery.deadLetterSink",
            )

    triggers = []
    for d, spec, ns, annotations in raw_triggers:
        broker_name = spec.get("broker")
        if spec.get("brokerRef") is not None:
            if broker_name:
                raise d.error("spec", "set broker or brokerRef, not both")
            ref = d.fields(spec["brokerRef"], ("apiVersion", "kind", "name", "namespace"), "spec.brokerRef", ("name",))
            broker_key = f"{ref.get('namespace', ns)}/{ref['name']}"
        else:
            broker_key = f"{ns}/{broker_name or 'default'}"
        if broker_key not in brokers:
            raise d.error("spec.broker", f"Broker {broker_key} is not defined")
        try:
            flt = compile_trigger_filter(spec.get("filter"), spec.get("filters"), "spec")
        except FilterError as exc:
            raise d.error("filter", str(exc)) from None
        subscriber = _destination(d, spec["subscriber"], "spec.subscriber", ns)
        check_destination(d, subscriber, "spec.subscriber")
        own = _delivery(d, spec.get("delivery"), "spec.delivery", ns)
        base = brokers[broker_key].delivery
        delivery = own.merged_over(base) if own else (base or Delivery())
        if delivery.dead_letter:
            check_destination(d, delivery.dead_letter, "spec.delivery.deadLetterSink")
        ordered = _order(d, annotations.get(ORDER_ANNOTATION), f"metadata.annotations.{ORDER_ANNOTATION}", "unordered")
        batch = _batch(d, annotations.get(BATCH_ANNOTATION), ordered)
        triggers.append(TriggerSpec(d.name, ns, brokers[broker_key].name, flt, subscriber, delivery, ordered, batch))

    sources = []
    for d, spec, ns in raw_sources:
        topics = spec["topics"]
        if not isinstance(topics, list) or not all(isinstance(t, str) and t for t in topics):
            raise d.error("spec.topics", "expected a list of topic names")
        offset = spec.get("initialOffset", "latest")
        if offset not in ("latest", "earliest"):
            raise d.error("spec.initialOffset", f"{offset!r}: expected latest or earliest")
        sink = _destination(d, spec["sink"], "spec.sink", ns)
        check_destination(d, sink, "spec.sink")
        overrides = d.fields(spec.get("ceOverrides"), ("extensions",), "spec.ceOverrides")
        default_delivery = Delivery(retry=10, backoff_policy="exponential", backoff_delay_s=0.3, timeout_s=600.0)
        own = _delivery(d, spec.get("delivery"), "spec.delivery", ns)
        sources.append(
            KafkaSourceSpec(
                d.name,
                ns,
                tuple(topics),
                str(spec.get("consumerGroup") or f"knative-kafka-source-{ns}-{d.name}"),
                offset,
                _order(d, spec.get("ordering"), "spec.ordering", "ordered"),
                sink,
                own or default_delivery,
                dict(overrides.get("extensions") or {}),
            )
        )

    result = EventingSpec(brokers, sinks, sources, triggers, services_set)
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
