"""Fixtures: platforms started on a private Service folder (`tmp_path/knative`), stopped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.platform import Platform, PlatformOptions, ScalingOptions


@pytest.fixture
def make_platform(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    """Start platforms on `tmp_path/knative` (write the Service file first); all stopped at the end."""
    started: list[Platform] = []

    def make(
        idle_window_s: float = 30.0, stable_window_s: float = 6.0, max_processes: int = 1, **options: Any
    ) -> Platform:
        scaling = ScalingOptions(
            idle_window_s=idle_window_s, stable_window_s=stable_window_s, max_processes=max_processes
        )
        platform = Platform(
            PlatformOptions(
                knative_dir=tmp_path / "knative",
                scaling=scaling,
                log_dir=tmp_path / "logs",
                env={"ONNXFN_MODEL_DIR": str(model_dir)},
                **options,
            )
        )
        platform.start()
        started.append(platform)
        return platform

    yield make
    for platform in started:
        platform.stop()


@pytest.fixture
def knative(tmp_path: Path) -> Path:
    return tmp_path / "knative"
