"""The eventing resources as typed documents (pydantic, unknown fields refused), field names as the
Knative CRDs spell them. `parse(kind, document)` validates one; `spec.load` resolves references
between them. Errors come back as SchemaError with a dotted path to the field and a message.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from shared.service_files import SpecError

_ISO_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
NonEmpty = Annotated[str, Field(min_length=1)]


class SchemaError(ValueError):
    """One or more fields of a document are wrong: (path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))
        self.problems = problems


def _iso_seconds(text: Any) -> float | None:
    match = _ISO_DURATION.match(text) if isinstance(text, str) else None
    if match is None or text in ("P", "PT") or text.endswith("T"):
        return None
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


def parse_duration(text: Any, where: str) -> float:
    """ISO-8601 duration (`PT0.5S`, `PT1M30S`, `P1D`), as Knative's delivery spec uses -> seconds."""
    seconds = _iso_seconds(text)
    if seconds is None:
        raise SpecError(f"{where}: {text!r} is not an ISO-8601 duration (e.g. PT0.5S)")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectMeta(_Strict):
    name: NonEmpty
    namespace: str = "default"
    annotations: dict[str, str] = {}
    labels: dict[str, str] = {}


class Reference(_Strict):
    apiVersion: str = ""
    kind: NonEmpty
    name: NonEmpty
    namespace: str | None = None


class Destination(_Strict):
    ref: Reference | None = None
    uri: str | None = None
    CACerts: str | None = None
    audience: str | None = None

    @model_validator(mode="after")
    def _one_of_ref_or_uri(self) -> Destination:
        if self.ref is None and not self.uri:
            raise ValueError("needs a ref or a uri")
        if self.ref is not None and self.uri:
            raise ValueError("a uri relative to a ref is not supported by the embedded plane; use one")
        return self


class DeliverySpec(_Strict):
    retry: Annotated[StrictInt, Field(ge=0)] | None = None
    backoffPolicy: Literal["linear", "exponential"] | None = None
    backoffDelay: str | None = None
    timeout: str | None = None
    deadLetterSink: Destination | None = None
    format: str | None = None
    retryAfterMax: str | None = None

    @field_validator("backoffDelay", "timeout")
    @classmethod
    def _iso_duration(cls, value: str | None) -> str | None:
        if value is not None and _iso_seconds(value) is None:
            raise ValueError(f"{value!r} is not an ISO-8601 duration (e.g. PT0.5S)")
        return value


class _Resource(_Strict):
    apiVersion: str = ""
    metadata: ObjectMeta
    status: Any = None


class ConfigMap(_Resource):
    kind: Literal["ConfigMap"]
    data: dict[str, str] = {}


class BrokerSpec(_Strict):
    config: Reference | None = None
    delivery: DeliverySpec | None = None


class Broker(_Resource):
    kind: Literal["Broker"]
    spec: BrokerSpec = BrokerSpec()


class KafkaSinkSpec(_Strict):
    topic: NonEmpty
    bootstrapServers: Annotated[list[str], Field(min_length=1)]
    contentMode: Literal["binary", "structured"] = "binary"
    numPartitions: StrictInt | None = None
    replicationFactor: StrictInt | None = None
    auth: Any = None


class KafkaSink(_Resource):
    kind: Literal["KafkaSink"]
    spec: KafkaSinkSpec


class TriggerSpec(_Strict):
    broker: str | None = None
    brokerRef: Reference | None = None
    filter: Any = None
    filters: Any = None
    subscriber: Destination
    delivery: DeliverySpec | None = None

    @model_validator(mode="after")
    def _one_broker(self) -> TriggerSpec:
        if self.broker and self.brokerRef is not None:
            raise ValueError("set broker or brokerRef, not both")
        return self


class Trigger(_Resource):
    kind: Literal["Trigger"]
    spec: TriggerSpec


class CeOverrides(_Strict):
    extensions: dict[str, str] = {}


class KafkaSourceSpec(_Strict):
    bootstrapServers: Annotated[list[str], Field(min_length=1)]
    topics: Annotated[list[NonEmpty], Field(min_length=1)]
    consumerGroup: str | None = None
    initialOffset: Literal["latest", "earliest"] = "latest"
    consumers: StrictInt | None = None
    ordering: Literal["ordered", "unordered"] = "ordered"
    sink: Destination
    delivery: DeliverySpec | None = None
    ceOverrides: CeOverrides | None = None
    net: Any = None


class KafkaSource(_Resource):
    kind: Literal["KafkaSource"]
    spec: KafkaSourceSpec


Resource = ConfigMap | Broker | KafkaSink | Trigger | KafkaSource
KINDS: dict[str, type[Resource]] = {
    "ConfigMap": ConfigMap,
    "Broker": Broker,
    "KafkaSink": KafkaSink,
    "Trigger": Trigger,
    "KafkaSource": KafkaSource,
}


def _problem(error: Any) -> tuple[str, str]:
    path = ".".join(str(part) for part in error["loc"])
    parent, _, leaf = path.rpartition(".")
    if error["type"] == "extra_forbidden":
        return parent, f"unknown field(s) {leaf}"
    if error["type"] == "missing":
        return parent, f"missing required field(s) {leaf}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return path, message


def parse(document: dict[str, Any]) -> Resource:
    """Validate one document of a known kind; SchemaError lists every wrong field."""
    model = KINDS[document["kind"]]
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise SchemaError([_problem(error) for error in exc.errors()]) from None
