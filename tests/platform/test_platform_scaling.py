"""Scale from zero, hold requests during a start, back to zero when idle, min-scale, cold-start metrics."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path

from platform_helpers import BODY, HEADERS, Client, revision, wait_for, write_service

from shared.bench.loadgen import run_load
from shared.platform import Platform, PlatformOptions
from shared.process import http_get

REV = "digits-v1-cpu"


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (labels matched as a subset)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_scale_from_zero_then_back_to_zero_with_cold_start_metrics(
    make_platform: Callable[..., Platform], knative: Path
) -> None:
    write_service(knative)
    platform = make_platform(idle_window_s=1.0)
    assert revision(platform, REV)["ready"] == 0  # nothing runs before the first request
    client = Client(platform.url_for("digits"))
    assert client.post() == (200, "1")
    status = revision(platform, REV)
    assert status["ready"] == 1
    cold = status["last_cold_start"]
    assert cold is not None and 0 < cold["seconds"] < 5
    assert set(cold["parts"]) == {"process_start", "model_load", "warmup", "ready_detect", "first_inference"}
    assert client.post() == (200, "1")  # warm
    client.close()

    _, body = http_get(platform.gateway_url + "metrics")
    text = body.decode()
    assert _metric(text, "onnxfn_platform_cold_start_seconds_count", revision=REV) == 1
    for part in ("process_start", "model_load", "warmup", "first_inference"):
        assert _metric(text, "onnxfn_platform_cold_start_part_seconds_count", revision=REV, part=part) == 1
    assert _metric(text, "onnxfn_platform_replicas", revision=REV) == 1
    assert _metric(text, "onnxfn_platform_queue_depth", revision=REV) == 0

    wait_for(lambda: revision(platform, REV)["ready"] == 0, 15, "scale to zero after the idle window")
    wait_for(lambda: revision(platform, REV)["stopping"] == 0, 15, "the process to stop")
    _, body = http_get(platform.gateway_url + "metrics")
    assert _metric(body.decode(), "onnxfn_platform_replicas", revision=REV) == 0


def test_burst_at_zero_is_held_and_all_answered(make_platform: Callable[..., Platform], knative: Path) -> None:
    write_service(knative)
    platform = make_platform()
    port = int(platform.url_for("digits").rsplit(":", 1)[1].strip("/"))
    result = run_load("127.0.0.1", port, "/", HEADERS, BODY, concurrency=500, count=500, duration=60)
    assert result.ok == 500, (result.statuses, result.errors)
    assert result.errors == 0
    _, body = http_get(platform.gateway_url + "metrics")
    text = body.decode()
    assert _metric(text, "onnxfn_platform_process_starts_total", revision=REV, outcome="ok") == 1
    assert _metric(text, "onnxfn_platform_cold_start_seconds_count", revision=REV) == 1


def test_no_request_lost_at_the_scale_to_zero_boundary(make_platform: Callable[..., Platform], knative: Path) -> None:
    """Requests arrive around the idle window: some find the process stopping and start a new one."""
    write_service(knative)
    idle = 0.4
    platform = make_platform(idle_window_s=idle, tick_s=0.05)
    client = Client(platform.url_for("digits"))
    rng = random.Random(7)
    statuses = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        statuses.append(client.post()[0])
        time.sleep(idle * rng.uniform(0.8, 1.6))
    client.close()
    assert statuses and set(statuses) == {200}
    _, body = http_get(platform.gateway_url + "metrics")
    starts = _metric(body.decode(), "onnxfn_platform_process_starts_total", revision=REV, outcome="ok")
    assert starts >= 2, "the idle window never passed between requests"


def test_min_scale_keeps_a_process(make_platform: Callable[..., Platform], knative: Path) -> None:
    write_service(knative, min_scale=1)
    platform = make_platform(idle_window_s=0.2, tick_s=0.05)
    wait_for(lambda: revision(platform, REV)["ready"] == 1, 30, "min-scale 1 without any request")
    client = Client(platform.url_for("digits"))
    assert client.post()[0] == 200
    client.close()
    time.sleep(1.0)  # several idle windows pass: still one process
    status = revision(platform, REV)
    assert status["ready"] == 1 and status["stopping"] == 0
    assert status["last_cold_start"] is None  # the request found a warm process


def test_status_command_table_and_json(make_platform: Callable[..., Platform], knative: Path) -> None:
    import json
    import subprocess
    import sys

    write_service(knative)
    platform = make_platform()
    Client(platform.url_for("digits")).post()
    argv = [sys.executable, "-m", "shared.cli", "status", "--url", platform.gateway_url]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"digits\s+digits-v1-cpu\s+1\s+100%\s+current,latest\s+1\s+0\s+0\s+http://", table)
    data = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60).stdout)
    (service,) = data["services"]
    assert service["revisions"][0]["last_cold_start"]["seconds"] > 0


def test_scales_up_by_concurrency_target_then_down_after_stable_window(
    make_platform: Callable[..., Platform], knative: Path
) -> None:
    """target 32 x 70 % = 22.4 in flight per process: 48 connections want 3, max-processes caps at 2."""
    write_service(knative)
    platform = make_platform(stable_window_s=1.0, max_processes=2, tick_s=0.05)
    port = int(platform.url_for("digits").rsplit(":", 1)[1].strip("/"))
    result = run_load("127.0.0.1", port, "/", HEADERS, BODY, concurrency=48, count=3000, duration=20)
    assert result.ok == 3000 and result.errors == 0, result.statuses
    _, body = http_get(platform.gateway_url + "metrics")
    assert _metric(body.decode(), "onnxfn_platform_process_starts_total", revision=REV, outcome="ok") == 2
    wait_for(lambda: revision(platform, REV)["ready"] == 1, 15, "back to one process after the stable window")


def test_a_revision_that_cannot_start_answers_503_with_the_reason(knative: Path, tmp_path: Path) -> None:
    write_service(knative)
    options = PlatformOptions(knative_dir=knative, log_dir=tmp_path / "logs", env={"ONNXFN_WORKERS": "0"})
    with Platform(options) as platform:
        client = Client(platform.url_for("digits"))
        started = time.monotonic()
        assert client.post()[0] == 503
        assert time.monotonic() - started < 20
        assert "ONNXFN_WORKERS" in (revision(platform, REV)["start_error"] or "")
        client.close()
