"""A Trigger's dispatcher: broker-topic records -> filter -> subscriber, with reply and dead letter.

One consumer group per trigger (`knative-trigger-<namespace>-<name>`). A record on the broker
topic that is not a valid CloudEvent is logged with the reason and dead-lettered (wrapped as a
`dev.knative.kafka.event`), so the trigger keeps running and nothing vanishes silently.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.errors import InvalidEvent
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.delivery import Outcome
from shared.eventing.dispatcher import Dispatcher, Finish
from shared.eventing.kafka_binding import from_record, wrap_record
from shared.eventing.sender import Sender, describe
from shared.eventing.spec import BrokerSpec, TriggerSpec

log = logging.getLogger(__name__)


class TriggerHandler:
    """Per record: decode, filter, send."""

    def __init__(self, trigger: TriggerSpec, sender: Sender):
        self.trigger = trigger
        self.sender = sender
        self.name = f"Trigger/{trigger.name}"

    def __call__(self, message: Any, finish: Finish) -> None:
        try:
            event = from_record(message.headers(), message.value(), lazy=True)
        except InvalidEvent as exc:
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
        self.sender.send(event, finish)


def trigger_dispatcher(
    trigger: TriggerSpec, broker: BrokerSpec, config: KafkaConfig, sender: Sender, max_pending: int = 2000
) -> Dispatcher:
    """The consumer loop of one trigger on its broker's topic."""
    return Dispatcher(
        f"trigger-{trigger.name}",
        config,
        trigger.group_id,
        [broker.topic],
        TriggerHandler(trigger, sender),
        ordered=trigger.ordered,
        max_pending=max_pending,
    )
