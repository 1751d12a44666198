"""postprocess handler: accept a digits result when its confidence reaches the threshold.

Consumes `dev.onnxfn.digits.result` events (`{"label": int, "probabilities": [10 floats]}`) and
answers the same data plus `confidence` (the largest probability) and `threshold`, typed
`dev.onnxfn.digits.accepted` when confidence >= threshold, else `dev.onnxfn.digits.review`.
There is no model: the runtime hands the preprocess feeds straight to postprocess.
The threshold is 0.9 unless ONNXFN_POSTPROCESS_THRESHOLD (0..1) says otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.config import SettingsError
from shared.contract import Batching, Feeds, FunctionConfig, Result, Scaling
from shared.errors import InvalidInput
from shared.validation import json_kind

THRESHOLD_ENV = "ONNXFN_POSTPROCESS_THRESHOLD"
DEFAULT_THRESHOLD = 0.9
CLASSES = 10
ACCEPTED = "dev.onnxfn.digits.accepted"
REVIEW = "dev.onnxfn.digits.review"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probabilities(value: Any, problems: list[str]) -> None:
    if not isinstance(value, list):
        problems.append(f"probabilities: expected a list of {CLASSES} numbers, got {json_kind(value)}")
        return
    if len(value) != CLASSES:
        problems.append(f"probabilities: expected {CLASSES} numbers, got {len(value)}")
    for i, p in enumerate(value):
        if not _is_number(p):
            problems.append(f"probabilities[{i}]: not a number (got {json_kind(p)})")
        elif not math.isfinite(p):
            problems.append(f"probabilities[{i}]: {p} is not finite")
        elif not 0 <= p <= 1:
            problems.append(f"probabilities[{i}]: {p} outside 0..1")


def _check_label(value: Any, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        got = repr(value) if isinstance(value, float) else json_kind(value)
        problems.append(f"label: expected an integer 0..{CLASSES - 1}, got {got}")
    elif not 0 <= value < CLASSES:
        problems.append(f"label: {value} outside 0..{CLASSES - 1}")


def threshold_from(env: Mapping[str, str]) -> float:
    """The acceptance threshold from `env` (default 0.9); SettingsError unless a number in 0..1."""
    raw = env.get(THRESHOLD_ENV, "")
    if raw == "":
        return DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{THRESHOLD_ENV}={raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{THRESHOLD_ENV}={raw!r} is outside 0..1")
    return value


class PostprocessHandler:
    """Route digits results by confidence."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.config = FunctionConfig(
            name="postprocess",
            accepts=("dev.onnxfn.digits.result",),
            result_types=(ACCEPTED, REVIEW),
            model_file=None,
            batching=Batching(max_batch_size=64, queue_capacity=1024),
            scaling=Scaling(min_scale=0, max_scale=4, cpu="1", memory="256Mi", timeout_seconds=30),
            workers=1,
            concurrency=16,
        )

    def preprocess(self, data: Any) -> Feeds:
        """Validate a digits result -> `probabilities` float64 [1, 10], `label` int64 [1]."""
        if not isinstance(data, dict):
            raise InvalidInput([f"data: expected a JSON object (a digits result), got {json_kind(data)}"])
        problems: list[str] = []
        for name, check in (("label", _check_label), ("probabilities", _check_probabilities)):
            if name not in data:
                problems.append(f"missing field '{name}'")
            else:
                check(data[name], problems)
        if problems:
            raise InvalidInput(problems)
        return {
            "probabilities": np.array([data["probabilities"]], dtype=np.float64),
            "label": np.array([data["label"]], dtype=np.int64),
        }

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> Result:
        """The result plus confidence and threshold, typed accepted or review."""
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float64).reshape(-1)
        label = int(np.asarray(outputs["label"]).reshape(-1)[0])
        confidence = float(probabilities.max())
        extra = data if isinstance(data, dict) else {}
        result = {
            **extra,
            "label": label,
            "probabilities": probabilities.tolist(),
            "confidence": confidence,
            "threshold": self.threshold,
        }
        return Result(data=result, type=ACCEPTED if confidence >= self.threshold else REVIEW)

    def example(self) -> dict[str, Any]:
        """A confident digits result."""
        probabilities = [0.004] * CLASSES
        probabilities[2] = 1.0 - 0.004 * (CLASSES - 1)
        return {"label": 2, "probabilities": probabilities}


def new(env: Mapping[str, str] | None = None) -> PostprocessHandler:
    """The postprocess handler; the threshold comes from ONNXFN_POSTPROCESS_THRESHOLD (default 0.9)."""
    return PostprocessHandler(threshold_from(os.environ if env is None else env))
