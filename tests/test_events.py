"""The CloudEvents edge, checked against the reference SDK (cloudevents 2.x) in both directions."""

from __future__ import annotations

import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent

from shared.errors import InvalidEvent
from shared.events import (
    Event,
    decode_http,
    detect_mode,
    encode_header_value,
    encode_http,
    new_event,
    result_event,
)


def sdk_event(**extra: object) -> CloudEvent:
    attributes = {"type": "t.req", "source": "/src", "datacontenttype": "application/json", **extra}
    return CloudEvent(attributes, {"x": [1, 2], "s": "é"})


def test_decodes_sdk_binary_with_percent_encoded_values() -> None:
    message = ce_http.to_binary_event(sdk_event(subject='a "b" 100% ü', partitionkey="k"))
    mode, [event] = decode_http(message.headers, message.body)
    assert mode == "binary"
    assert event.get("subject") == 'a "b" 100% ü'
    assert event.get("partitionkey") == "k"
    assert event.data == {"x": [1, 2], "s": "é"}


def test_decodes_sdk_structured() -> None:
    message = ce_http.to_structured_event(sdk_event(subject="s"))
    mode, [event] = decode_http(message.headers, message.body)
    assert mode == "structured"
    assert event.type == "t.req" and event.get("subject") == "s"
    assert event.data == {"x": [1, 2], "s": "é"}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_reads_what_we_encode(mode: str) -> None:
    request = Event({"specversion": "1.0", "id": "r1", "source": "/s", "type": "t", "subject": "sp ace"}, {})
    reply = result_event(request, "t.result", "/functions/f", {"v": 1.5}, "3", "f-v3")
    headers, body = encode_http(mode, [reply])
    decoded = ce_http.from_http_event(ce_http.HTTPMessage(headers, body))
    assert decoded.get_type() == "t.result"
    assert decoded.get_subject() == "sp ace"
    assert decoded.get_extension("requestid") == "r1"
    assert decoded.get_extension("modelversion") == "3"
    assert decoded.get_data() == {"v": 1.5}


def test_binary_data_round_trips_as_base64_in_structured_mode() -> None:
    event = new_event("t", "/s", None)
    event.attributes["datacontenttype"] = "application/octet-stream"
    event.data = b"\x00\xff"
    headers, body = encode_http("batch", [event])
    _, [back] = decode_http(headers, body)
    assert back.data == b"\x00\xff"


def test_mode_detection_follows_content_type() -> None:
    assert detect_mode("application/cloudevents+json; charset=utf-8") == "structured"
    assert detect_mode("application/cloudevents-batch+json") == "batch"
    assert detect_mode("application/json") == "binary"
    assert detect_mode(None) == "binary"


def test_every_attribute_problem_is_reported() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_http({"ce-specversion": "0.3", "ce-bad_name": "x", "content-type": "application/json"}, b"{}")
    details = info.value.details
    assert any("'id'" in d for d in details) and any("'source'" in d for d in details)
    assert any("specversion" in d for d in details)


def test_header_values_are_percent_encoded() -> None:
    assert encode_header_value("plain-value/1") == "plain-value/1"
    assert encode_header_value('a b"%') == "a%20b%22%25"
    assert encode_header_value("ü") == "%C3%BC"


def test_result_event_extension_names_are_valid() -> None:
    request = Event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "traceparent": "00-x"}, None)
    reply = result_event(request, "r", "/functions/f", None, "1", "rev")
    assert reply.get("traceparent") == "00-x"
    for name in reply.attributes:
        assert name.isalnum() and name.islower() and len(name) <= 20
    with pytest.raises(ValueError, match="invalid extension name"):
        new_event("t", "/s", None, {"Not-Valid": "x"})
