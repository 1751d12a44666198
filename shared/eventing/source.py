"""A KafkaSource: input-topic records -> CloudEvents -> its sink (usually the broker).

Records in CloudEvents binary or structured mode pass through as they are. Any other record, and
a record whose `ce_` headers do not make a valid CloudEvent (logged with the reason), becomes the
`dev.knative.kafka.event` Knative builds (id `partition:<p>/offset:<o>`, `key` = `partitionkey` =
record key, `kafkaheader*` extensions). `ceOverrides.extensions` are set on every event.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.errors import InvalidEvent
from shared.eventing.dispatcher import Finish
from shared.eventing.kafka_binding import from_record, is_structured, wrap_record
from shared.eventing.sender import Sender
from shared.eventing.spec import KafkaSourceSpec
from shared.events import Event

log = logging.getLogger(__name__)


def record_event(spec: KafkaSourceSpec, message: Any) -> Event:
    """One input record -> the event the source sends on."""
    headers = message.headers()
    if is_structured(headers) or any(name.lower().startswith("ce_") for name, _ in headers or ()):
        try:
            return from_record(headers, message.value(), lazy=True)
        except InvalidEvent as exc:
            log.warning(
                "KafkaSource/%s: %s[%d]@%d is not a valid CloudEvent (%s); forwarded as %s",
                spec.name, message.topic(), message.partition(), message.offset(), exc.message,
                "dev.knative.kafka.event",
            )  # fmt: skip
    return wrap_record(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        timestamp_ms=message.timestamp()[1],
        key=message.key(),
        headers=headers,
        value=message.value(),
        namespace=spec.namespace,
        source_name=spec.name,
    )


class SourceHandler:
    def __init__(self, spec: KafkaSourceSpec, sender: Sender):
        self.spec = spec
        self.sender = sender

    def __call__(self, message: Any, finish: Finish) -> None:
        event = record_event(self.spec, message)
        if self.spec.extensions:
            event.attributes.update(self.spec.extensions)
        self.sender.send(event, finish)
