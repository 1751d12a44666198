"""HTTP delivery to a subscriber with a delivery spec, as the Kafka broker's dispatcher does it.

One event goes out in HTTP binary mode with `Prefer: reply` and `Kn-Namespace`. Retryable: network
errors, timeouts and the statuses 5xx, 404, 408, 409 and 429; each retry waits the backoff of the
delivery spec, or the `Retry-After` of a 429/503 when that is longer. A 2xx answer is a success: an
empty body (or a 202) means no reply, a CloudEvent is the reply, and any other body is a failure
(not retried), as in Knative. `dead_letter_event` adds the `knativeerror*` extensions.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from shared.errors import RETRYABLE_STATUS, FunctionError
from shared.eventing.spec import DEFAULT_TIMEOUT_S, Delivery
from shared.events import ERROR_EVENT_TYPE, EXTENSION_NAME, Event, decode_http, encode_http, to_binary

ERROR_DATA_LIMIT = 1024
RETRY_AFTER_MAX_S = 60.0


@dataclass
class Outcome:
    """The final result of delivering one event (after any retries)."""

    ok: bool
    status: int | None = None
    reply: Event | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    attempts: int = 0
    each: list[Outcome] | None = None  # a batched request that succeeded: one outcome per event
    # every attempt: (start, end, status, error), seconds since the epoch, for the delivery's trace
    tries: list[tuple[float, float, int | None, str]] = field(default_factory=list)


class Abandoned(Exception):
    """Delivery stopped because the plane is shutting down: the event's outcome is not final."""


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True too
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpSubscriber:
    """POSTs events to one URL with retries; connections are kept alive per thread."""

    def __init__(self, url: str, delivery: Delivery, namespace: str, stopping: threading.Event):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"subscriber {url!r}: expected an http(s) URL")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.delivery = delivery
        self.namespace = namespace
        self.stopping = stopping
        self.timeout_s = delivery.timeout_s or DEFAULT_TIMEOUT_S
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def attempt(self, event: Event) -> Outcome:
        """One POST; never raises for network trouble (that is an Outcome without a status)."""
        headers, body = to_binary(event)
        return self._post(headers, body, self._classify)

    def attempt_batch(self, events: list[Event]) -> Outcome:
        """One POST of many events in batched mode; when it succeeds, `each` holds every event's outcome
        (matched by the reply's `requestid`; an onnxfn error event is that event's failure)."""
        headers, body = encode_http("batch", events)
        # The request's own trace context (the activator's span joins it): the first traced event's.
        traced = next((e.attributes["traceparent"] for e in events if e.attributes.get("traceparent")), None)
        if traced is not None:
            headers["traceparent"] = traced
        return self._post(headers, body, lambda status, h, payload: split_batch_reply(events, status, h, payload))

    def _post(self, headers: dict[str, str], body: bytes, classify: Any) -> Outcome:
        headers["Prefer"] = "reply"
        headers["Kn-Namespace"] = self.namespace
        headers["Content-Length"] = str(len(body))
        try:
            conn = self._connection()
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            reply_headers = {k.lower(): v for k, v in response.getheaders()}
            if response.will_close:
                self._drop_connection()
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            return Outcome(False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        outcome: Outcome = classify(response.status, reply_headers, payload)
        return outcome

    @staticmethod
    def _classify(status: int, headers: dict[str, str], body: bytes) -> Outcome:
        if not 200 <= status < 300:
            return Outcome(False, status, body=body, headers=headers, error=f"HTTP {status}")
        if status == 202 or not body:
            return Outcome(True, status, headers=headers)
        try:
            mode, events = decode_http(headers, body)
        except FunctionError as exc:
            error = f"unable to decode response: {exc.message}"
            return Outcome(False, status, body=body, headers=headers, error=error)
        if mode == "batch":
            return Outcome(False, status, body=body, headers=headers, error="a batched reply is not one event")
        return Outcome(True, status, reply=events[0], headers=headers)

    @staticmethod
    def retryable(outcome: Outcome) -> bool:
        if outcome.ok:
            return False
        return outcome.status is None or outcome.status in RETRYABLE_STATUS

    def deliver(self, event: Event) -> Outcome:
        """Attempt, then retry per the delivery spec. Raises Abandoned when the plane stops meanwhile."""
        return self._with_retries(lambda: self.attempt(event))

    def deliver_batch(self, events: list[Event]) -> list[Outcome]:
        """Many events in one request; one outcome per event. What failed retryably (the whole
        request, or single events answered 429/5xx inside the batched reply) is sent again, only
        those events, per the delivery spec. Raises Abandoned when the plane stops meanwhile."""
        outcomes: list[Outcome | None] = [None] * len(events)
        pending = list(range(len(events)))
        retries = self.delivery.retry or 0
        count = 0
        tries: list[list[tuple[float, float, int | None, str]]] = [[] for _ in events]
        while True:
            started = time.time()
            whole = self.attempt_batch([events[i] for i in pending])
            ended = time.time()
            count += 1
            each = whole.each if whole.ok and whole.each is not None else [dataclasses.replace(whole) for _ in pending]
            again = []
            for index, outcome in zip(pending, each, strict=True):
                outcome.attempts = count
                tries[index].append((started, ended, outcome.status, outcome.error))
                outcome.tries = tries[index]
                outcomes[index] = outcome
                if self.retryable(outcome) and count <= retries:
                    again.append(index)
            if not again:
                return [outcome for outcome in outcomes if outcome is not None]
            pending = again
            if self.stopping.wait(self._backoff(count, whole)):
                raise Abandoned(self.url)

    def _backoff(self, count: int, outcome: Outcome) -> float:
        """The delay before attempt `count + 1`: the delivery spec's, or a longer Retry-After on 429/503."""
        delay = self.delivery.delay_s(count)
        if outcome.status in (429, 503):
            hinted = retry_after_s(outcome.headers.get("retry-after"))
            if hinted is not None:
                delay = max(delay, min(hinted, RETRY_AFTER_MAX_S))
        return delay

    def _with_retries(self, attempt: Callable[[], Outcome]) -> Outcome:
        retries = self.delivery.retry or 0
        count = 0
        tries: list[tuple[float, float, int | None, str]] = []
        while True:
            started = time.time()
            outcome = attempt()
            tries.append((started, time.time(), outcome.status, outcome.error))
            count += 1
            outcome.attempts = count
            outcome.tries = tries
            if not self.retryable(outcome) or count > retries:
                return outcome
            if self.stopping.wait(self._backoff(count, outcome)):
                raise Abandoned(self.url)


def split_batch_reply(events: list[Event], status: int, headers: dict[str, str], body: bytes) -> Outcome:
    """A batched reply -> one outcome per event (the whole request failed when it is no batch of replies)."""
    if not 200 <= status < 300:
        return Outcome(False, status, body=body, headers=headers, error=f"HTTP {status}")
    try:
        mode, replies = decode_http(headers, body)
    except FunctionError as exc:
        return Outcome(False, status, body=body, headers=headers, error=f"unable to decode response: {exc.message}")
    if mode != "batch":
        return Outcome(False, status, body=body, headers=headers, error="a batched request got no batched reply")
    by_request = {str(reply.get("requestid")): reply for reply in replies}
    each: list[Outcome] = []
    for event in events:
        reply = by_request.get(event.id)
        if reply is None:
            each.append(Outcome(False, status, error="no reply for this event in the batched reply"))
        else:
            each.append(failed_reply(reply) or Outcome(True, status, reply=reply))
    return Outcome(True, status, headers=headers, each=each)


def failed_reply(reply: Event) -> Outcome | None:
    """The failed outcome an error event stands for (its `status`, its data as the body), else None."""
    if reply.type != ERROR_EVENT_TYPE or not isinstance(reply.data, dict):
        return None
    code = reply.data.get("status")
    return Outcome(
        False,
        code if isinstance(code, int) else 500,
        body=orjson.dumps(reply.data),
        error=str(reply.data.get("message")),
    )


def dead_letter_event(event: Event, destination: str, outcome: Outcome) -> Event:
    """A copy of `event` with `knativeerrordest`, `knativeerrorcode`, `knativeerrordata` and `kne-*` headers."""
    attributes: dict[str, Any] = dict(event.attributes)
    attributes["knativeerrordest"] = destination
    if outcome.status is not None:
        attributes["knativeerrorcode"] = str(outcome.status)
    data = outcome.body[:ERROR_DATA_LIMIT] if outcome.body else outcome.error.encode()[:ERROR_DATA_LIMIT]
    if data:
        attributes["knativeerrordata"] = base64.b64encode(data).decode()
    for name, value in outcome.headers.items():
        if name.startswith("kne-"):
            extension = name[4:].lower()
            if EXTENSION_NAME.match(extension):
                attributes[extension] = value
    return Event(attributes, event.data, _raw=event._raw)
