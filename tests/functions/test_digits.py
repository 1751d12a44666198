"""digits: model accuracy through onnxruntime, and the handler's validation and result shape."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from functions.digits import new
from functions.digits.build import held_out_split
from functions.digits.func import DigitsHandler
from shared.contract import Handler
from shared.errors import InvalidInput


@pytest.fixture(scope="module")
def handler() -> DigitsHandler:
    return new()


@pytest.fixture(scope="module")
def session(model_dir: Path, handler: DigitsHandler) -> ort.InferenceSession:
    assert handler.config.model_file is not None
    return ort.InferenceSession(str(model_dir / handler.config.model_file), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    return held_out_split()


def run_one(session: ort.InferenceSession, handler: DigitsHandler, data: Any) -> Any:
    """What the runtime does for one item: preprocess, run, drop the batch axis, postprocess."""
    feeds = handler.preprocess(data)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    return handler.postprocess({k: v[0] for k, v in outputs.items()}, data)


def test_handler_satisfies_contract(handler: DigitsHandler) -> None:
    assert isinstance(handler, Handler)
    config = handler.config
    assert config.name == "digits"
    assert config.accepts == ("dev.onnxfn.digits.request",)
    assert config.result_types == ("dev.onnxfn.digits.result",)
    assert config.model_file == "digits/1/model.onnx"
    assert config.batching.max_batch_size == 64
    assert (config.workers, config.concurrency) == (2, 16)


def test_model_io(session: ort.InferenceSession, model_dir: Path) -> None:
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [1, 8, 8])
    assert (out.name, out.type, out.shape[1:]) == ("probabilities", "tensor(float)", [10])
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    metadata = json.loads((model_dir / "digits/1/metadata.json").read_text())
    assert metadata["version"] == "1"
    assert list(metadata["inputs"]) == ["image"]
    assert list(metadata["outputs"]) == ["probabilities"]
    assert metadata["metrics"]["accuracy"] >= 0.97


def test_held_out_accuracy_batched(session: ort.InferenceSession, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = split
    assert x.shape == (450, 1, 8, 8) and x.dtype == np.float32
    (probs,) = session.run(["probabilities"], {"image": x})
    assert probs.shape == (450, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    assert accuracy >= 0.97


@pytest.mark.parametrize("index", range(8))
def test_handler_labels_known_images(
    session: ort.InferenceSession,
    handler: DigitsHandler,
    split: tuple[np.ndarray, np.ndarray],
    index: int,
) -> None:
    x, y = split
    image = x[index, 0]
    for data in ({"image": image.astype(int).tolist()}, {"image": image.reshape(-1).tolist()}):
        result = run_one(session, handler, data)
        assert set(result) == {"label", "probabilities"}
        assert type(result["label"]) is int and result["label"] == int(y[index])
        assert len(result["probabilities"]) == 10
        assert all(type(p) is float for p in result["probabilities"])
        assert math.isclose(sum(result["probabilities"]), 1.0, rel_tol=1e-5)
        assert result["label"] == max(range(10), key=result["probabilities"].__getitem__)


def test_example_is_a_held_out_image(
    session: ort.InferenceSession, handler: DigitsHandler, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    example = handler.example()
    np.testing.assert_array_equal(np.asarray(example["image"], dtype=np.float32), x[0, 0])
    assert run_one(session, handler, example)["label"] == int(y[0])


def test_flat_and_rows_give_the_same_input(handler: DigitsHandler, split: tuple[np.ndarray, np.ndarray]) -> None:
    image = split[0][3, 0]
    rows = handler.preprocess({"image": image.tolist()})["image"]
    flat = handler.preprocess({"image": image.reshape(-1).tolist()})["image"]
    ints = handler.preprocess({"image": image.astype(int).reshape(-1).tolist()})["image"]
    for array in (rows, flat, ints):
        assert array.shape == (1, 1, 8, 8) and array.dtype == np.float32
        np.testing.assert_array_equal(array[0, 0], image)


def test_bounds_are_inclusive(handler: DigitsHandler) -> None:
    image = [0] * 32 + [16.0] * 32
    assert handler.preprocess({"image": image})["image"].max() == 16.0


def problems_of(handler: DigitsHandler, data: Any) -> list[str]:
    with pytest.raises(InvalidInput) as info:
        handler.preprocess(data)
    assert info.value.status == 400
    return info.value.details


ZEROS = [0] * 64


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"image": [*ZEROS[:5], True, *ZEROS[6:]]}, "image[5]: not a number (got boolean)"),
        ({"image": [*ZEROS[:5], "3", *ZEROS[6:]]}, "image[5]: not a number (got string)"),
        ({"image": [*ZEROS[:5], None, *ZEROS[6:]]}, "image[5]: not a number (got null)"),
        ({"image": [*ZEROS[:5], float("nan"), *ZEROS[6:]]}, "image[5]: nan is not finite"),
        ({"image": [*ZEROS[:5], float("inf"), *ZEROS[6:]]}, "image[5]: inf is not finite"),
        ({"image": [*ZEROS[:7], 17.0, *ZEROS[8:]]}, "image[7]: 17.0 outside 0..16"),
        ({"image": [*ZEROS[:7], -1, *ZEROS[8:]]}, "image[7]: -1 outside 0..16"),
        ({"image": [*ZEROS[:7], 10**400, *ZEROS[8:]]}, "image[7]: a huge integer outside 0..16"),
        ({"image": ZEROS[:63]}, "image: expected 64 numbers or 8 rows of 8, got 63"),
        ({"image": [[0] * 8] * 7}, "image: expected 8 rows of 8, got 7 rows"),
        ({"image": [[0] * 8] * 7 + [[0] * 9]}, "image[7]: expected a row of 8 numbers, got 9"),
        ({"image": [[0] * 8] * 7 + [[0] * 7, 1]}, "image: expected 8 rows of 8, got 9 rows"),
        ({"image": [[0] * 8] * 7 + [[0, 0, 0, True, 0, 0, 0, 0]]}, "image[7][3]: not a number (got boolean)"),
        ({"image": "0" * 64}, "image: expected 64 numbers or 8 rows of 8, got string"),
        ({"image": None}, "image: expected 64 numbers or 8 rows of 8, got null"),
        ({"picture": ZEROS}, "missing field 'image'"),
        ({}, "missing field 'image'"),
        ([0] * 64, "data: expected a JSON object with 'image', got array"),
        ("image", "data: expected a JSON object with 'image', got string"),
        (None, "data: expected a JSON object with 'image', got null"),
    ],
)
def test_invalid_input_is_rejected(handler: DigitsHandler, data: Any, expected: str) -> None:
    assert expected in problems_of(handler, data)


def test_every_problem_is_listed(handler: DigitsHandler) -> None:
    image: list[Any] = [0] * 63
    image[1], image[2], image[3], image[4] = True, float("nan"), 17, "x"
    problems = problems_of(handler, {"image": image})
    assert problems == [
        "image: expected 64 numbers or 8 rows of 8, got 63",
        "image[1]: not a number (got boolean)",
        "image[2]: nan is not finite",
        "image[3]: 17 outside 0..16",
        "image[4]: not a number (got string)",
    ]


def test_problem_list_is_capped(handler: DigitsHandler) -> None:
    problems = problems_of(handler, {"image": [99] * 64})
    assert len(problems) == 21
    assert problems[-1] == "... and 44 more problem(s)"


def test_subclassed_numbers_are_accepted(handler: DigitsHandler) -> None:
    class Number(float):
        pass

    array = handler.preprocess({"image": [Number(1.5)] * 64})["image"]
    assert array.shape == (1, 1, 8, 8) and float(array.max()) == 1.5
