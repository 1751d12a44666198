"""Open Inference Protocol (v2) REST tensors: JSON <-> numpy, and model metadata."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import InvalidInput
from shared.model import ModelInfo

# OIP datatype <-> numpy dtype.
OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_OIP = {dtype: name for name, dtype in OIP_TO_NUMPY.items()}


def model_metadata(name: str, version: str, model: ModelInfo | None) -> dict[str, Any]:
    """`GET /v2/models/<name>` body."""

    def tensors(specs: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "datatype": NUMPY_TO_OIP.get(s.dtype, "BYTES"),
                "shape": [d or -1 for d in s.shape],
            }
            for s in specs
        ]

    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx" if model else "none",
        "inputs": tensors(model.inputs) if model else [],
        "outputs": tensors(model.outputs) if model else [],
    }


def decode_request(body: Any) -> tuple[dict[str, np.ndarray], str | None]:
    """An inference request body -> (feeds, request id). Every problem is listed at once."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InvalidInput(["body must be a JSON object with a non-empty 'inputs' list"])
    feeds: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for index, tensor in enumerate(body["inputs"]):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            problems.append(f"{where}: not an object")
            continue
        name, datatype, shape, data = (tensor.get(k) for k in ("name", "datatype", "shape", "data"))
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: missing 'name'")
            continue
        where = f"input '{name}'"
        dtype = OIP_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            problems.append(f"{where}: unsupported datatype {datatype!r} ({', '.join(OIP_TO_NUMPY)})")
            continue
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            problems.append(f"{where}: 'shape' must be a list of non-negative integers")
            continue
        try:
            array = np.asarray(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            problems.append(f"{where}: 'data' is not a list of {datatype} values")
            continue
        if array.size != int(np.prod(shape)):
            problems.append(f"{where}: {array.size} values do not fill shape {shape}")
            continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{where}: contains NaN or infinity")
            continue
        feeds[name] = array.reshape(shape)
    if problems:
        raise InvalidInput(problems)
    request_id = body.get("id")
    return feeds, request_id if isinstance(request_id, str) else None


def encode_response(name: str, version: str, outputs: dict[str, np.ndarray], request_id: str | None) -> dict[str, Any]:
    """Model outputs -> an inference response body."""
    body: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "outputs": [
            {
                "name": key,
                "datatype": NUMPY_TO_OIP.get(value.dtype, "FP32"),
                "shape": list(value.shape),
                "data": value.reshape(-1),
            }
            for key, value in outputs.items()
        ],
    }
    if request_id is not None:
        body["id"] = request_id
    return body
