"""The shared inference engine (one process owns the session, every HTTP worker feeds it), and
clean exits: real gunicorn, a real engine process, real models."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
from metrics_helpers import scrape

from shared.bench.loadgen import run_load
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)

CRASH_SIGNS = (
    "Traceback",
    "terminate called",
    "Segmentation fault",
    "core dumped",
    "was sent SIG",
    "exited with code",
    "inference engine (pid",  # the engine supervisor's line when the engine ended before a stop
)


def digits_headers() -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-source": "/tests",
        "ce-type": "dev.onnxfn.digits.request",
        "Content-Type": "application/json",
    }


def readiness(url: str) -> tuple[int, dict[str, object]]:
    try:
        response = requests.get(url + "/health/readiness", timeout=2)
        return response.status_code, response.json()
    except requests.RequestException:
        return 0, {}


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def engine_digits(model_dir: Path, tmp_path: Path) -> Iterator[FunctionProcess]:
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "2", "ONNXFN_ENGINE": "shared"}
    with FunctionProcess("digits", env=env, log=tmp_path / "server.log") as server:
        server.wait_ready()
        yield server


def test_engine_batches_items_of_both_workers_in_one_run(engine_digits: FunctionProcess) -> None:
    server = engine_digits
    status, body = readiness(server.url)
    assert status == 200 and isinstance(body["engine_pid"], int)
    assert body["engine_pid"] not in server.worker_pids()
    image = orjson.dumps({"image": [3] * 64})
    result = run_load("127.0.0.1", server.port, "/", digits_headers(), image, concurrency=32, count=3000, duration=60)
    assert result.statuses == {200: 3000}
    after = scrape(server.url)
    assert after['onnxfn_requests_total{function="digits",route="cloudevents",status="200"}'] >= 3000
    runs = after['onnxfn_batch_size_count{function="digits"}']
    assert after['onnxfn_batch_size_sum{function="digits"}'] >= 3000 and runs < 3000
    one_worker = after['onnxfn_engine_batch_workers_bucket{function="digits",le="1.0"}']
    shared_runs = after['onnxfn_engine_batch_workers_count{function="digits"}'] - one_worker
    assert shared_runs > 0, "no model run served items of both workers"


def test_engine_crash_takes_the_server_out_of_readiness_until_it_is_restarted(engine_digits: FunctionProcess) -> None:
    server = engine_digits
    _, before = readiness(server.url)
    os.kill(int(before["engine_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    wait_for(lambda: readiness(server.url)[0] == 503, 10, "readiness to fail")
    _, body = readiness(server.url)
    assert "engine" in str(body["reason"])
    post = requests.post(server.url, data=b'{"image": [1]}', headers=digits_headers(), timeout=5)
    assert post.status_code == 503 and post.headers["Retry-After"] == "1"  # retryable, not lost
    wait_for(lambda: readiness(server.url)[0] == 200, 30, "the restarted engine")
    _, after = readiness(server.url)
    assert after["engine_pid"] != before["engine_pid"]
    image = orjson.dumps({"image": [3] * 64})
    result = run_load("127.0.0.1", server.port, "/", digits_headers(), image, concurrency=8, count=200, duration=30)
    assert result.statuses == {200: 200}


@pytest.mark.parametrize("engine", ["per-worker", "shared"])
def test_sigterm_answers_every_request_in_flight_and_every_process_exits_0(
    model_dir: Path, tmp_path: Path, engine: str
) -> None:
    log = tmp_path / "server.log"
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_ENGINE": engine, "ONNXFN_GRACEFUL_TIMEOUT": "30"}
    server = FunctionProcess("embed", env=env, log=log)
    server.wait_ready()
    engine_pid = readiness(server.url)[1].get("engine_pid")
    pids = server.worker_pids()
    headers = {**digits_headers(), "ce-type": "dev.onnxfn.embed.request"}
    results: list[requests.Response | Exception] = []

    def send(i: int) -> None:
        text = f"sentence {i} about draining a serverless inference function " * 8
        try:
            results.append(requests.post(server.url, data=orjson.dumps({"text": text}), headers=headers, timeout=60))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    wait_for(lambda: scrape(server.url).get('onnxfn_inflight_requests{function="embed"}', 0) >= 8, 10, "requests")
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert server.proc.wait(timeout=30) == 0
    server.stop()
    assert len(results) == 32
    assert all(isinstance(r, requests.Response) and r.status_code == 200 for r in results), results
    for pid in [*pids, *([engine_pid] if engine_pid else [])]:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the server"
    text = log.read_text()
    assert [sign for sign in CRASH_SIGNS if sign in text] == [], text[-3000:]
    assert text.count("Worker exiting") == len(pids)  # each worker ended its own way, with code 0
