"""postprocess: validation of digits results and routing by confidence (no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from functions.postprocess import new
from functions.postprocess.func import ACCEPTED, REVIEW, THRESHOLD_ENV, PostprocessHandler
from shared.config import SettingsError
from shared.contract import Handler, Result
from shared.errors import InvalidInput


def digits_result(label: int, confidence: float) -> dict[str, Any]:
    rest = (1.0 - confidence) / 9
    probabilities = [rest] * 10
    probabilities[label] = confidence
    return {"label": label, "probabilities": probabilities}


def route(handler: PostprocessHandler, data: Any) -> Result:
    """What the runtime does without a model: feeds become outputs, batch axis removed."""
    feeds = handler.preprocess(data)
    result = handler.postprocess({name: array[0] for name, array in feeds.items()}, data)
    assert isinstance(result, Result)
    return result


@pytest.fixture()
def handler() -> PostprocessHandler:
    return new({})


def test_config(handler: PostprocessHandler) -> None:
    assert isinstance(handler, Handler)
    config = handler.config
    assert config.name == "postprocess"
    assert config.model_file is None
    assert config.accepts == ("dev.onnxfn.digits.result",)
    assert config.result_types == (ACCEPTED, REVIEW) == ("dev.onnxfn.digits.accepted", "dev.onnxfn.digits.review")
    assert (config.workers, config.concurrency) == (1, 16)
    assert handler.threshold == 0.9


def test_feeds_keep_a_batch_axis(handler: PostprocessHandler) -> None:
    feeds = handler.preprocess(digits_result(3, 0.95))
    assert feeds["probabilities"].shape == (1, 10)
    assert feeds["label"].shape == (1,) and feeds["label"].dtype == np.int64


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.99, ACCEPTED), (0.9, ACCEPTED), (0.8999, REVIEW), (0.5, REVIEW)],
)
def test_routes_by_confidence(handler: PostprocessHandler, confidence: float, expected: str) -> None:
    data = digits_result(7, confidence)
    result = route(handler, data)
    assert result.type == expected
    assert result.data == {**data, "confidence": confidence, "threshold": 0.9}
    assert type(result.data["label"]) is int
    assert all(type(p) is float for p in result.data["probabilities"])


def test_confidence_is_the_largest_probability(handler: PostprocessHandler) -> None:
    data = {"label": 1, "probabilities": [0.0, 0.45, 0.55, 0, 0, 0, 0, 0, 0, 0]}
    result = route(handler, data)
    assert result.data["confidence"] == 0.55 and result.type == REVIEW


def test_unknown_fields_pass_through(handler: PostprocessHandler) -> None:
    data = {**digits_result(2, 0.97), "source": "camera-4"}
    assert route(handler, data).data["source"] == "camera-4"


def test_threshold_from_environment() -> None:
    handler = new({THRESHOLD_ENV: "0.5"})
    assert handler.threshold == 0.5
    result = route(handler, digits_result(4, 0.6))
    assert result.type == ACCEPTED and result.data["threshold"] == 0.5


def test_threshold_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THRESHOLD_ENV, "0.75")
    assert new().threshold == 0.75


@pytest.mark.parametrize("raw", ["high", "1.5", "-0.1", "nan"])
def test_bad_threshold_is_a_settings_error(raw: str) -> None:
    with pytest.raises(SettingsError, match=THRESHOLD_ENV):
        new({THRESHOLD_ENV: raw})


def test_example_is_accepted(handler: PostprocessHandler) -> None:
    assert route(handler, handler.example()).type == ACCEPTED


def problems_of(handler: PostprocessHandler, data: Any) -> list[str]:
    with pytest.raises(InvalidInput) as info:
        handler.preprocess(data)
    return info.value.details


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"probabilities": [0.1] * 10}, "missing field 'label'"),
        ({"label": 1}, "missing field 'probabilities'"),
        ({"label": True, "probabilities": [0.1] * 10}, "label: expected an integer 0..9, got boolean"),
        ({"label": 1.0, "probabilities": [0.1] * 10}, "label: expected an integer 0..9, got 1.0"),
        ({"label": 10, "probabilities": [0.1] * 10}, "label: 10 outside 0..9"),
        ({"label": 1, "probabilities": [0.1] * 9}, "probabilities: expected 10 numbers, got 9"),
        ({"label": 1, "probabilities": "0.1"}, "probabilities: expected a list of 10 numbers, got string"),
        ({"label": 1, "probabilities": [0.1] * 9 + [None]}, "probabilities[9]: not a number (got null)"),
        ({"label": 1, "probabilities": [0.1] * 9 + [False]}, "probabilities[9]: not a number (got boolean)"),
        ({"label": 1, "probabilities": [0.1] * 9 + [float("nan")]}, "probabilities[9]: nan is not finite"),
        ({"label": 1, "probabilities": [0.1] * 9 + [1.5]}, "probabilities[9]: 1.5 outside 0..1"),
        ([0.1] * 10, "data: expected a JSON object (a digits result), got array"),
    ],
)
def test_invalid_input_is_rejected(handler: PostprocessHandler, data: Any, expected: str) -> None:
    assert expected in problems_of(handler, data)


def test_every_problem_is_listed(handler: PostprocessHandler) -> None:
    problems = problems_of(handler, {"label": -1, "probabilities": [0.1] * 8 + ["x", -0.2, 0.1]})
    assert problems == [
        "label: -1 outside 0..9",
        "probabilities: expected 10 numbers, got 11",
        "probabilities[8]: not a number (got string)",
        "probabilities[9]: -0.2 outside 0..1",
    ]
