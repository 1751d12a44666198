"""The generic function: serves any ONNX file, tensors in and out (`onnxfn serve --model FILE.onnx`).

Event data, one row per event, named after the model's own tensors:
- a model with one input takes `{"instances": [row]}` (KServe v1's form, one instance) and answers
  `{"predictions": [row]}` when it has one output;
- any model takes `{"inputs": {"<input name>": row, ...}}` and answers `{"outputs": {"<output
  name>": row, ...}}` (also the answer of a model with several outputs).
A row is the tensor without its batch axis, as nested lists. Every problem is listed at once.
The model file comes from `ONNXFN_MODEL_FILE`; the function's name is the file's stem unless
`ONNXFN_FUNCTION_NAME` says otherwise; the event types are `dev.onnxfn.<name>.request|result`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.contract import Feeds, FunctionConfig
from shared.errors import InvalidInput
from shared.model import ModelInfo, TensorSpec

MODEL_FILE_ENV = "ONNXFN_MODEL_FILE"
NAME_ENV = "ONNXFN_FUNCTION_NAME"


class TensorHandler:
    """The tensor wire of one ONNX model (`inputs` and `outputs` specs): `{"instances": [row]}`
    or `{"inputs": {name: row}}` in, `{"predictions": [row]}` or `{"outputs": {name: row}}` out.
    A scaffolded function (`onnxfn new`) declares its specs; the generic function learns them."""

    config: FunctionConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def bind_model(self, model: ModelInfo) -> None:
        """Called with the loaded model before warm-up: its tensors must be the declared ones."""
        declared = [(s.name, s.dtype, s.shape[1:]) for s in self.inputs]
        loaded = [(s.name, s.dtype, s.shape[1:]) for s in model.inputs]
        if declared != loaded:
            raise ValueError(f"{self.config.name}: the model's inputs {loaded} are not the declared {declared}")

    def preprocess(self, data: Any) -> Feeds:
        if not isinstance(data, dict):
            raise InvalidInput(["event data must be a JSON object with 'instances' or 'inputs'"])
        if "instances" in data and len(self.inputs) == 1:
            instances = data["instances"]
            if not isinstance(instances, list) or len(instances) != 1:
                raise InvalidInput(["'instances' must be a list of exactly one row (one event, one row)"])
            rows = {self.inputs[0].name: instances[0]}
        elif isinstance(data.get("inputs"), dict):
            rows = data["inputs"]
        else:
            names = ", ".join(s.name for s in self.inputs)
            form = "'instances': [row] or " if len(self.inputs) == 1 else ""
            raise InvalidInput([f"event data needs {form}'inputs': {{name: row}} for the model's inputs ({names})"])
        problems: list[str] = []
        feeds: Feeds = {}
        known = {spec.name for spec in self.inputs}
        problems += [f"unknown model input '{name}'" for name in sorted(set(rows) - known)]
        for spec in self.inputs:
            if spec.name not in rows:
                problems.append(f"missing model input '{spec.name}'")
                continue
            array = _row(spec, rows[spec.name], problems)
            if array is not None:
                feeds[spec.name] = array
        if problems:
            raise InvalidInput(problems)
        return feeds

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> Any:
        if len(self.outputs) == 1 and "instances" in data:
            return {"predictions": [outputs[self.outputs[0].name]]}
        return {"outputs": dict(outputs)}

    def example(self) -> Any:
        """Zeros of every input's shape (dynamic axes as 1): what warm-up runs."""
        return {"inputs": {spec.name: np.zeros(_row_shape(spec), spec.dtype).tolist() for spec in self.inputs}}


class GenericHandler(TensorHandler):
    """Tensor in, tensor out for one ONNX file; learns the tensors when the model is loaded."""

    def __init__(self, model_path: Path, name: str | None = None) -> None:
        name = name or model_path.stem.replace("_", "-")
        self.config = FunctionConfig(
            name=name,
            accepts=(f"dev.onnxfn.{name}.request",),
            result_types=(f"dev.onnxfn.{name}.result",),
            model_file=model_path.name,
        )
        self.model_dir = model_path.parent
        self.inputs = []
        self.outputs = []

    def bind_model(self, model: ModelInfo) -> None:
        """Its inputs and outputs define the wire."""
        self.inputs, self.outputs = model.inputs, model.outputs


def _row_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(d if d is not None else 1 for d in spec.shape[1:])


def _row(spec: TensorSpec, value: Any, problems: list[str]) -> np.ndarray | None:
    """One row of `spec` as an array with a batch axis of 1, or None after adding its problems."""
    where = f"input '{spec.name}'"
    try:
        array = np.asarray(value, dtype=spec.dtype)
    except (TypeError, ValueError, OverflowError):
        problems.append(f"{where}: not a (nested) list of {spec.dtype} values")
        return None
    expected = spec.shape[1:]
    if array.ndim != len(expected) or any(w is not None and g != w for g, w in zip(array.shape, expected, strict=True)):
        shown = "x".join("?" if d is None else str(d) for d in expected) or "a scalar"
        problems.append(f"{where}: a row of shape {'x'.join(map(str, array.shape)) or 'scalar'}, model wants {shown}")
        return None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        problems.append(f"{where}: contains NaN or infinity")
        return None
    return array[np.newaxis]


def new() -> GenericHandler:
    """The handler for the file named by `ONNXFN_MODEL_FILE`."""
    path = os.environ.get(MODEL_FILE_ENV)
    if not path:
        raise ValueError(f"the generic function needs {MODEL_FILE_ENV}=/path/to/model.onnx")
    return GenericHandler(Path(path).resolve(), os.environ.get(NAME_ENV) or None)
