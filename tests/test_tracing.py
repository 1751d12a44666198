"""Traces: settings from the OpenTelemetry variables, the waterfall, and a real function process
exporting its spans over OTLP/HTTP to a receiver that decodes them with opentelemetry-proto."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from shared import tracing
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)


def test_settings_follow_the_opentelemetry_variables() -> None:
    assert not tracing.TraceSettings.from_env({}).enabled
    on = tracing.TraceSettings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    )
    assert on.enabled and on.otlp_endpoint == "http://c:4318" and on.ratio == 0.5 and on.trace_dir is None
    assert tracing.TraceSettings.from_env({tracing.TRACE_DIR_ENV: "/x"}).ratio == tracing.DEFAULT_RATIO
    off = tracing.TraceSettings.from_env({"OTEL_SDK_DISABLED": "true", tracing.TRACE_DIR_ENV: "/x"})
    assert not off.enabled
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG must be a number"):
        tracing.TraceSettings.from_env({"OTEL_TRACES_SAMPLER_ARG": "ten percent"})


def test_the_waterfall_nests_each_span_under_its_parent() -> None:
    def span(name: str, span_id: str, parent: str | None, start: int, end: int) -> dict[str, Any]:
        return {"trace_id": "t", "span_id": span_id, "parent_id": parent, "name": name, "service": "s",
                "start_ns": start, "end_ns": end, "error": ""}  # fmt: skip

    spans = [span("ingress", "a", "remote", 0, 10), span("function", "b", "a", 2, 9), span("inference", "c", "b", 3, 8)]
    lines = tracing.waterfall(spans, width=10).splitlines()
    assert [line.split(" [")[0] for line in lines] == ["ingress", "  function", "    inference"]
    assert lines[0].rstrip().endswith("0.00 ms") and "##########" in lines[0]


class _Receiver(BaseHTTPRequestHandler):
    requests: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            type(self).requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []
    handler = type("Receiver", (_Receiver,), {"requests": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()


def _spans(received: list[bytes]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for body in list(received):
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
    return spans


def test_a_function_exports_its_spans_over_otlp_for_sampled_traces_only(
    model_dir: Path, otlp_receiver: tuple[str, list[bytes]]
) -> None:
    """Three events in one batched request: the two whose traceparent is sampled get a function
    span (preprocess, queue, inference, postprocess under it) whose parent is their traceparent, and
    their results carry that span on; the unsampled one is answered and exported nowhere."""
    from functions.digits.build import held_out_split

    endpoint, received = otlp_receiver
    images, _ = held_out_split()
    traces = [(os.urandom(16).hex(), os.urandom(8).hex(), flag) for flag in ("01", "01", "00")]
    batch = [
        {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "/tests", "type": "dev.onnxfn.digits.request",
         "traceparent": f"00-{t}-{p}-{flag}", "data": {"image": [int(v) for v in images[i].reshape(-1)]}}
        for i, (t, p, flag) in enumerate(traces)
    ]  # fmt: skip
    env = {
        "ONNXFN_MODEL_DIR": str(model_dir),
        "ONNXFN_WORKERS": "1",
        "K_REVISION": "digits-v1-traced",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with FunctionProcess("digits", env=env) as server:
        server.wait_ready()
        reply = requests.post(
            server.url, data=json.dumps(batch), headers={"Content-Type": "application/cloudevents-batch+json"}
        )
        assert reply.status_code == 200, reply.text
        results = reply.json()
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and len({s.trace_id.hex() for s in _spans(received)} & {t for t, _, _ in traces}) < 2
        ):
            time.sleep(0.05)
    spans = _spans(received)
    by_trace: dict[str, list[Any]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id.hex(), []).append(span)
    assert traces[2][0] not in by_trace  # not sampled: nothing exported
    for (trace_id, parent, flag), result in zip(traces, results, strict=True):
        carried = result["traceparent"].split("-")
        assert carried[1] == trace_id and carried[3] == flag  # the same trace, the same decision
        if flag == "00":
            continue
        group = {s.name: s for s in by_trace[trace_id]}
        function = group["function digits"]
        assert function.parent_span_id.hex() == parent
        assert carried[2] == function.span_id.hex()  # the result's parent is the function's span
        for child in ("preprocess", "queue", "inference", "postprocess"):
            assert group[child].parent_span_id == function.span_id, child
            assert function.start_time_unix_nano <= group[child].start_time_unix_nano
            assert group[child].end_time_unix_nano <= function.end_time_unix_nano + 1000
        rows = {a.key: a.value.int_value for a in group["inference"].attributes}["onnxfn.batch.rows"]
        assert rows == 3  # the three events ran as one batch
