"""One error hierarchy and one table from error to HTTP status.

    FunctionError                  base; carries a message, optional details, the event id
    ├── InvalidEvent       400     malformed CloudEvent (bad headers, bad JSON, missing attributes)
    ├── UnknownEventType   400     a type this function does not accept
    ├── InvalidInput       400     event data does not fit the model (every problem listed)
    ├── PayloadTooLarge    413     body over the configured limit
    ├── QueueFull          429     batch queue at capacity (Retry-After)
    ├── ModelNotReady      503     model still loading or server draining (Retry-After)
    └── InferenceFailed    500     onnxruntime or postprocess failed

Knative's Kafka broker retries 5xx, 404, 408, 409 and 429 and dead-letters other 4xx, so the
400s are final (the event goes to the dead-letter sink) and 429/5xx are retried.
"""

from __future__ import annotations

from typing import Any


class FunctionError(Exception):
    """Base of every error a function answers with."""

    status: int = 500
    retry_after_s: int | None = None

    def __init__(self, message: str, details: list[str] | None = None, event_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.event_id = event_id

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.kind, "message": self.message}
        if self.details:
            body["details"] = self.details
        if self.event_id:
            body["id"] = self.event_id
        return body


class InvalidEvent(FunctionError):
    status = 400


class UnknownEventType(FunctionError):
    status = 400


class InvalidInput(FunctionError, ValueError):
    status = 400

    def __init__(self, problems: list[str], event_id: str | None = None):
        super().__init__("invalid input: " + "; ".join(problems), problems, event_id)


class PayloadTooLarge(FunctionError):
    status = 413


class QueueFull(FunctionError):
    status = 429
    retry_after_s = 1


class ModelNotReady(FunctionError):
    status = 503
    retry_after_s = 1


class InferenceFailed(FunctionError):
    status = 500


# Status codes Knative's Kafka broker retries (everything else 4xx is dead-lettered).
RETRYABLE_STATUS = frozenset({404, 408, 409, 429}) | frozenset(range(500, 600))
