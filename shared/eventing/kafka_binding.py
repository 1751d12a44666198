"""The CloudEvents Kafka protocol binding: Kafka record <-> `Event`.

Binary mode: `ce_<attribute>` headers (UTF-8 strings), a `content-type` header for
`datacontenttype`, value = data. Structured mode: `content-type: application/cloudevents+json`,
value = the JSON envelope. Mode detection follows the binding: a `content-type` header starting
with `application/cloudevents` is structured, anything else binary. The record key is the
`partitionkey` extension (which stays on the event).

`wrap_record` builds the `dev.knative.kafka.event` that Knative's KafkaSource makes of a record
that is not a valid CloudEvent.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.errors import InvalidEvent
from shared.events import (
    SPECVERSION,
    STRUCTURED,
    Event,
    check_attributes,
    data_bytes,
    decode_data,
    from_structured_dict,
    is_json_content,
    to_structured_dict,
)

Headers = list[tuple[str, str | bytes | None]]
RawHeaders = Sequence[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None
KAFKA_EVENT_TYPE = "dev.knative.kafka.event"
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def record_key(event: Event) -> bytes | None:
    """The record key: the `partitionkey` extension, else none."""
    key = event.attributes.get("partitionkey")
    return None if key is None or key == "" else _text(key).encode()


def materialize(event: Event) -> Event:
    """Decode the data of a lazily read event (no-op otherwise)."""
    if event.data is None and event._raw is not None:
        content_type = event.datacontenttype
        if content_type is None or is_json_content(content_type):
            try:
                event.data, event._raw = orjson.loads(event._raw), None
            except orjson.JSONDecodeError:
                event.data = event._raw
        else:
            event.data = event._raw
    return event


def to_record(event: Event, mode: str = "binary") -> tuple[bytes | None, bytes | None, Headers]:
    """Event -> (key, value, headers) in `binary` or `structured` content mode."""
    key = record_key(event)
    if mode == "structured":
        value = orjson.dumps(to_structured_dict(materialize(event)), option=orjson.OPT_SERIALIZE_NUMPY)
        return key, value, [("content-type", f"{STRUCTURED}; charset=utf-8".encode())]
    headers: Headers = [
        ("ce_" + name, _text(value).encode())
        for name, value in event.attributes.items()
        if name != "datacontenttype" and value is not None
    ]
    content_type = event.datacontenttype
    if content_type:
        headers.append(("content-type", content_type.encode()))
    return key, data_bytes(event), headers


def _pairs(headers: RawHeaders) -> list[tuple[str, bytes | str | None]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def _header_map(headers: RawHeaders) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, value in _pairs(headers):
        if value is None:
            continue
        out[name.lower()] = value.encode() if isinstance(value, str) else value
    return out


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidEvent(f"header {what} is not UTF-8") from None


def binary_attributes(headers: RawHeaders) -> dict[str, str] | None:
    """A binary-mode record's attributes as its headers carry them (no validation), to filter it
    before decoding it; None when that takes a full decode (structured mode, no `ce_` header,
    a header that is not UTF-8)."""
    out: dict[str, str] = {}
    for name, value in _pairs(headers):
        if value is None:
            continue
        lower = name.lower()
        raw = value.encode() if isinstance(value, str) else value
        if lower.startswith("ce_"):
            target = lower[3:]
        elif lower == "content-type":
            if raw.lower().startswith(b"application/cloudevents"):
                return None
            target = "datacontenttype"
        else:
            continue
        try:
            out[target] = raw.decode()
        except UnicodeDecodeError:
            return None
    return out or None


def is_structured(headers: RawHeaders) -> bool:
    content_type = _header_map(headers).get("content-type", b"")
    return content_type.lower().startswith(b"application/cloudevents")


def from_record(headers: RawHeaders, value: bytes | None, lazy: bool = False) -> Event:
    """Kafka record -> Event (binary or structured). Raises InvalidEvent with a clear message.

    `lazy`: a binary-mode value is kept as raw bytes (`data` stays None) and decoded only when
    needed (`materialize`), so that forwarding an event never parses its data."""
    hmap = _header_map(headers)
    content_type = _decode(hmap["content-type"], "content-type") if "content-type" in hmap else None
    if content_type and content_type.lower().startswith("application/cloudevents"):
        if content_type.lower().startswith("application/cloudevents-batch"):
            raise InvalidEvent("the Kafka binding has no batched mode")
        try:
            envelope = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"structured record value is not valid JSON: {exc}") from None
        return from_structured_dict(envelope)
    attributes: dict[str, Any] = {name[3:]: _decode(raw, name) for name, raw in hmap.items() if name.startswith("ce_")}
    if not attributes:
        raise InvalidEvent("not a CloudEvent: no ce_ headers and no structured content-type")
    if content_type:
        attributes["datacontenttype"] = content_type
    check_attributes(attributes)
    body = value or b""
    if lazy and body:
        return Event(attributes, None, _raw=bytes(body))
    if content_type is None and body:
        # No datacontenttype: JSON when it parses, opaque bytes otherwise.
        try:
            return Event(attributes, orjson.loads(body))
        except orjson.JSONDecodeError:
            return Event(attributes, bytes(body), _raw=bytes(body))
    data = decode_data(body, content_type, attributes["id"])
    return Event(attributes, data, _raw=bytes(body) if body and not is_json_content(content_type) else None)


def wrap_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    headers: RawHeaders,
    value: bytes | None,
    namespace: str,
    source_name: str,
) -> Event:
    """A record that is not a CloudEvent -> `dev.knative.kafka.event`, as Knative's KafkaSource builds it."""
    attributes: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": f"partition:{partition}/offset:{offset}",
        "source": f"/apis/v1/namespaces/{namespace}/kafkasources/{source_name}#{topic}",
        "type": KAFKA_EVENT_TYPE,
        "subject": f"partition:{partition}#{offset}",
    }
    if timestamp_ms is not None and timestamp_ms > 0:
        stamp = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        attributes["time"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    content_type: str | None = None
    for name, raw in _pairs(headers):
        if raw is None:
            continue
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if name.lower() == "content-type" and not text.lower().startswith("application/cloudevents"):
            content_type = text.lower()
            attributes["datacontenttype"] = content_type
        else:
            attributes["kafkaheader" + _NOT_ALNUM.sub("", name.lower())] = text
    if key is not None:
        attributes["key"] = attributes["partitionkey"] = key.decode(errors="replace")
    body = value or b""
    data: Any = bytes(body) if body else None
    raw_body: bytes | None = data
    if body and is_json_content(content_type) and content_type:
        with contextlib.suppress(orjson.JSONDecodeError):
            data, raw_body = orjson.loads(body), None
    return Event(attributes, data, _raw=raw_body)
