"""OnnxModel: optimised-graph cache, provider choice, feed checks, with the real digits model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from shared.model import OnnxModel, choose_providers, gpu_visible


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
    with caplog.at_level(logging.WARNING):
        assert choose_providers("cuda") == ["CPUExecutionProvider"]
    assert "running on CPU" in caplog.text


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
