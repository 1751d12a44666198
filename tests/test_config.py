"""Settings are read once from a mapping; bad values fail with the variable's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import Settings, SettingsError
from shared.contract import load_handler
from shared.pipeline import Layout


def test_defaults_and_knative_contract() -> None:
    settings = Settings.from_env({"ONNXFN_FUNCTION": "digits", "PORT": "9000", "K_REVISION": "digits-v2"})
    assert settings.function == "digits" and settings.port == 9000
    assert settings.k_revision == "digits-v2"
    assert settings.max_body_bytes == 1 << 20


def test_overrides() -> None:
    env = {"ONNXFN_MODEL_DIR": "/m", "ONNXFN_MAX_BATCH_SIZE": "8", "ONNXFN_INTRA_OP_SPINNING": "true"}
    settings = Settings.from_env(env, function="embed")
    assert settings.model_dir == Path("/m") and settings.max_batch_size == 8 and settings.intra_op_spinning


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "ONNXFN_FUNCTION"),
        ({"ONNXFN_FUNCTION": "d", "PORT": "http"}, "PORT"),
        ({"ONNXFN_FUNCTION": "d", "ONNXFN_WORKERS": "0"}, "ONNXFN_WORKERS"),
        ({"ONNXFN_FUNCTION": "d", "ONNXFN_PROVIDERS": "gpu"}, "ONNXFN_PROVIDERS"),
        ({"ONNXFN_FUNCTION": "d", "ONNXFN_INTRA_OP_SPINNING": "maybe"}, "SPINNING"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_layout_sizes_threads_to_cores_and_workers() -> None:
    config = load_handler("digits").config
    layout = Layout.of(config, Settings.from_env({"ONNXFN_WORKERS": "2"}, function="digits"))
    assert layout.workers == 2 and layout.intra_op_threads >= 1
    assert layout.max_batch_size == config.batching.max_batch_size
    assert not layout.spinning


def test_unknown_function_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown function"):
        load_handler("nope")
