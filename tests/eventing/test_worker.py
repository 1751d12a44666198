"""`onnxfn worker digits`: the real function consuming the broker topic with no HTTP hop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from eventing_helpers import collect, ids_of, produce, request, spec_yaml
from test_pipeline import MODELS, ROOT, _digits_images

from shared.eventing.broker_process import KafkaConfig, ensure_topics

SERVICE_REF = "    ref: {apiVersion: serving.knative.dev/v1, kind: Service, name: digits, namespace: $NS}"


def _trigger(name: str, type_: str, subscriber: str) -> str:
    return (
        f"apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: {name}, namespace: $NS}}\n"
        f"spec:\n  broker: default\n  filter: {{attributes: {{type: {type_}}}}}\n  subscriber:\n{subscriber}\n"
    )


def test_worker_answers_each_event_once_dead_letters_the_invalid_and_stops_on_sigterm(
    kafka: KafkaConfig, ns: str, tmp_path: Path
) -> None:
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    (tmp_path / "eventing.yaml").write_text(
        spec_yaml(ns, [_trigger("digits", "dev.onnxfn.digits.request", SERVICE_REF)])
    )
    broker_topic = f"knative-broker-{ns}-default"
    ensure_topics(kafka, {broker_topic: (2, 1), f"{ns}.dlq": (1, 1)})
    images = _digits_images(20)
    events = [
        request("dev.onnxfn.digits.request", {"image": images[i % len(images)][0]}, key=f"k{i}") for i in range(200)
    ]
    poison = request("dev.onnxfn.digits.request", {"image": [1, 2, 3]})
    other = request("some.other.type", {"x": 1})
    produce(kafka, broker_topic, [*events[:100], poison, other, *events[100:]])
    argv = [sys.executable, "-m", "shared.cli", "worker", "digits", "--eventing", str(tmp_path)]
    argv += ["--bootstrap-servers", kafka.bootstrap_servers, "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "ONNXFN_KAFKA_SESSION_TIMEOUT_MS": "2000", "ONNXFN_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
    worker = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert worker.stdout is not None
        first = worker.stdout.readline()
        found = re.search(r"health and metrics on (http://127\.0\.0\.1:\d+/)", first)
        assert found, first
        want = {e.id for e in events}

        def done(seen: dict) -> bool:
            return want <= ids_of(seen[broker_topic], "requestid") and poison.id in ids_of(seen[f"{ns}.dlq"])

        seen = collect(kafka, [broker_topic, f"{ns}.dlq"], done, 90)
        results = [e for e in seen[broker_topic] if e.type == "dev.onnxfn.digits.result"]
        answered = [str(e.attributes["requestid"]) for e in results]
        assert sorted(answered) == sorted(want)  # each once; the filtered event got nothing
        labels = {e.attributes["requestid"]: e.data["label"] for e in results}
        assert sum(labels[e.id] == images[i % len(images)][1] for i, e in enumerate(events)) >= 190
        (dead,) = seen[f"{ns}.dlq"]
        assert dead.id == poison.id and dead.attributes["knativeerrorcode"] == "400"
        assert dead.attributes["knativeerrordest"] == "worker:digits"
        base = found.group(1)
        assert requests.get(base + "health/readiness", timeout=5).status_code == 200
        metrics = requests.get(base + "metrics", timeout=5).text
        assert 'onnxfn_worker_events_total{function="digits",outcome="result"} 200.0' in metrics
        assert 'onnxfn_worker_events_total{function="digits",outcome="dead_letter"} 1.0' in metrics
        # the other event, and the worker's own results as it reads them back on the broker topic
        filtered = re.search(r'onnxfn_worker_events_total\{function="digits",outcome="filtered"\} (\S+)', metrics)
        assert filtered and float(filtered.group(1)) >= 1
        assert "onnxfn_worker_batch_size_count" in metrics and "onnxfn_worker_lag" in metrics
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
