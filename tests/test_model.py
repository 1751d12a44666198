"""OnnxModel: optimised-graph cache, provider choice, feed checks, with the real digits model."""

from __future__ import annotations

import ctypes.util
import logging
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from shared.model import GpuUnavailable, OnnxModel, choose_providers, gpu_visible, usable_providers
from shared.process import FunctionProcess, http_get


@pytest.mark.parametrize("where", ["under a file", "unwritable"])
def test_a_cache_folder_that_cannot_be_written_does_not_stop_the_model_loading(
    model_dir: Path, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only or full /tmp (a container's) must not fail the function: it loads uncached."""
    (tmp_path / "file").write_text("")
    # /sys: a folder root may "write" by its mode, where creating a file fails (as on a full disk).
    cache_dir = tmp_path / "file" / "cache" if where == "under a file" else Path("/sys")
    with caplog.at_level(logging.WARNING, logger="shared.model"):
        model = OnnxModel(model_dir / "digits" / "1" / "model.onnx", cache_dir=cache_dir)
    assert not model.cache_hit and "without the cache" in caplog.text
    image = np.zeros((1, 1, 8, 8), np.float32)
    assert model.run({"image": image})["probabilities"].shape == (1, 10)


def test_onnxruntime_telemetry_is_off_where_home_cannot_be_written(model_dir: Path, tmp_path: Path) -> None:
    """The image's user has an unwritable HOME (read-only root): loading a model must neither try
    to persist onnxruntime's telemetry device ID nor log that it could not."""
    import os
    import subprocess
    import sys

    code = (
        "from pathlib import Path; from shared.model import OnnxModel; "
        f"OnnxModel(Path({str(model_dir / 'digits' / '1' / 'model.onnx')!r}), cache_dir=None); print('loaded')"
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": "/proc/onnxfn"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    assert "telemetry" not in done.stderr.lower(), done.stderr


def test_optimised_graph_is_cached_and_gives_the_same_outputs(model_dir: Path, tmp_path: Path) -> None:
    path = model_dir / "digits" / "1" / "model.onnx"
    first = OnnxModel(path, cache_dir=tmp_path)
    assert not first.cache_hit
    cached = list(tmp_path.glob("*.optimized.onnx"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))
    second = OnnxModel(path, cache_dir=tmp_path)
    assert second.cache_hit
    image = np.random.default_rng(0).integers(0, 17, (4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        first.run({"image": image})["probabilities"],
        second.run({"image": image})["probabilities"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_cpu_only_machine_uses_cpu_quietly(caplog: pytest.LogCaptureFixture) -> None:
    if gpu_visible():
        pytest.skip("a GPU is visible here")
    with caplog.at_level(logging.WARNING):
        assert choose_providers("auto") == ["CPUExecutionProvider"]
    assert not caplog.records


def test_a_gpu_asked_for_and_absent_is_an_error_with_its_reason() -> None:
    if gpu_visible():
        pytest.skip("a GPU is visible here")
    for requested in ("cuda", "tensorrt"):
        with pytest.raises(GpuUnavailable) as caught:
            choose_providers(requested)
        message = str(caught.value)
        assert message.startswith(f"ONNXFN_PROVIDERS={requested}: ") and "ONNXFN_PROVIDERS=auto" in message
        assert "no CUDA provider" in message or "no NVIDIA GPU is visible" in message
    assert "TensorrtExecutionProvider" not in usable_providers() or ctypes.util.find_library("nvinfer")


@pytest.mark.parametrize("engine", ["per-worker", "shared"])
def test_a_function_asked_for_a_gpu_it_has_not_got_is_alive_but_not_ready(
    model_dir: Path, tmp_path: Path, engine: str
) -> None:
    """Knative must not route GPU traffic to a pod that would serve it on the CPU: readiness says
    503 with the reason (also in the log), liveness stays 200 so the pod is not restarted in a loop."""
    if gpu_visible():
        pytest.skip("a GPU is visible here")
    log = tmp_path / "server.log"
    workers = "1" if engine == "per-worker" else "2"
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": workers, "ONNXFN_ENGINE": engine}
    env["ONNXFN_PROVIDERS"] = "cuda"
    with FunctionProcess("digits", env=env, log=log) as server:
        deadline = time.monotonic() + 30
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            status, raw = http_get(server.url + "/health/readiness")
            if status == 503 and b"ONNXFN_PROVIDERS=cuda" in raw:
                body = orjson.loads(raw)
                break
            time.sleep(0.1)
        assert body.get("ready") is False, body
        assert "ONNXFN_PROVIDERS=cuda" in str(body["reason"]) and "ONNXFN_PROVIDERS=auto" in str(body["reason"])
        assert http_get(server.url + "/health/liveness")[0] == 200
        while engine == "shared" and "could not load" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    text = log.read_text()
    assert "ONNXFN_PROVIDERS=cuda: " in text  # the reason is in the log too, not only on the probe
    if engine == "shared":  # the engine's supervisor says why it ended, not an exit code it never saw
        assert "could not load the model (exit code 1: GpuUnavailable: ONNXFN_PROVIDERS=cuda" in text, text
        assert "exited with code 0" not in text


def test_feed_check_lists_every_mismatch(model_dir: Path) -> None:
    model = OnnxModel(model_dir / "digits" / "1" / "model.onnx")
    assert model.inputs[0].batched
    assert model.check_feeds({"image": np.zeros((3, 1, 8, 8), np.float32)}) == []
    problems = model.check_feeds({"image": np.zeros((1, 1, 8, 7), np.float64), "extra": np.zeros(1)})
    assert any("dtype float64" in p for p in problems)
    assert any("axis 3 is 7" in p for p in problems)
    assert any("unknown model input 'extra'" in p for p in problems)
    assert model.check_feeds({}) == ["missing model input 'image'"]


def test_missing_model_file_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build-models"):
        OnnxModel(tmp_path / "nope.onnx")
