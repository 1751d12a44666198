"""Integration tests: real gunicorn processes on loopback serving real ONNX models."""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent
from metrics_helpers import scrape

from shared.bench.loadgen import run_load
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)

DIGITS = "dev.onnxfn.digits.request"
EXTENSION = re.compile(r"^[a-z0-9]{1,20}$")


@pytest.fixture(scope="module")
def known_images() -> list[tuple[list[int], int]]:
    from functions.digits.build import held_out_split

    images, labels = held_out_split()
    return [([int(v) for v in images[i].reshape(-1)], int(labels[i])) for i in range(8)]


@pytest.fixture(scope="module")
def digits(model_dir: Path) -> Iterator[FunctionProcess]:
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "2", "K_REVISION": "digits-v1-test"}
    with FunctionProcess("digits", env=env) as server:
        server.wait_ready()
        yield server


def request_event(data: Any, type_: str = DIGITS, **extra: str) -> CloudEvent:
    attributes = {"type": type_, "source": "/tests", "datacontenttype": "application/json", **extra}
    return CloudEvent(attributes, data)


def post_binary(url: str, event: CloudEvent) -> requests.Response:
    message = ce_http.to_binary_event(event)
    return requests.post(url, data=message.body, headers=message.headers, timeout=30)


def headers_of(**overrides: str) -> dict[str, str]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-source": "/tests",
        "ce-type": DIGITS,
        "Content-Type": "application/json",
    }
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v}


# -- CloudEvents modes and reply attributes ---------------------------------------------------------


def test_binary_mode_reply_carries_context_and_predicts(digits: FunctionProcess, known_images: Any) -> None:
    for image, label in known_images:
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        event = request_event({"image": image}, subject="scan 7", partitionkey="user-42", traceparent=trace)
        response = post_binary(digits.url, event)
        assert response.status_code == 200, response.text
        assert "ce-id" in response.headers  # binary mode answered in binary mode
        reply = ce_http.from_http_event(ce_http.HTTPMessage(dict(response.headers), response.content))
        assert reply.get_type() == "dev.onnxfn.digits.result"
        assert reply.get_source() == "/functions/digits"
        assert reply.get_id() != event.get_id()
        assert reply.get_subject() == "scan 7"
        assert reply.get_extension("partitionkey") == "user-42"
        assert reply.get_extension("traceparent") == trace
        assert reply.get_extension("requestid") == event.get_id()
        assert reply.get_extension("modelversion") == "1"
        assert reply.get_extension("revision") == "digits-v1-test"
        data = reply.get_data()
        assert data["label"] == label
        assert len(data["probabilities"]) == 10
        assert abs(sum(data["probabilities"]) - 1.0) < 1e-4
        names = [h[3:].lower() for h in response.headers if h.lower().startswith("ce-")]
        assert all(EXTENSION.match(n) for n in names), names


def test_structured_mode_answers_structured(digits: FunctionProcess, known_images: Any) -> None:
    image, label = known_images[1]
    event = request_event({"image": [image[i : i + 8] for i in range(0, 64, 8)]})  # 8 rows of 8
    message = ce_http.to_structured_event(event)
    response = requests.post(digits.url, data=message.body, headers=message.headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/cloudevents+json")
    reply = ce_http.from_http_event(ce_http.HTTPMessage(dict(response.headers), response.content))
    assert reply.get_type() == "dev.onnxfn.digits.result"
    assert reply.get_extension("requestid") == event.get_id()
    assert reply.get_data()["label"] == label


def test_batched_mode_answers_each_event_in_order(digits: FunctionProcess, known_images: Any) -> None:
    events = [
        {"specversion": "1.0", "id": f"e{i}", "source": "/tests", "type": DIGITS, "data": {"image": image}}
        for i, (image, _) in enumerate(known_images)
    ]
    events.insert(3, {"specversion": "1.0", "id": "bad", "source": "/tests", "type": DIGITS, "data": {"image": [1]}})
    response = requests.post(
        digits.url,
        data=orjson.dumps(events),
        headers={"Content-Type": "application/cloudevents-batch+json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/cloudevents-batch+json")
    replies = response.json()
    assert [r["requestid"] for r in replies] == [e["id"] for e in events]
    bad = replies.pop(3)
    assert bad["type"] == "dev.onnxfn.error"
    assert bad["data"]["status"] == 400 and "64 numbers" in bad["data"]["message"]
    assert [r["data"]["label"] for r in replies] == [label for _, label in known_images]
    assert all(r["type"] == "dev.onnxfn.digits.result" for r in replies)


# -- Open Inference Protocol v2 ----------------------------------------------------------------------


def test_open_inference_protocol(digits: FunctionProcess, known_images: Any) -> None:
    url = digits.url
    assert requests.get(url + "/v2/health/live", timeout=5).status_code == 200
    assert requests.get(url + "/v2/health/ready", timeout=5).status_code == 200
    assert requests.get(url + "/v2/models/digits/ready", timeout=5).status_code == 200
    meta = requests.get(url + "/v2/models/digits", timeout=5).json()
    assert meta["name"] == "digits" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0]["datatype"] == "FP32"
    shape = meta["inputs"][0]["shape"]
    (a, label_a), (b, label_b) = known_images[:2]
    body = {
        "id": "req-1",
        "inputs": [{"name": meta["inputs"][0]["name"], "datatype": "FP32", "shape": [2, *shape[1:]], "data": a + b}],
    }
    response = requests.post(url + "/v2/models/digits/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["id"] == "req-1" and out["model_name"] == "digits"
    probabilities = out["outputs"][0]
    assert probabilities["shape"] == [2, 10]
    rows = [probabilities["data"][:10], probabilities["data"][10:]]
    assert [r.index(max(r)) for r in rows] == [label_a, label_b]
    bad = {"inputs": [{"name": "image", "datatype": "FP99", "shape": [1], "data": [1]}, {"datatype": "FP32"}]}
    response = requests.post(url + "/v2/models/digits/infer", json=bad, timeout=10)
    assert response.status_code == 400
    assert len(response.json()["details"]) == 2
    assert requests.get(url + "/v2/models/nope", timeout=5).status_code == 404


# -- the error table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "status", "needle"),
    [
        (headers_of(**{"ce-source": ""}), b'{"image": []}', 400, "source"),
        (headers_of(**{"ce-specversion": "0.1"}), b"{}", 400, "specversion"),
        (headers_of(), b'{"image": [1, 2', 400, "not valid JSON"),
        (headers_of(**{"ce-type": "dev.onnxfn.embed.request"}), b'{"text": "x"}', 400, "not accepted"),
        ({"Content-Type": "application/cloudevents+json"}, b'{"id": "1"}', 400, "missing required"),
        ({"Content-Type": "application/cloudevents-batch+json"}, b"{}", 400, "JSON array"),
    ],
)
def test_malformed_events_get_400(
    digits: FunctionProcess, headers: dict[str, str], body: bytes, status: int, needle: str
) -> None:
    response = requests.post(digits.url, data=body, headers=headers, timeout=10)
    assert response.status_code == status
    assert needle in response.json()["message"]


def test_invalid_input_lists_every_problem(digits: FunctionProcess) -> None:
    image: list[Any] = [0] * 64
    image[3], image[9], image[20] = True, 99, "x"
    response = requests.post(digits.url, data=orjson.dumps({"image": image}), headers=headers_of(), timeout=10)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "InvalidInput"
    assert len(body["details"]) == 3
    assert any("image[9]" in d for d in body["details"])
    for data in ({"image": [float("nan")] * 64}, {"picture": []}, [1, 2, 3]):
        payload = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY) if data else b"{}"
        if isinstance(data, dict) and "image" in data:
            payload = b'{"image": [' + b",".join([b"NaN"] * 64) + b"]}"
        response = requests.post(digits.url, data=payload, headers=headers_of(), timeout=10)
        assert response.status_code == 400, data


def test_payload_over_limit_gets_413(digits: FunctionProcess) -> None:
    body = b'{"image": [' + b"0," * (600 * 1024) + b"0]}"
    response = requests.post(digits.url, data=body, headers=headers_of(), timeout=10)
    assert response.status_code == 413
    assert "limit" in response.json()["message"]


def test_get_on_event_endpoint_is_405(digits: FunctionProcess) -> None:
    assert requests.get(digits.url + "/", timeout=5).status_code == 405


@pytest.mark.fault
def test_inference_failure_is_500_and_worker_survives(model_dir: Path) -> None:
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "1"}
    with FunctionProcess("tests.fixtures.faulty", env=env) as server:
        server.wait_ready()
        image = [0] * 64
        bad = headers_of(**{"ce-type": "dev.onnxfn.faulty.request"})
        response = requests.post(server.url, data=orjson.dumps({"image": image, "explode": True}), headers=bad)
        assert response.status_code == 500
        assert response.json()["error"] == "InferenceFailed"
        assert "exploded" in response.json()["message"]
        ok = requests.post(server.url, data=orjson.dumps({"image": image}), headers=bad, timeout=10)
        assert ok.status_code == 200


@pytest.mark.fault
@pytest.mark.parametrize("engine", ["per-worker", "shared"])
def test_full_queue_gets_429_with_retry_after(model_dir: Path, engine: str) -> None:
    env = {
        "ONNXFN_MODEL_DIR": str(model_dir),
        "ONNXFN_QUEUE_CAPACITY": "1",
        "ONNXFN_MAX_BATCH_SIZE": "1",
        "ONNXFN_ENGINE": engine,
    }
    with FunctionProcess("embed", env=env) as server:
        server.wait_ready()
        text = "a long sentence about onnx runtime batching " * 20
        headers = headers_of(**{"ce-type": "dev.onnxfn.embed.request"})
        body = orjson.dumps({"text": text})
        result = run_load("127.0.0.1", server.port, "/", headers, body, concurrency=24, count=96, duration=30)
        assert result.statuses.get(429, 0) > 0, result.statuses
        assert set(result.statuses) <= {200, 429}, result.statuses
        assert result.statuses.get(200, 0) > 0
        responses: list[requests.Response] = []
        threads = [
            threading.Thread(
                target=lambda: responses.append(requests.post(server.url, data=body, headers=headers, timeout=30))
            )
            for _ in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in responses if r.status_code == 429]
        assert refused, [r.status_code for r in responses]  # 16 at once against a queue of one
        assert refused[0].headers["Retry-After"] == "1"
        assert "queue full" in refused[0].json()["message"]
        # A batched request larger than the whole queue is let in once its first event fits: a 429
        # for it would be retried forever and never succeed.
        batch = [
            {"specversion": "1.0", "id": f"b{i}", "source": "/tests", "type": "dev.onnxfn.embed.request",
             "data": {"text": f"{i} {text}"}}
            for i in range(64)
        ]  # fmt: skip
        whole = requests.post(
            server.url, data=orjson.dumps(batch), headers={"Content-Type": "application/cloudevents-batch+json"},
            timeout=60,
        )  # fmt: skip
        assert whole.status_code == 200, whole.text
        assert [r["requestid"] for r in whole.json()] == [e["id"] for e in batch]
        assert {r["type"] for r in whole.json()} == {"dev.onnxfn.embed.result"}


def test_not_ready_until_model_arrives_in_every_worker(model_dir: Path, tmp_path: Path) -> None:
    env = {"ONNXFN_MODEL_DIR": str(tmp_path), "ONNXFN_WORKERS": "2", "ONNXFN_READY_WAIT": "0"}
    with FunctionProcess("digits", env=env) as server:
        deadline = time.monotonic() + 20
        while requests_status(server.url + "/health/liveness") != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = requests.get(server.url + "/health/readiness", timeout=5)
        assert ready.status_code == 503
        while "not found" not in ready.json()["reason"]:  # "loading" until the first attempt fails
            assert ready.json()["reason"] == "model is loading; retry shortly" and time.monotonic() < deadline
            time.sleep(0.02)
            ready = requests.get(server.url + "/health/readiness", timeout=5)
        assert ready.status_code == 503
        response = requests.post(server.url, data=b'{"image": []}', headers=headers_of(), timeout=5)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        shutil.copytree(model_dir / "digits", tmp_path / "digits")
        server.wait_ready(timeout=30)
        # Ready means every worker has its model: no request may meet a loading worker now.
        body = orjson.dumps({"image": [0] * 64})
        result = run_load("127.0.0.1", server.port, "/", headers_of(), body, concurrency=8, count=400, duration=20)
        assert result.statuses == {200: 400}


def requests_status(url: str) -> int:
    try:
        return requests.get(url, timeout=1).status_code
    except requests.RequestException:
        return 0


# -- batching, metrics, shutdown ---------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_metrics_add_up_across_workers(
    digits: FunctionProcess, known_images: Any
) -> None:
    assert len(digits.worker_pids()) == 2
    key = 'onnxfn_requests_total{function="digits",route="cloudevents",status="200"}'
    before = scrape(digits.url)
    body = orjson.dumps({"image": known_images[0][0]})
    result = run_load("127.0.0.1", digits.port, "/", headers_of(), body, concurrency=32, count=3000, duration=30)
    assert result.statuses == {200: 3000}
    for _ in range(4):  # every worker answers /metrics with the same merged totals
        after = scrape(digits.url)
        assert after[key] - before.get(key, 0) == 3000
    rows = after['onnxfn_batch_size_sum{function="digits"}'] - before.get('onnxfn_batch_size_sum{function="digits"}', 0)
    runs = after['onnxfn_batch_size_count{function="digits"}'] - before.get(
        'onnxfn_batch_size_count{function="digits"}', 0
    )
    assert rows >= 3000 and runs > 0
    assert rows / runs > 1.0, f"no batching: {rows} rows in {runs} runs"
    for name in ("onnxfn_queue_seconds_count", "onnxfn_compute_seconds_count", "onnxfn_request_seconds_count"):
        assert after[f'{name}{{function="digits"}}'] > 0
    assert after['onnxfn_model_load_seconds_count{function="digits"}'] == 2  # one load per worker


@pytest.mark.fault
def test_sigterm_finishes_requests_in_flight(model_dir: Path) -> None:
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_GRACEFUL_TIMEOUT": "30"}
    server = FunctionProcess("embed", env=env)
    server.wait_ready()
    texts = [f"sentence number {i} about serverless inference on knative with kafka" * 3 for i in range(32)]
    batch = orjson.dumps(
        [
            {
                "specversion": "1.0",
                "id": f"t{i}",
                "source": "/tests",
                "type": "dev.onnxfn.embed.request",
                "data": {"text": t},
            }
            for i, t in enumerate(texts)
        ]
    )
    results: list[requests.Response | Exception] = []

    def send() -> None:
        try:
            results.append(
                requests.post(
                    server.url, data=batch, headers={"Content-Type": "application/cloudevents-batch+json"}, timeout=60
                )
            )
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while scrape(server.url).get('onnxfn_inflight_requests{function="embed"}', 0) < 6:
        assert time.monotonic() < deadline, "requests never arrived"
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert server.proc.wait(timeout=30) == 0
    assert len(results) == 6
    for response in results:
        assert isinstance(response, requests.Response), response
        assert response.status_code == 200
        assert len(response.json()) == 32
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health/liveness", timeout=2)
    server.stop()


@pytest.mark.fault
def test_sigterm_while_workers_boot_stops_at_once(model_dir: Path) -> None:
    """A stop that lands while a worker is still starting (a scale-down or a shutdown during a cold
    start) ends the server in about a second, not after the whole graceful timeout."""
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_GRACEFUL_TIMEOUT": "30", "ONNXFN_WORKERS": "2"}
    for _ in range(3):  # the second worker is usually still between fork and serving
        server = FunctionProcess("digits", env=env)
        deadline = time.monotonic() + 30
        while not server.worker_pids():
            assert time.monotonic() < deadline and server.proc.poll() is None
            time.sleep(0.002)
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 10


def test_each_worker_logs_the_address_it_listens_at(model_dir: Path, tmp_path: Path) -> None:
    """With SO_REUSEPORT gunicorn's master binds nothing and its own line names no address: an
    operator reading the log still learns where the function listens, once per worker."""
    log = tmp_path / "serve.log"
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "2"}
    with FunctionProcess("digits", env=env, log=log) as server:
        server.wait_ready(timeout=60)
        lines = [line for line in log.read_text().splitlines() if f"Listening at: {server.url} (worker" in line]
        assert len(lines) == 2, log.read_text()
