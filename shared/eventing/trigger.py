"""A Trigger's dispatcher: broker-topic records -> filter -> subscriber, with reply and dead letter.

One consumer group per trigger (`knative-trigger-<namespace>-<name>`). A record on the broker
topic that is not a valid CloudEvent is logged with the reason and dead-lettered (wrapped as a
`dev.knative.kafka.event`), so the trigger keeps running and nothing vanishes silently.

The triggers of a shared reader get the same record one after the other on one thread: the record
is decoded once (`decoded`, per thread) and each trigger that passes the filter gets its own copy of
the event (filters only read the attributes).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shared.errors import InvalidEvent
from shared.eventing.delivery import Outcome
from shared.eventing.dispatcher import Finish
from shared.eventing.kafka_binding import from_record, wrap_record
from shared.eventing.sender import Sender, describe
from shared.eventing.spec import TriggerSpec
from shared.events import Event

log = logging.getLogger(__name__)
_last = threading.local()


def decoded(message: Any) -> Event | InvalidEvent:
    """The (lazy) event of `message`, or why it is none; the last record decoded on this thread is
    reused (the caller must not change the event: copy it)."""
    if getattr(_last, "message", None) is message:
        cached: Event | InvalidEvent = _last.result
        return cached
    try:
        result: Event | InvalidEvent = from_record(message.headers(), message.value(), lazy=True)
    except InvalidEvent as exc:
        result = exc
    _last.message, _last.result = message, result
    return result


class TriggerHandler:
    """Per record: decode, filter, send."""

    def __init__(self, trigger: TriggerSpec, sender: Sender):
        self.trigger = trigger
        self.sender = sender
        self.name = f"Trigger/{trigger.name}"

    def __call__(self, message: Any, finish: Finish) -> None:
        event = decoded(message)
        if isinstance(event, InvalidEvent):
            exc = event
            where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
            log.error("%s: record %s is not a valid CloudEvent: %s", self.name, where, exc.message)
            wrapped = wrap_record(
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                timestamp_ms=message.timestamp()[1],
                key=message.key(),
                headers=message.headers(),
                value=message.value(),
                namespace=self.trigger.namespace,
                source_name=self.trigger.name,
            )
            outcome = Outcome(False, error=f"invalid CloudEvent: {exc.message}")
            self.sender.fail(wrapped, outcome, describe(self.sender.target), finish)
            return
        if not self.trigger.filter.match(event.attributes):
            finish()
            return
        self.sender.send(Event(dict(event.attributes), event.data, _raw=event._raw), finish)
