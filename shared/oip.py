"""Open Inference Protocol (v2) REST tensors: JSON and the binary tensor data extension <-> numpy,
requested outputs, and model and server metadata.

Binary extension (tritonclient's and KServe's client's default): the header
`Inference-Header-Content-Length: N` says the first N body bytes are the JSON request; an input
with `parameters.binary_data_size` takes that many raw little-endian row-major bytes from the rest,
in input order. Outputs go back raw the same way when the request asks (`parameters.
binary_data_output`, or an output's `parameters.binary_data`), the JSON header first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from shared.errors import FunctionError, InvalidInput
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


SERVER_METADATA = {"name": "onnxfn", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    """A decoded inference request: the feeds, its id, and what to send back how."""

    feeds: dict[str, np.ndarray]
    request_id: str | None = None
    outputs: list[str] | None = None  # requested outputs in order; None: every output
    binary: dict[str, bool] = field(default_factory=dict)  # per output: send raw bytes
    binary_default: bool = False


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body, per `Inference-Header-Content-Length`."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise InvalidInput([f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body"])
    size = int(header_length)
    return body[:size], body[size:]


def decode_request(body: Any, binary: bytes = b"", model_outputs: list[str] | None = None) -> InferRequest:
    """An inference request body (and its binary part) -> InferRequest. Every problem is listed at once."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InvalidInput(["body must be a JSON object with a non-empty 'inputs' list"])
    feeds: dict[str, np.ndarray] = {}
    problems: list[str] = []
    offset = 0
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
        count = int(np.prod(shape, dtype=np.int64))
        parameters = _object(tensor.get("parameters"))
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                problems.append(f"{where}: binary_data_size {size!r} is not {count} x {dtype.itemsize} bytes")
                continue
            if offset + size > len(binary):
                problems.append(f"{where}: {size} binary bytes announced, {len(binary) - offset} left in the body")
                continue
            array = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset).astype(dtype, copy=False)
            offset += size
        else:
            try:
                array = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError, OverflowError):
                problems.append(f"{where}: 'data' is not a list of {datatype} values")
                continue
            if array.size != count:
                problems.append(f"{where}: {array.size} values do not fill shape {shape}")
                continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{where}: contains NaN or infinity")
            continue
        feeds[name] = array.reshape(shape)
    if offset != len(binary) and not problems:
        problems.append(f"{len(binary) - offset} binary bytes after the last binary input")
    request = InferRequest(feeds)
    parameters = _object(body.get("parameters"))
    request.binary_default = parameters.get("binary_data_output") is True
    requested = body.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            problems.append("'outputs' must be a list of objects with a 'name'")
        else:
            request.outputs = [o["name"] for o in requested]
            for output in requested:
                flags = _object(output.get("parameters"))
                if "binary_data" in flags:
                    request.binary[output["name"]] = flags["binary_data"] is True
            if model_outputs is not None:
                problems += [
                    f"unknown requested output '{o}' (the model's outputs: {', '.join(model_outputs)})"
                    for o in request.outputs
                    if o not in model_outputs
                ]
    if problems:
        raise InvalidInput(problems)
    request_id = body.get("id")
    request.request_id = request_id if isinstance(request_id, str) else None
    return request


def encode_response(
    name: str, version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[dict[str, str], bytes]:
    """Model outputs -> (headers, body) of the inference response, JSON or JSON + raw tensors."""
    names = request.outputs if request.outputs is not None else list(outputs)
    tensors: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for key in names:
        value = outputs[key]
        tensor: dict[str, Any] = {
            "name": key,
            "datatype": NUMPY_TO_OIP.get(value.dtype, "FP32"),
            "shape": list(value.shape),
        }
        if request.binary.get(key, request.binary_default):
            data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            tensor["data"] = value.reshape(-1)
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": tensors}
    if request.request_id is not None:
        body["id"] = request.request_id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raw:
        return {"content-type": "application/json"}, header
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return headers, header + b"".join(raw)


def error_body(error: FunctionError) -> dict[str, Any]:
    """The OIP error body: the message in `error` (the spec's field), our kind and details beside it."""
    return {"error": error.message, "kind": error.kind, "details": error.details}
