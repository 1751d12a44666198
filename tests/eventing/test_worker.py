"""`onnxfn worker digits`: the real function consuming the broker topic with no HTTP hop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from eventing_helpers import collect, ids_of, produce, request, spec_yaml
from test_pipeline import MODELS, ROOT, _digits_images
from test_up import Output, start_up, stop_up

from shared.eventing.broker_process import KafkaConfig, ensure_topics
from shared.eventing.worker import MAX_IN_FLIGHT
from shared.events import ERROR_EVENT_TYPE

SERVICE_REF = "    ref: {apiVersion: serving.knative.dev/v1, kind: Service, name: digits, namespace: $NS}"


@contextlib.contextmanager
def _digits_worker(kafka: KafkaConfig, eventing: Path, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """`onnxfn worker digits` on `eventing`, killed on the way out if the test did not stop it."""
    argv = [sys.executable, "-m", "shared.cli", "worker", "digits", "--eventing", str(eventing)]
    argv += ["--bootstrap-servers", kafka.bootstrap_servers, "--host", "127.0.0.1", "--port", "0"]
    worker = subprocess.Popen(argv, cwd=ROOT, text=True, **popen)
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


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
    env = {**os.environ, "ONNXFN_KAFKA_SESSION_TIMEOUT_MS": "2000", "ONNXFN_KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
    # As the image sets it for `onnxfn serve` (a folder nobody made yet): the worker must not need it.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "onnxfn-metrics")
    with _digits_worker(kafka, tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as worker:
        base = _health_url(worker)
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


def _health_url(worker: subprocess.Popen[str]) -> str:
    """The worker's health and metrics URL, from the line it prints once that server listens."""
    assert worker.stdout is not None
    lines = []
    for line in worker.stdout:  # librdkafka's warnings about the test's consumer settings may come first
        lines.append(line)
        if found := re.search(r"health and metrics on (http://127\.0\.0\.1:\d+/)", line):
            return found.group(1)
        assert len(lines) < 50, "".join(lines)
    raise AssertionError("".join(lines))


def test_a_worker_asked_for_a_gpu_it_has_not_got_is_alive_but_not_ready_with_the_reason(
    kafka: KafkaConfig, ns: str, tmp_path: Path
) -> None:
    """A worker Deployment on a node without a usable GPU (ONNXFN_PROVIDERS=cuda, the gpu image's
    default) must not take the Trigger's records at CPU speed: readiness 503 says why, as a
    Service's does, liveness stays 200, and SIGTERM still ends it cleanly."""
    from shared.model import gpu_visible

    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    if gpu_visible():
        pytest.skip("a GPU is visible here")
    (tmp_path / "eventing.yaml").write_text(
        spec_yaml(ns, [_trigger("digits", "dev.onnxfn.digits.request", SERVICE_REF)])
    )
    ensure_topics(kafka, {f"knative-broker-{ns}-default": (1, 1)})
    env = {**os.environ, "ONNXFN_PROVIDERS": "cuda"}
    with _digits_worker(kafka, tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as worker:
        base = _health_url(worker)
        deadline = time.monotonic() + 30
        while "GpuUnavailable" not in (state := requests.get(base + "health/readiness", timeout=5)).text:
            assert state.status_code == 503 and "loading" in state.json()["reason"], state.text
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state.status_code == 503 and state.json()["ready"] is False
        assert "model failed to load: GpuUnavailable: ONNXFN_PROVIDERS=cuda" in state.json()["reason"]
        assert requests.get(base + "health/liveness", timeout=5).status_code == 200
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_worker_without_a_dead_letter_sink_writes_an_error_event(kafka: KafkaConfig, ns: str, tmp_path: Path) -> None:
    """No deadLetterSink: an event the function refuses becomes an error event on the broker topic
    (with the reason), never lost and never the event again."""
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    text = spec_yaml(ns, [_trigger("digits", "dev.onnxfn.digits.request", SERVICE_REF)])
    text = re.sub(r"\n    deadLetterSink:\n      ref: \{[^}]*\}", "", text)
    assert "deadLetterSink" not in text
    (tmp_path / "eventing.yaml").write_text(text)
    broker_topic = f"knative-broker-{ns}-default"
    ensure_topics(kafka, {broker_topic: (1, 1)})
    good = request("dev.onnxfn.digits.request", {"image": _digits_images(1)[0][0]})
    poison = request("dev.onnxfn.digits.request", {"image": [1, 2, 3]})
    produce(kafka, broker_topic, [poison, good])
    with _digits_worker(kafka, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as worker:

        def answered(seen: dict) -> bool:
            return {good.id, poison.id} <= ids_of(seen[broker_topic], "requestid")

        seen = collect(kafka, [broker_topic], answered, 90)
        replies = {str(e.attributes["requestid"]): e for e in seen[broker_topic] if "requestid" in e.attributes}
        assert replies[good.id].type == "dev.onnxfn.digits.result"
        error = replies[poison.id]
        assert error.type == ERROR_EVENT_TYPE and error.data["status"] == 400 and "image" in error.data["message"]
        assert [e.id for e in seen[broker_topic]].count(poison.id) == 1  # not written back as itself
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def _worker_eventing(tmp_path: Path) -> Path:
    """The repository's eventing/ with digits' Trigger run as a worker."""
    directory = tmp_path / "eventing"
    directory.mkdir()
    for path in (ROOT / "eventing").glob("*.yaml"):
        text = path.read_text()
        if path.name == "400-trigger-digits.yaml":
            text = text.replace('onnxfn.dev/delivery.batch: "32"', "onnxfn.dev/delivery: worker")
            assert "onnxfn.dev/delivery: worker" in text
        (directory / path.name).write_text(text)
    return directory


def _results_by_request(kafka: KafkaConfig, ids: set[str], timeout_s: float) -> dict[str, list[float]]:
    """requestid -> write times (s since the epoch) of the digits results on the result topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from shared.eventing.kafka_binding import from_record

    consumer = Consumer(kafka.consumer("test-reader-" + os.urandom(4).hex()))
    topic = "onnxfn.digits.results"
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    found: dict[str, list[float]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not ids <= set(found) and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    event = from_record(message.headers(), message.value())
                    found.setdefault(str(event.attributes["requestid"]), []).append(message.timestamp()[1] / 1000)
    finally:
        consumer.close()
    return found


def _produce_timed(kafka: KafkaConfig, topic: str, events: list[Any]) -> float:
    """Produce `events`; returns when (s since the epoch) Kafka acknowledged the first of them, the
    moment the burst is on the topic (the test producer's own connection and handshake not counted)."""
    from confluent_kafka import Producer

    from shared.eventing.kafka_binding import to_record

    acked: list[float] = []

    def report(err: Any, _msg: Any) -> None:
        assert err is None, err
        acked.append(time.time())

    producer = Producer(kafka.producer())
    for event in events:
        key, value, headers = to_record(event, "binary")
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
    assert producer.flush(10) == 0
    return min(acked)


def _up_with_digits_worker(tmp_path: Path, idle_s: float) -> tuple[subprocess.Popen[str], Output, KafkaConfig]:
    directory = _worker_eventing(tmp_path)
    argv = ["up", "--eventing", str(directory), "--samples", "0", "--quiet", "--ingress-port", "0"]
    argv += ["--idle-window", str(idle_s), "--state-file", str(tmp_path / "platform.json")]
    process = start_up(argv)
    out = Output(process)
    out.wait_for(r"^worker digits: Trigger/digits runs as `onnxfn worker`", 40)
    servers = out.wait_for(r"^Kafka bootstrap servers: (\S+)", 40).group(1)
    out.wait_for(r"^READY$", 40)
    return process, out, KafkaConfig(servers)


def test_up_starts_the_worker_on_lag_answers_once_and_stops_it_when_idle(tmp_path: Path) -> None:
    """At zero, a burst starts the worker; its first result comes within its cold start + 1 s;
    every event is answered once; after the idle window the worker is gone."""
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    process, out, kafka = _up_with_digits_worker(tmp_path, idle_s=3)
    try:
        images = _digits_images(20)
        events = [request("dev.onnxfn.digits.request", {"image": images[i % 20][0]}, key=f"k{i}") for i in range(300)]
        published = _produce_timed(kafka, "onnxfn.input", events)
        ready_s = float(out.wait_for(r"^worker digits: started on lag \d+, ready in (\S+) s$", 60).group(1))
        found = _results_by_request(kafka, {e.id for e in events}, 60)
        assert sorted(found) == sorted(e.id for e in events)
        assert all(len(times) == 1 for times in found.values())  # one delivery each
        first = min(t for times in found.values() for t in times) - published
        assert first <= ready_s + 1.0, f"first result {first:.2f} s after the burst; ready in {ready_s:.2f} s"
        out.wait_for(r"^worker digits: stopped \(no lag for 3 s, exit 0\)$", 30)
        assert not any(b"worker\x00digits" in c for c in _commands(process.pid))
    finally:
        assert stop_up(process) == 0


def _commands(pid: int) -> list[bytes]:
    from test_up import _descendants

    out = []
    for child in _descendants(pid):
        try:
            out.append(Path(f"/proc/{child}/cmdline").read_bytes())
        except OSError:
            continue
    return out


@pytest.mark.fault
def test_up_sees_a_killed_worker_and_starts_it_again_losing_nothing(tmp_path: Path) -> None:
    """SIGKILL the worker mid-stream: `up` reports it, starts it again from the committed offsets,
    counts the restart in its health, and every event gets its result (at least once)."""
    from test_up import _descendants, onnxfn

    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    process, out, kafka = _up_with_digits_worker(tmp_path, idle_s=600)
    try:
        images = _digits_images(20)
        events = [request("dev.onnxfn.digits.request", {"image": images[i % 20][0]}) for i in range(3000)]
        produce(kafka, "onnxfn.input", events[:1500])
        out.wait_for(r"^worker digits: started on lag", 60)
        assert len(_results_by_request(kafka, {e.id for e in events[:200]}, 60)) >= 200
        (pid,) = [
            p for p in _descendants(process.pid) if b"worker\x00digits" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        os.kill(pid, signal.SIGKILL)
        produce(kafka, "onnxfn.input", events[1500:])
        out.wait_for(r"^worker digits: exited with code -9; restart 1 of 3$", 10)
        out.wait_for(r"^worker digits: started on lag \d+", 60)
        found = _results_by_request(kafka, {e.id for e in events}, 90)
        assert sorted(found) == sorted(e.id for e in events)
        again = sum(len(times) - 1 for times in found.values())
        assert again <= MAX_IN_FLIGHT
        shown = json.loads(onnxfn("status", "--json", "--state-file", str(tmp_path / "platform.json")))
        (component,) = [c for c in shown["plane"]["components"] if c["component"] == "worker-digits"]
        assert component["state"] == "ready" and component["restarts"] == 1
    finally:
        assert stop_up(process) == 0


def test_records_fetched_while_the_model_loads_are_answered_not_skipped(
    kafka: KafkaConfig, ns: str, tmp_path: Path
) -> None:
    """A worker at zero reads every partition at once (`--assign-all`) and its model loads after:
    records already on the topic must all be answered, once. (The loop used to poll during the load
    and drop what the poll returned; the commits after the first batch then went past it.)"""
    from shared.config import Settings
    from shared.contract import load_handler
    from shared.eventing import spec
    from shared.eventing.worker import KafkaWorker, WorkerPlan
    from shared.metrics import Metrics
    from shared.pipeline import Pipeline

    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    (tmp_path / "eventing.yaml").write_text(
        spec_yaml(ns, [_trigger("digits", "dev.onnxfn.digits.request", SERVICE_REF)])
    )
    broker_topic = f"knative-broker-{ns}-default"
    ensure_topics(kafka, {broker_topic: (2, 1)})
    images = _digits_images(10)
    events = [request("dev.onnxfn.digits.request", {"image": images[i % 10][0]}, key=f"k{i}") for i in range(60)]
    produce(kafka, broker_topic, events)

    plan = WorkerPlan.of(spec.load(tmp_path, ROOT / "knative"), "digits")
    handler = load_handler("digits")
    pipeline = Pipeline(handler, Settings.from_env({"ONNXFN_WORKERS": "1"}, function="digits"), Metrics("digits"))
    worker = KafkaWorker(plan, kafka, pipeline, assign_all=True)
    checks = 0
    release = threading.Event()
    real_wait, real_load = pipeline.wait_ready, pipeline._try_load

    def counted_wait(timeout: float | None = None) -> bool:
        nonlocal checks
        if worker.assigned.is_set():
            checks += 1
            if checks >= 15:  # 15 turns of the loading loop with the partitions assigned
                release.set()
        return real_wait(timeout)

    def held_load() -> bool:
        release.wait(60)
        return real_load()

    pipeline.wait_ready = counted_wait  # type: ignore[method-assign]
    pipeline._try_load = held_load  # type: ignore[method-assign]
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        want = {e.id for e in events}
        seen = collect(kafka, [broker_topic], lambda s: want <= ids_of(s[broker_topic], "requestid"), 60)
        assert release.is_set()
        answered = [str(e.attributes["requestid"]) for e in seen[broker_topic] if e.type == "dev.onnxfn.digits.result"]
        assert sorted(answered) == sorted(want)
    finally:
        worker.stop.set()
        runner.join(30)
    assert not runner.is_alive() and worker.failed is None
