"""digits handler: validate an 8x8 image (values 0..16), run the CNN, answer label + probabilities.

Request data `{"image": [64 numbers]}` or `{"image": [[8 numbers] x 8]}`; the model input is
`image` float32 [1, 1, 8, 8] with the raw 0..16 values (the graph scales them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.contract import Batching, Feeds, FunctionConfig, Scaling
from shared.errors import InvalidInput
from shared.validation import json_kind

SIDE = 8
SIZE = SIDE * SIDE
MAX_VALUE = 16
MAX_PROBLEMS = 20

# Held-out image 0 of `functions.digits.build.held_out_split()` (label 2); the tests check that.
EXAMPLE_IMAGE: tuple[tuple[int, ...], ...] = (
    (0, 0, 7, 16, 14, 3, 0, 0),
    (0, 0, 9, 14, 11, 15, 0, 0),
    (0, 0, 1, 5, 0, 15, 5, 0),
    (0, 0, 0, 0, 0, 16, 5, 0),
    (0, 0, 0, 0, 3, 16, 4, 0),
    (0, 0, 0, 1, 12, 14, 1, 0),
    (0, 0, 5, 12, 16, 16, 14, 1),
    (0, 0, 8, 16, 14, 10, 13, 3),
)

_NUMBER_TYPES = frozenset({int, float})


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**15 else "a huge integer"
    return text if len(text) <= 24 else text[:21] + "..."


def _fast_image(image: Any) -> np.ndarray | None:
    """The [1, 1, 8, 8] float32 array when `image` is plainly valid, else None (then diagnose)."""
    if type(image) is not list:
        return None
    if len(image) == SIZE:
        flat = image
    elif len(image) == SIDE and all(type(row) is list and len(row) == SIDE for row in image):
        flat = [v for row in image for v in row]
    else:
        return None
    if not set(map(type, flat)) <= _NUMBER_TYPES:
        return None
    try:
        array = np.array(flat, dtype=np.float32)
    except OverflowError:
        return None
    if not (array.min() >= 0.0 and array.max() <= MAX_VALUE):  # also False for NaN
        return None
    return array.reshape(1, 1, SIDE, SIDE)


def _check_value(where: str, value: Any, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}: not a number (got {json_kind(value)})")
        return 0.0
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: {value} is not finite")
        return 0.0
    if not 0 <= value <= MAX_VALUE:
        problems.append(f"{where}: {_show(value)} outside 0..{MAX_VALUE}")
        return 0.0
    return float(value)


def _diagnose_image(image: Any, problems: list[str]) -> np.ndarray:
    """Check every element of `image`, appending each problem; the array when there is none."""
    if not isinstance(image, list):
        problems.append(f"image: expected {SIZE} numbers or {SIDE} rows of {SIDE}, got {json_kind(image)}")
        return np.zeros((1, 1, SIDE, SIDE), dtype=np.float32)
    values: list[float] = []
    if any(isinstance(row, list) for row in image):
        if len(image) != SIDE:
            problems.append(f"image: expected {SIDE} rows of {SIDE}, got {len(image)} rows")
        for r, row in enumerate(image):
            if not isinstance(row, list):
                problems.append(f"image[{r}]: expected a row of {SIDE} numbers, got {json_kind(row)}")
                continue
            if len(row) != SIDE:
                problems.append(f"image[{r}]: expected a row of {SIDE} numbers, got {len(row)}")
            values.extend(_check_value(f"image[{r}][{c}]", v, problems) for c, v in enumerate(row))
    else:
        if len(image) != SIZE:
            problems.append(f"image: expected {SIZE} numbers or {SIDE} rows of {SIDE}, got {len(image)}")
        values.extend(_check_value(f"image[{i}]", v, problems) for i, v in enumerate(image))
    if problems:
        return np.zeros((1, 1, SIDE, SIDE), dtype=np.float32)
    return np.array(values, dtype=np.float32).reshape(1, 1, SIDE, SIDE)


def _raise(problems: list[str]) -> None:
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"... and {extra} more problem(s)"]
    raise InvalidInput(problems)


class DigitsHandler:
    """Classify one 8x8 digit image per event."""

    def __init__(self) -> None:
        self.config = FunctionConfig(
            name="digits",
            accepts=("dev.onnxfn.digits.request",),
            result_types=("dev.onnxfn.digits.result",),
            model_file="digits/1/model.onnx",
            model_version="1",
            # v2: v1 quantized to INT8 (functions/digits/build.py), the canary of the traffic-split demo.
            model_versions={"1": "digits/1/model.onnx", "2": "digits/2/model.onnx"},
            batching=Batching(max_batch_size=64, queue_capacity=1024),
            scaling=Scaling(
                min_scale=0,
                max_scale=8,
                initial_scale=1,
                retention_period="60s",
                cpu="2",
                memory="512Mi",
                timeout_seconds=30,
            ),
            workers=2,
            concurrency=16,
        )

    def preprocess(self, data: Any) -> Feeds:
        """`{"image": ...}` -> `{"image": float32 [1, 1, 8, 8]}`; InvalidInput lists every problem."""
        if type(data) is dict:
            fast = _fast_image(data.get("image"))
            if fast is not None:
                return {"image": fast}
        if not isinstance(data, dict):
            raise InvalidInput([f"data: expected a JSON object with 'image', got {json_kind(data)}"])
        if "image" not in data:
            raise InvalidInput(["missing field 'image'"])
        problems: list[str] = []
        image = _diagnose_image(data["image"], problems)
        if problems:
            _raise(problems)
        return {"image": image}

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> dict[str, Any]:
        """`probabilities` [10] -> `{"label": int, "probabilities": [10 floats]}`."""
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float32).reshape(-1)
        return {"label": int(probabilities.argmax()), "probabilities": probabilities.tolist()}

    def example(self) -> dict[str, Any]:
        """A real held-out image (label 2), as 8 rows of 8."""
        return {"image": [list(row) for row in EXAMPLE_IMAGE]}

    def samples(self, count: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Held-out images with their label in the `expected` attribute (the example image when
        scikit-learn, which holds the dataset, is not installed)."""
        try:
            from functions.digits.build import held_out_split

            images, labels = held_out_split()
            pairs = [(images[i].reshape(-1).astype(int).tolist(), int(labels[i])) for i in range(len(labels))]
        except ImportError:
            pairs = [([v for row in EXAMPLE_IMAGE for v in row], 2)]
        return [({"image": image}, {"expected": str(label)}) for image, label in (pairs * count)[:count]]


def new() -> DigitsHandler:
    """The digits handler (cheap: no model or sklearn import here)."""
    return DigitsHandler()
