"""Unit tests without a broker: Kafka binding, filters, delivery spec, offsets, YAML loading errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from shared.eventing import spec
from shared.eventing.delivery import Outcome, dead_letter_event, retry_after_s, split_batch_reply
from shared.eventing.filters import FilterError, compile_trigger_filter
from shared.eventing.kafka_binding import binary_attributes, from_record, to_record, wrap_record
from shared.eventing.offsets import OffsetTracker
from shared.events import ERROR_EVENT_TYPE, Event, encode_http, new_event, result_event

REPO = Path(__file__).resolve().parents[2]


def test_binary_record_round_trip_keeps_partitionkey_as_key() -> None:
    event = new_event("t.request", "/src", {"image": [1, 2]}, {"partitionkey": "k1", "sequence": 7})
    key, value, headers = to_record(event)
    assert key == b"k1"
    names = dict(headers)
    assert names["ce_type"] == b"t.request" and names["content-type"] == b"application/json"
    assert "ce_datacontenttype" not in names
    back = from_record(headers, value)
    assert back.attributes["partitionkey"] == "k1" and back.data == {"image": [1, 2]}
    assert back.attributes["sequence"] == "7"


def test_structured_record_round_trip() -> None:
    event = new_event("t.request", "/src", {"a": 1})
    key, value, headers = to_record(event, "structured")
    assert key is None and dict(headers)["content-type"].startswith(b"application/cloudevents+json")
    back = from_record(headers, value)
    assert back.id == event.id and back.data == {"a": 1}


def test_binary_bytes_data_round_trip() -> None:
    event = Event(
        {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "datacontenttype": "image/png"}, b"\x89PNG"
    )
    _, value, headers = to_record(event)
    assert from_record(headers, value).data == b"\x89PNG"


@pytest.mark.parametrize(
    ("headers", "value", "message"),
    [
        ([], b"plain", "no ce_ headers"),
        ([("ce_id", b"1"), ("ce_source", b"/s"), ("ce_specversion", b"1.0")], b"", "missing required attribute 'type'"),
        ([("content-type", b"application/cloudevents+json")], b"{nope", "not valid JSON"),
    ],
)
def test_invalid_records_are_rejected_clearly(headers: list, value: bytes, message: str) -> None:
    with pytest.raises(Exception, match=message):
        from_record(headers, value)


def test_plain_record_becomes_knative_kafka_event() -> None:
    event = wrap_record(
        topic="in", partition=2, offset=41, timestamp_ms=1_700_000_000_123, key=b"user-7",
        headers=[("content-type", b"Application/JSON"), ("X-Trace_Id", b"abc")], value=b'{"v": 1}',
        namespace="default", source_name="onnxfn-input",
    )  # fmt: skip
    a = event.attributes
    assert a["id"] == "partition:2/offset:41" and a["type"] == "dev.knative.kafka.event"
    assert a["source"] == "/apis/v1/namespaces/default/kafkasources/onnxfn-input#in"
    assert a["subject"] == "partition:2#41" and a["time"] == "2023-11-14T22:13:20.123Z"
    assert a["key"] == a["partitionkey"] == "user-7" and a["kafkaheaderxtraceid"] == "abc"
    assert a["datacontenttype"] == "application/json" and event.data == {"v": 1}


def _match(filter_spec: object, filters: object, attributes: dict[str, str]) -> bool:
    return compile_trigger_filter(filter_spec, filters, "spec").match(attributes)


def test_filter_dialects() -> None:
    a = {"type": "dev.onnxfn.digits.request", "source": "/cam/edge", "model": "resnet"}
    assert _match({"attributes": {"type": "dev.onnxfn.digits.request", "source": ""}}, None, a)
    assert not _match({"attributes": {"type": "other"}}, None, a)
    assert _match(None, [{"exact": {"model": "resnet"}}], a)
    assert _match(None, [{"prefix": {"type": "dev.onnxfn."}}, {"suffix": {"source": "/edge"}}], a)
    assert not _match(None, [{"prefix": {"type": "dev.x."}}], a)
    assert _match(None, [{"any": [{"exact": {"model": "vit"}}, {"exact": {"model": "resnet"}}]}], a)
    assert _match(None, [{"all": [{"exact": {"model": "resnet"}}, {"not": {"exact": {"model": "vit"}}}]}], a)
    assert not _match(None, [{"not": {"prefix": {"source": "/cam"}}}], a)
    assert not _match(None, [{"exact": {"missing": "x"}}], a)
    with pytest.raises(FilterError, match="multiple dialects"):
        compile_trigger_filter(None, [{"exact": {"a": "b"}, "prefix": {"a": "b"}}], "spec")
    with pytest.raises(FilterError, match="CESQL"):
        compile_trigger_filter(None, [{"cesql": "type = 'x'"}], "spec")


def test_backoff_and_retry_after() -> None:
    exp = spec.Delivery(retry=3, backoff_policy="exponential", backoff_delay_s=0.2)
    lin = spec.Delivery(retry=3, backoff_policy="linear", backoff_delay_s=0.2)
    assert [exp.delay_s(n) for n in (1, 2, 3)] == pytest.approx([0.4, 0.8, 1.6])
    assert [lin.delay_s(n) for n in (1, 2, 3)] == pytest.approx([0.2, 0.4, 0.6])
    assert spec.Delivery(retry=1).delay_s(1) == pytest.approx(2.0)  # 1 s default delay
    assert spec.parse_duration("PT1M30.5S", "x") == 90.5 and spec.parse_duration("P1D", "x") == 86400
    with pytest.raises(spec.SpecError):
        spec.parse_duration("5s", "x")
    assert retry_after_s("3") == 3.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_dead_letter_extensions_truncate_and_encode() -> None:
    event = new_event("t", "/s", {"x": 1})
    outcome = Outcome(False, 400, body=b"e" * 2000, headers={"kne-reason": "bad-input"})
    failed = dead_letter_event(event, "http://fn/", outcome)
    assert failed.attributes["knativeerrordest"] == "http://fn/" and failed.attributes["knativeerrorcode"] == "400"
    assert base64.b64decode(failed.attributes["knativeerrordata"]) == b"e" * 1024
    assert failed.attributes["reason"] == "bad-input" and failed.id == event.id


def test_offsets_commit_only_contiguous_finished_records() -> None:
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.add(("t", 0), offset)
    tracker.finish(("t", 0), 7)
    assert tracker.commit_points() == {}
    tracker.finish(("t", 0), 5)
    assert tracker.commit_points() == {("t", 0): 6}
    tracker.finish(("t", 0), 6)
    assert tracker.commit_points() == {("t", 0): 8} and tracker.in_flight == 0


def test_offsets_of_records_passed_at_once_wait_for_the_ones_before() -> None:
    tracker = OffsetTracker()
    tracker.passed(("t", 0), 3)  # nothing before it in flight: committable at once
    assert tracker.commit_points() == {("t", 0): 4}
    tracker.add(("t", 0), 4)
    tracker.passed(("t", 0), 5)
    assert tracker.commit_points() == {}  # 4 is not final yet
    tracker.finish(("t", 0), 4)
    assert tracker.commit_points() == {("t", 0): 6} and tracker.in_flight == 0


def test_binary_attributes_are_what_a_full_decode_gives_or_none() -> None:
    event = new_event("dev.x", "/s", {"a": 1}, {"partitionkey": "k"})
    _, value, headers = to_record(event)
    assert binary_attributes(headers) == from_record(headers, value).attributes
    _, _, structured = to_record(event, "structured")
    assert binary_attributes(structured) is None  # attributes are in the value: a full decode
    assert binary_attributes([("other", b"x")]) is None and binary_attributes(None) is None
    assert binary_attributes([("ce_type", b"\xff")]) is None


def test_repository_eventing_yaml_loads() -> None:
    loaded = spec.load(REPO / "eventing", REPO / "knative", services=("digits", "embed", "postprocess"))
    assert loaded.brokers["default/default"].topic == "knative-broker-default-default"
    assert {t.name for t in loaded.triggers} >= {"digits", "embed", "postprocess", "digits-results"}
    assert loaded.functions() == ["digits", "embed", "postprocess"]


BROKER = """
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: default, annotations: {eventing.knative.dev/broker.class: Kafka}}
---
"""


def _trigger(body: str) -> str:
    return BROKER + f"apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: t1}}\nspec:\n{body}"


SVC = "  subscriber: {ref: {apiVersion: serving.knative.dev/v1, kind: Service, name: fn}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_trigger("  broker: default\n  filterz: {}\n" + SVC), "unknown field.*filterz"),
        (_trigger("  broker: default\n  filter: {attributes: {type: a}}\n"), "missing required field.*subscriber"),
        (
            _trigger("  filter: {attributes: {type: a}}\n  subscriber: {ref: {kind: Service, name: nope}}\n"),
            "subscriber Service 'nope' does not exist",
        ),
        (_trigger("  broker: other\n  filter: {attributes: {type: a}}\n" + SVC), "Broker default/other is not defined"),
        (_trigger("  filter: {attributes: {type: fn.result}}\n" + SVC), "loop: fn answers fn.result"),
        (_trigger("  filters: [{prefix: {type: fn.}}]\n" + SVC), "loop"),
        (_trigger("  filters: [{exact: {type: a}, suffix: {type: b}}]\n" + SVC), "multiple dialects"),
        (_trigger("  delivery: {backoffDelay: 1s}\n  filter: {attributes: {type: a}}\n" + SVC), "ISO-8601"),
        ("kind: Broker\n  bad: [", "not valid YAML"),
        (
            _trigger("  filter: {attributes: {type: a}}\n" + SVC).replace(
                "metadata: {name: t1}", "metadata: {name: t1, annotations: {onnxfn.dev/delivery.batch: many}}"
            ),
            "whole number of events",
        ),
        (
            _trigger("  filter: {attributes: {type: a}}\n" + SVC).replace(
                "metadata: {name: t1}",
                "metadata: {name: t1, annotations: {onnxfn.dev/delivery.batch: '8', "
                "kafka.eventing.knative.dev/delivery.order: ordered}}",
            ),
            "needs an unordered trigger",
        ),
        (BROKER + "apiVersion: x/v1\nkind: Frobnicator\nmetadata: {name: f}\n", "unsupported kind"),
    ],
)
def test_invalid_yaml_is_rejected_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.setattr(spec, "_result_types", lambda fn: (f"{fn}.result",))
    (tmp_path / "e.yaml").write_text(text)
    with pytest.raises(spec.SpecError, match=message):
        spec.load(tmp_path, services=("fn",))


def test_loop_through_two_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _trigger("  filter: {attributes: {type: a.request}}\n  subscriber: {ref: {kind: Service, name: a}}\n")
    text += "\n---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {name: t2}\nspec:\n"
    text += "  filter: {attributes: {type: a.result}}\n  subscriber: {ref: {kind: Service, name: b}}\n"
    (tmp_path / "e.yaml").write_text(text)
    results = {"a": ("a.result",), "b": ("a.request",)}
    monkeypatch.setattr(spec, "_result_types", lambda fn: results[fn])
    with pytest.raises(spec.SpecError, match=r"loop: .*a answers a\.result.*b answers a\.request"):
        spec.load(tmp_path, services=("a", "b"))


def test_a_batched_reply_is_split_into_one_outcome_per_event() -> None:
    requests = [new_event("t.request", "/s", {"i": i}) for i in range(4)]
    ok0 = result_event(requests[0], "t.result", "/functions/f", {"v": 0}, "1", "f-v1")
    bad = result_event(requests[1], ERROR_EVENT_TYPE, "/functions/f", {"status": 400, "message": "no image"}, "1", "r")
    ok3 = result_event(requests[3], "t.result", "/functions/f", {"v": 3}, "1", "f-v1")
    headers, body = encode_http("batch", [ok3, bad, ok0])  # any order: matched by requestid
    whole = split_batch_reply(requests, 200, {k.lower(): v for k, v in headers.items()}, body)
    assert whole.ok and whole.each is not None
    first, second, third, fourth = whole.each
    assert first.ok and first.reply is not None and first.reply.data == {"v": 0}
    assert not second.ok and second.status == 400 and b"no image" in second.body
    assert not third.ok and "no reply" in third.error  # the subscriber lost it: a failure, never a silent skip
    assert fourth.ok and fourth.reply is not None and fourth.reply.data == {"v": 3}


def test_a_failed_batched_request_fails_as_a_whole() -> None:
    requests = [new_event("t.request", "/s", {})]
    busy = split_batch_reply(requests, 503, {"retry-after": "1"}, b"busy")
    assert not busy.ok and busy.status == 503 and busy.each is None
    headers, body = encode_http("binary", [result_event(requests[0], "t.result", "/f", {}, "1", "r")])
    single = split_batch_reply(requests, 200, {k.lower(): v for k, v in headers.items()}, body)
    assert not single.ok and "no batched reply" in single.error


def test_a_triggers_zero_retry_is_not_replaced_by_the_brokers(tmp_path: Path) -> None:
    from eventing_helpers import spec_yaml, trigger_yaml, write_spec

    zero = trigger_yaml("zero", "  filter: {attributes: {type: t}}", "http://127.0.0.1:1/", delivery="    retry: 0")
    unset = trigger_yaml("unset", "  filter: {attributes: {type: t}}", "http://127.0.0.1:1/")
    loaded = spec.load(write_spec(tmp_path / "ev", spec_yaml("ns", [zero, unset])), services=())
    retries = {t.name: t.delivery.retry for t in loaded.triggers}
    assert retries == {"zero": 0, "unset": 3}  # the Broker's retry: 3 only where the Trigger sets none
    assert spec.Delivery(retry=0, backoff_delay_s=0.0).merged_over(spec.Delivery(retry=5, backoff_delay_s=2.0)) == (
        spec.Delivery(retry=0, backoff_delay_s=0.0)
    )


def test_every_wrong_field_of_a_document_is_named_at_once(tmp_path: Path) -> None:
    body = "  subscriber: {uri: http://x/}\n  delivery: {retry: -1, backoffPolicy: wild, timeout: 5s, colour: red}\n"
    (tmp_path / "e.yaml").write_text(_trigger(body))
    with pytest.raises(spec.SpecError) as caught:
        spec.load(tmp_path, services=())
    message = str(caught.value)
    assert message.startswith("e.yaml: Trigger/t1: ")
    for part in (
        "spec.delivery.retry: Input should be greater than or equal to 0",
        "spec.delivery.backoffPolicy: Input should be 'linear' or 'exponential'",
        "spec.delivery.timeout: '5s' is not an ISO-8601 duration",
        "spec.delivery: unknown field(s) colour",
    ):
        assert part in message
