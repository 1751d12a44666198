"""One event, one trace: published at the broker ingress of a real `onnxfn up`, followed across the
ingress, the Kafka writes, the triggers, the activator's cold start, the function and the sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from test_pipeline import MODELS, ROOT, _digits_images
from test_up import Output, start_up, stop_up

from shared import tracing


def _trace(directory: Path, trace_id: str, until: set[str], timeout_s: float) -> list[dict[str, Any]]:
    """The trace's spans, once spans with each name in `until` are among them (each process
    exports on its own schedule)."""
    deadline = time.monotonic() + timeout_s
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        spans = [s for s in tracing.read_spans(directory) if s["trace_id"] == trace_id]
        if until <= {s["name"] for s in spans}:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"not all of {until} in trace {trace_id} within {timeout_s} s: {[s['name'] for s in spans]}")


def test_one_event_is_one_trace_from_the_ingress_to_the_result_topic(tmp_path: Path) -> None:
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    traces = tmp_path / "traces"
    argv = ["up", "--samples", "0", "--quiet", "--ingress-port", "0", "--idle-window", "30"]
    process = start_up([*argv, "--state-file", str(tmp_path / "platform.json"), "--traces", str(traces)])
    out = Output(process)
    try:
        ingress = out.wait_for(r"^broker ingress:\s+(\S+)\s+\(topic (\S+)\)", 60)
        url, broker_topic = ingress.group(1), ingress.group(2)
        out.wait_for(r"^READY$", 60)
        trace_id, caller = os.urandom(16).hex(), os.urandom(8).hex()
        headers = {
            "ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/tests",
            "ce-type": "dev.onnxfn.digits.request", "ce-traceparent": f"00-{trace_id}-{caller}-01",
            "content-type": "application/json",
        }  # fmt: skip
        reply = requests.post(url, data=json.dumps({"image": _digits_images(1)[0][0]}), headers=headers, timeout=10)
        assert reply.status_code == 202, reply.text
        hops = {"ingress /default/default", "activator digits", "cold start", "function digits"}
        spans = _trace(traces, trace_id, {*hops, "inference", "produce onnxfn.digits.results"}, 60)

        def one(name: str, parent: dict[str, Any] | None = None) -> dict[str, Any]:
            """The span named `name` (under `parent`, when given); exactly one."""
            found = [s for s in spans if s["name"] == name and (parent is None or s["parent_id"] == parent["span_id"])]
            assert len(found) == 1, (name, [s["name"] for s in spans])
            return found[0]

        ingress_span = one("ingress /default/default")
        assert ingress_span["parent_id"] == caller and ingress_span["service"] == "onnxfn-plane"
        request_write = one(f"produce {broker_topic}", ingress_span)
        deliver = one("deliver Trigger/digits", request_write)
        activator = one("activator digits", deliver)
        cold = one("cold start", activator)  # digits was at zero
        assert cold["service"] == "onnxfn-platform"
        function = one("function digits", deliver)
        assert function["service"] == "digits"
        for stage in ("preprocess", "queue", "inference", "postprocess"):
            one(stage, function)
        reply_write = one(f"produce {broker_topic}", function)
        sink_delivery = one("deliver Trigger/digits-results", reply_write)
        one("produce onnxfn.digits.results", sink_delivery)
        # the cold start is where this event spent its time, and the waterfall says so
        assert cold["end_ns"] - cold["start_ns"] > 10 * (function["end_ns"] - function["start_ns"])
        shown = subprocess.run(
            [sys.executable, "-m", "shared.cli", "traces", "--dir", str(traces), "--trace-id", trace_id],
            capture_output=True, text=True, cwd=ROOT, timeout=30,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert f"trace {trace_id}" in shown.stdout and "      function digits [digits]" in shown.stdout
    finally:
        assert stop_up(process) == 0
