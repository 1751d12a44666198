"""Shared fixtures: the functions' models, built once into `<repo>/models` and cached there."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.build_models import ensure_models
from shared.config import PROJECT_ROOT


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """`<repo>/models` with every function's model built (only the missing ones are built)."""
    path = PROJECT_ROOT / "models"
    ensure_models(path)
    return path
