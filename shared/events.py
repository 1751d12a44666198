"""The CloudEvents edge: wire bytes <-> one framework-free `Event`.

HTTP binding (CloudEvents 1.0): binary mode (`ce-*` headers, body = data), structured mode
(`application/cloudevents+json`) and batched mode (`application/cloudevents-batch+json`).
Mode detection follows the spec's Content-Type rule. JSON is read and written with orjson.
Nothing here knows Flask, Kafka or onnxruntime; the Kafka binding builds on the same helpers.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson

from shared.errors import InvalidEvent

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON_CONTENT = "application/json"
ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]{1,64}$")
EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# The type of the event that answers, in a batched reply, a request event that was invalid on its own.
ERROR_EVENT_TYPE = "dev.onnxfn.error"
# Attributes carried from a request onto its result event.
CARRIED = ("subject", "partitionkey", "traceparent", "tracestate")

Mode = str  # "binary" | "structured" | "batch"


@dataclass(slots=True)
class Event:
    """One CloudEvent: context attributes (extensions included) and data.

    `data` is the decoded JSON value for JSON content types, `bytes` for anything else, None if absent.
    """

    attributes: dict[str, Any]
    data: Any = None
    _raw: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return str(self.attributes["id"])

    @property
    def type(self) -> str:
        return str(self.attributes["type"])

    @property
    def source(self) -> str:
        return str(self.attributes["source"])

    def get(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)

    @property
    def datacontenttype(self) -> str | None:
        value = self.attributes.get("datacontenttype")
        return None if value is None else str(value)


def is_json_content(content_type: str | None) -> bool:
    """True for absent (JSON by default), application/json, text/json and any `+json` type."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in (JSON_CONTENT, "text/json") or media.endswith("+json")


def data_bytes(event: Event) -> bytes | None:
    """The event's data as bytes for a binary-mode body (JSON-encoded for JSON content)."""
    if event._raw is not None:
        return event._raw
    if event.data is None:
        return None
    if isinstance(event.data, bytes | bytearray):
        return bytes(event.data)
    if isinstance(event.data, str) and not is_json_content(event.datacontenttype):
        return event.data.encode()
    return orjson.dumps(event.data, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_data(body: bytes, content_type: str | None, event_id: str | None = None) -> Any:
    """Data bytes from a binary-mode body or record value -> Python value."""
    if not body:
        return None
    if is_json_content(content_type):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"data is not valid JSON: {exc}", event_id=event_id) from None
    return bytes(body)


def check_attributes(attributes: dict[str, Any]) -> None:
    """Raise InvalidEvent listing every problem with the context attributes."""
    problems = [f"missing required attribute '{name}'" for name in REQUIRED if not attributes.get(name)]
    version = attributes.get("specversion")
    if version and version != SPECVERSION:
        problems.append(f"unsupported specversion {version!r} (expected '1.0')")
    problems += [
        f"invalid attribute name {name!r} (lowercase letters and digits only)"
        for name in attributes
        if not ATTRIBUTE_NAME.match(name)
    ]
    if problems:
        raise InvalidEvent("invalid CloudEvent: " + "; ".join(problems), problems, attributes.get("id"))


def from_binary(headers: Mapping[str, str], body: bytes) -> Event:
    """HTTP binary mode: attributes from `ce-*` headers, data from the body."""
    attributes: dict[str, Any] = {}
    for key, value in headers.items():
        lower = key.lower()
        if lower.startswith("ce-"):
            if "%" in value:
                value = unquote(value)
            elif len(value) > 1 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            attributes[lower[3:]] = value
    content_type = headers.get("content-type") or headers.get("Content-Type")
    if content_type:
        attributes["datacontenttype"] = content_type
    check_attributes(attributes)
    data = decode_data(body, content_type, attributes["id"])
    return Event(attributes, data, _raw=bytes(body) if body and not is_json_content(content_type) else None)


def from_structured_dict(envelope: Any) -> Event:
    """A JSON-format envelope (already parsed) -> Event."""
    if not isinstance(envelope, dict):
        raise InvalidEvent("structured CloudEvent must be a JSON object")
    attributes = {k: v for k, v in envelope.items() if k not in ("data", "data_base64")}
    check_attributes(attributes)
    if "data_base64" not in envelope:
        return Event(attributes, envelope.get("data"))
    import base64

    event_id = str(attributes["id"])
    try:
        raw = base64.b64decode(envelope["data_base64"], validate=True)
    except (ValueError, TypeError):
        raise InvalidEvent("data_base64 is not valid base64", event_id=event_id) from None
    # The bytes of the data, as SDKs write bytes data: for a JSON content type they are JSON text.
    content_type = attributes.get("datacontenttype")
    if raw and content_type and is_json_content(content_type):
        return Event(attributes, decode_data(raw, content_type, event_id), _raw=raw)
    if raw and not content_type:  # no type given: JSON if it parses, else the bytes
        with contextlib.suppress(orjson.JSONDecodeError):
            return Event(attributes, orjson.loads(raw), _raw=raw)
    return Event(attributes, raw)


def to_structured_dict(event: Event) -> dict[str, Any]:
    """Event -> JSON-format envelope (binary data as `data_base64`; undecoded JSON data is decoded)."""
    envelope = dict(event.attributes)
    data = event.data
    if data is None and event._raw is not None:
        data = event._raw
        if is_json_content(event.datacontenttype):
            with contextlib.suppress(orjson.JSONDecodeError):  # not JSON after all: data_base64
                data = orjson.loads(event._raw)
    if data is not None:
        if isinstance(data, bytes | bytearray):
            import base64

            envelope["data_base64"] = base64.b64encode(data).decode()
        else:
            envelope["data"] = data
    return envelope


def _parse_json(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"{what} body is not valid JSON: {exc}") from None


def detect_mode(content_type: str | None) -> Mode:
    """The HTTP binding's rule: `application/cloudevents-batch` batched, `application/cloudevents` structured."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media.startswith("application/cloudevents-batch"):
        return "batch"
    if media.startswith("application/cloudevents"):
        return "structured"
    return "binary"


def decode_http(headers: Mapping[str, str], body: bytes) -> tuple[Mode, list[Event]]:
    """HTTP request -> (mode, events). Raises InvalidEvent with a clear message."""
    mode = detect_mode(headers.get("content-type") or headers.get("Content-Type"))
    if mode == "binary":
        return mode, [from_binary(headers, body)]
    parsed = _parse_json(body, "structured" if mode == "structured" else "batched")
    if mode == "structured":
        return mode, [from_structured_dict(parsed)]
    if not isinstance(parsed, list):
        raise InvalidEvent("batched CloudEvents body must be a JSON array")
    if not parsed:
        raise InvalidEvent("batched CloudEvents body is an empty array")
    return mode, [from_structured_dict(item) for item in parsed]


_HEADER_SAFE = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("%")}


def encode_header_value(value: Any) -> str:
    """Percent-encode a binary-mode header value (space, '"', '%', non-ASCII) as the binding requires."""
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    if all(ord(c) in _HEADER_SAFE for c in text):
        return text
    out = []
    for char in text:
        if ord(char) in _HEADER_SAFE:
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode())
    return "".join(out)


def to_binary(event: Event) -> tuple[dict[str, str], bytes]:
    """Event -> binary-mode HTTP headers and body."""
    headers = {
        "ce-" + name: encode_header_value(value)
        for name, value in event.attributes.items()
        if name != "datacontenttype" and value is not None
    }
    body = data_bytes(event) or b""
    if body:
        headers["Content-Type"] = event.datacontenttype or JSON_CONTENT
    return headers, body


def encode_http(mode: Mode, events: list[Event]) -> tuple[dict[str, str], bytes]:
    """Events -> HTTP reply in the given mode (binary and structured take exactly one event)."""
    if mode == "binary":
        return to_binary(events[0])
    if mode == "structured":
        body = orjson.dumps(to_structured_dict(events[0]), option=orjson.OPT_SERIALIZE_NUMPY)
        return {"Content-Type": STRUCTURED + "; charset=utf-8"}, body
    body = orjson.dumps([to_structured_dict(e) for e in events], option=orjson.OPT_SERIALIZE_NUMPY)
    return {"Content-Type": BATCH + "; charset=utf-8"}, body


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def now_rfc3339() -> str:
    """The current UTC time, RFC 3339 with microseconds (the second's text formatted once a second)."""
    now = time.time()
    second = int(now)
    if _second[0] != second:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"


def _fresh_attributes(type_: str, source: str) -> dict[str, Any]:
    return {
        "specversion": SPECVERSION,
        "id": uuid.uuid4().hex,
        "source": source,
        "type": type_,
        "time": now_rfc3339(),
        "datacontenttype": JSON_CONTENT,
    }


def new_event(
    type_: str,
    source: str,
    data: Any,
    extensions: Mapping[str, Any] | None = None,
    subject: str | None = None,
) -> Event:
    """A fresh event with a new id, the current time and JSON data."""
    attributes = _fresh_attributes(type_, source)
    if subject is not None:
        attributes["subject"] = subject
    if extensions:
        for name, value in extensions.items():
            if not EXTENSION_NAME.match(name):
                raise ValueError(f"invalid extension name {name!r}: 1-20 lowercase letters and digits")
            if value is not None and value != "":
                attributes[name] = value
    return Event(attributes, data)


def with_traceparent(event: Event, traceparent: str | None) -> Event:
    """A copy of `event` whose trace parent is `traceparent` (the span of the hop handing it on);
    `event` itself when None (tracing off). Copied, not changed: fan-out shares one decoded event."""
    if traceparent is None or traceparent == event.attributes.get("traceparent"):
        return event
    return Event({**event.attributes, "traceparent": traceparent}, event.data, _raw=event._raw)


def result_event(request: Event, type_: str, source: str, data: Any, model_version: str, revision: str) -> Event:
    """The reply to `request`: new id, result type, our source; subject, partitionkey and trace context
    carried over; `requestid`, `modelversion` and `revision` extensions."""
    attributes = _fresh_attributes(type_, source)
    req = request.attributes
    for name in CARRIED:
        value = req.get(name)
        if value is not None:
            attributes[name] = value
    attributes["requestid"] = req["id"]
    attributes["modelversion"] = model_version
    if revision:
        attributes["revision"] = revision
    return Event(attributes, data)
