"""The whole pipeline: the repository's eventing YAML with the real functions, and the event plane
killed mid-stream and restarted (as its own process) without losing an event."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from eventing_helpers import (
    Subscriber,
    collect,
    ids_of,
    produce,
    reply_with,
    request,
    spec_yaml,
    trigger_yaml,
)

from shared.eventing import spec
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.plane import MAX_PENDING, EventPlane
from shared.events import Event
from shared.process import FunctionProcess, start_functions

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def _digits_images(count: int) -> list[tuple[list[int], int]]:
    try:
        from functions.digits.build import held_out_split

        images, labels = held_out_split()
        return [(images[i].reshape(-1).astype(int).tolist(), int(labels[i])) for i in range(count)]
    except ImportError:
        from functions.digits.func import EXAMPLE_IMAGE

        return [([v for row in EXAMPLE_IMAGE for v in row], 2)]


@pytest.fixture(scope="module")
def functions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FunctionProcess]]:
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    processes = start_functions(["digits", "postprocess"], tmp_path_factory.mktemp("fn-logs"), timeout_s=120)
    yield processes
    for process in processes.values():
        process.stop()


def test_input_topic_to_result_topics_with_the_real_functions(
    kafka: KafkaConfig, functions: dict[str, FunctionProcess]
) -> None:
    """The repository's eventing/ as is; `embed` is a stand-in subscriber (no sentences sent here)."""
    stand_in = Subscriber(reply_with("dev.onnxfn.embed.result")).start()
    loaded = spec.load(ROOT / "eventing", services=("digits", "embed", "postprocess"))
    urls = {"digits": functions["digits"].url, "postprocess": functions["postprocess"].url, "embed": stand_in.url}
    plane = EventPlane(loaded, kafka, urls)
    plane.start()
    try:
        known = _digits_images(40)
        events = [
            request("dev.onnxfn.digits.request", {"image": image}, key=f"img-{i}", expected=str(label))
            for i, (image, label) in enumerate(known)
        ]
        poison = request("dev.onnxfn.digits.request", {"image": [1] * 65})
        produce(kafka, "onnxfn.input", [*events, poison])
        want = {e.id for e in events}
        topics = ["onnxfn.digits.results", "onnxfn.digits.decisions", "onnxfn.dead-letter"]

        def done(seen: dict[str, list[Event]]) -> bool:
            results = seen["onnxfn.digits.results"]
            return (
                want <= ids_of(results, "requestid")
                and ids_of(results) <= ids_of(seen["onnxfn.digits.decisions"], "requestid")
                and poison.id in ids_of(seen["onnxfn.dead-letter"])
            )

        seen = collect(kafka, topics, done, timeout_s=60)
        results = {e.get("requestid"): e for e in seen["onnxfn.digits.results"]}
        assert want <= set(results)
        correct = sum(results[e.id].data["label"] == int(e.get("expected")) for e in events)
        assert correct / len(events) >= 0.9
        assert results[events[0].id].data["label"] == known[0][1]
        assert all(len(r.data["probabilities"]) == 10 for r in results.values())
        decisions = seen["onnxfn.digits.decisions"]
        assert ids_of(seen["onnxfn.digits.results"]) <= ids_of(decisions, "requestid")
        assert {d.type for d in decisions} <= {"dev.onnxfn.digits.accepted", "dev.onnxfn.digits.review"}
        dead = {e.id: e for e in seen["onnxfn.dead-letter"]}
        assert dead[poison.id].attributes["knativeerrorcode"] == "400"
        assert dead[poison.id].attributes["knativeerrordest"] == functions["digits"].url
        assert b"65" in base64.b64decode(dead[poison.id].attributes["knativeerrordata"])
    finally:
        plane.stop()
        stand_in.stop()


def _start_plane(directory: Path, kafka: KafkaConfig) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "shared.cli", "up", "--eventing", str(directory), "--knative", str(directory)]
    command += ["--bootstrap-servers", kafka.bootstrap_servers, "--no-functions", "--samples", "0", "--quiet"]
    command += ["--ingress-port", "0"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    ready = threading.Event()

    def watch() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == "READY":
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(30):
        process.kill()
        raise AssertionError("the event plane did not get ready")
    return process


@pytest.mark.fault
def test_plane_killed_mid_stream_and_restarted_loses_nothing(kafka: KafkaConfig, ns: str, tmp_path: Path) -> None:
    received = threading.Semaphore(0)
    ok = reply_with("t.result")

    def slow(event: Event, attempt: int) -> Any:
        received.release()
        time.sleep(0.004)
        return ok(event, attempt)

    sub = Subscriber(slow).start()
    text = spec_yaml(
        ns,
        [
            trigger_yaml("fn", "  filter: {attributes: {type: t.request}}", sub.url),
            trigger_yaml("res", "  filter: {attributes: {type: t.result}}", "sink:results"),
        ],
    )
    (tmp_path / "eventing.yaml").write_text(text)
    first = _start_plane(tmp_path, kafka)
    try:
        events = [request("t.request", {"i": i}, key=str(i % 8)) for i in range(4000)]
        produce(kafka, f"{ns}.input", events)
        deadline = time.monotonic() + 30
        count = 0
        while count < 2500 and time.monotonic() < deadline:
            count += received.acquire(timeout=0.5)
        assert count >= 2500
        before_kill = len(sub.ids())
        os.killpg(first.pid, signal.SIGKILL)  # mid-stream, no clean shutdown
        first.wait(10)
        assert len(set(sub.ids())) < 4000, "the plane finished before it was killed"
        second = _start_plane(tmp_path, kafka)
        try:
            want = {e.id for e in events}
            seen = collect(
                kafka, [f"{ns}.results", f"{ns}.dlq"], lambda s: want <= ids_of(s[f"{ns}.results"], "requestid"), 60
            )
            assert want <= ids_of(seen[f"{ns}.results"], "requestid")
            delivered = sub.ids()
            again = len(delivered) - len(set(delivered))
            print(f"plane SIGKILL after {before_kill} deliveries: {again} delivered again")
            # Only what the killed plane had delivered and not yet committed is delivered again: at
            # most its in-flight window (MAX_PENDING per group), below the deliveries made before
            # the kill (a restart from the start would repeat them all).
            assert again <= MAX_PENDING < before_kill
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
        sub.stop()


@pytest.mark.fault
def test_function_killed_and_frozen_mid_stream_delivers_each_event_once(kafka: KafkaConfig, tmp_path: Path) -> None:
    """A digits worker SIGKILLed and then the whole function SIGSTOPped for 2 s while events flow:
    the failed deliveries are retried, every event gets exactly one result, none is dead-lettered."""
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    processes = start_functions(["digits", "postprocess"], tmp_path / "logs", timeout_s=120)
    stand_in = Subscriber(reply_with("dev.onnxfn.embed.result")).start()
    loaded = spec.load(ROOT / "eventing", services=("digits", "embed", "postprocess"))
    urls = {"digits": processes["digits"].url, "postprocess": processes["postprocess"].url, "embed": stand_in.url}
    plane = EventPlane(loaded, kafka, urls)
    plane.start()
    digits = processes["digits"]
    try:
        images = _digits_images(20)
        events = [
            request("dev.onnxfn.digits.request", {"image": images[i % len(images)][0]}, key=f"k{i}") for i in range(300)
        ]
        faults_done = threading.Event()

        def faults() -> None:
            time.sleep(1.0)  # the stream is flowing (a paced producer, 100 events/s)
            os.kill(digits.worker_pids()[0], signal.SIGKILL)  # gunicorn starts another worker
            time.sleep(0.5)
            os.killpg(digits.proc.pid, signal.SIGSTOP)  # master and workers frozen
            time.sleep(2.0)
            os.killpg(digits.proc.pid, signal.SIGCONT)
            faults_done.set()

        injector = threading.Thread(target=faults)
        injector.start()
        for i in range(0, len(events), 10):
            produce(kafka, "onnxfn.input", events[i : i + 10])
            time.sleep(0.1)
        injector.join()
        assert faults_done.is_set()
        want = {e.id for e in events}
        topics = ["onnxfn.digits.results", "onnxfn.dead-letter"]
        seen = collect(kafka, topics, lambda s: want <= ids_of(s["onnxfn.digits.results"], "requestid"), 90)
        results = [e.get("requestid") for e in seen["onnxfn.digits.results"] if e.get("requestid") in want]
        assert set(results) == want
        assert len(results) == len(want), f"{len(results) - len(want)} duplicate results"
        assert not want & ids_of(seen["onnxfn.dead-letter"])
    finally:
        plane.stop()
        stand_in.stop()
        for process in processes.values():
            process.stop()


@pytest.mark.fault
def test_an_overloaded_function_is_retried_after_429_and_nothing_is_dead_lettered(
    plane: Callable[[str], EventPlane], kafka: KafkaConfig, ns: str, tmp_path: Path
) -> None:
    """The real digits function with a queue of one under the plane's 50 concurrent deliveries:
    it answers 429 with Retry-After, the plane retries after it, every event gets one result and
    none goes to the dead-letter topic."""
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    env = {"ONNXFN_QUEUE_CAPACITY": "1", "ONNXFN_MAX_BATCH_SIZE": "1"}
    with FunctionProcess("digits", env=env, log=tmp_path / "digits.log") as digits:
        digits.wait_ready(120)
        delivery = "retry: 10\n    backoffPolicy: exponential\n    backoffDelay: PT0.05S\n    timeout: PT10S"
        triggers = [
            trigger_yaml("fn", "  filter: {attributes: {type: dev.onnxfn.digits.request}}", digits.url + "/"),
            trigger_yaml("res", "  filter: {attributes: {type: dev.onnxfn.digits.result}}", "sink:results"),
        ]
        plane(spec_yaml(ns, triggers, delivery=delivery))
        images = _digits_images(20)
        events = [
            request("dev.onnxfn.digits.request", {"image": images[i % len(images)][0]}, key=f"k{i}") for i in range(400)
        ]
        produce(kafka, f"{ns}.input", events)
        want = {e.id for e in events}
        topics = [f"{ns}.results", f"{ns}.dlq"]
        seen = collect(kafka, topics, lambda s: want <= ids_of(s[f"{ns}.results"], "requestid"), 120)
        results = [e.get("requestid") for e in seen[f"{ns}.results"]]
        assert set(results) == want and len(results) == len(want)
        assert seen[f"{ns}.dlq"] == []
        metrics = requests.get(digits.url + "/metrics", timeout=5).text
        refused = [
            line for line in metrics.splitlines() if line.startswith("onnxfn_requests_total") and 'status="429"' in line
        ]
        assert refused and float(refused[0].rsplit(" ", 1)[1]) > 0, "the function was never overloaded"
