"""A user's own model served as a new user would: their own function module outside the repo
(`onnxfn serve pkg.module`), and any ONNX file with the generic function (`onnxfn serve --model`)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import requests

from shared.bench.reference_models import build_mlp, example_row
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)

USER_FUNCTION = '''
"""My digits classifier: 64 pixel values (0..16) in, the ten class probabilities out."""

import numpy as np

from shared.contract import FunctionConfig
from shared.errors import InvalidInput


class Handler:
    config = FunctionConfig(
        name="mydigits",
        accepts=("com.example.digits.request",),
        result_types=("com.example.digits.result",),
        model_file="mlp.onnx",
    )

    def preprocess(self, data):
        pixels = data.get("pixels") if isinstance(data, dict) else None
        if not isinstance(pixels, list) or len(pixels) != 64:
            raise InvalidInput(["'pixels' must be a list of 64 numbers"])
        return {"x": np.asarray(pixels, dtype=np.float32).reshape(1, 64)}

    def postprocess(self, outputs, data):
        probabilities = outputs["probabilities"]
        return {"label": int(probabilities.argmax()), "probabilities": probabilities.tolist()}

    def example(self):
        return {"pixels": [0] * 64}


def new():
    return Handler()
'''


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    build_mlp(path)
    return path


def expected(model: Path, row: list[float]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.asarray([row], dtype=np.float32)})[0][0]  # type: ignore[no-any-return]


def binary_headers(type_: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-source": "/tests",
        "ce-type": type_,
        "Content-Type": "application/json",
    }


@pytest.fixture(scope="module")
def user_server(mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FunctionProcess]:
    package = tmp_path_factory.mktemp("userland") / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "digitsfn.py").write_text(textwrap.dedent(USER_FUNCTION))
    env = {"PYTHONPATH": str(package.parent), "ONNXFN_MODEL_DIR": str(mlp.parent)}
    command = [sys.executable, "-m", "shared.cli", "serve", "mypkg.digitsfn"]
    with FunctionProcess("mypkg.digitsfn", env=env, command=command) as server:
        server.wait_ready()
        yield server


def test_a_function_module_outside_the_repo_is_served(user_server: FunctionProcess, mlp: Path) -> None:
    row = example_row("mlp")
    response = requests.post(
        user_server.url,
        data=orjson.dumps({"pixels": row}),
        headers=binary_headers("com.example.digits.request"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["ce-type"] == "com.example.digits.result"
    assert response.headers["ce-source"] == "/functions/mydigits"
    body = response.json()
    want = expected(mlp, row)
    assert body["label"] == int(want.argmax())
    assert np.allclose(body["probabilities"], want, atol=1e-6)
    bad = requests.post(
        user_server.url, data=b'{"pixels": [1, 2]}', headers=binary_headers("com.example.digits.request"), timeout=10
    )
    assert bad.status_code == 400 and "64 numbers" in bad.json()["details"][0]


@pytest.fixture(scope="module")
def generic_server(mlp: Path) -> Iterator[FunctionProcess]:
    command = [sys.executable, "-m", "shared.cli", "serve", "--model", str(mlp)]
    with FunctionProcess("mlp", command=command) as server:
        server.wait_ready()
        yield server


def test_any_onnx_file_is_served_tensor_in_tensor_out(generic_server: FunctionProcess, mlp: Path) -> None:
    row = example_row("mlp")
    want = expected(mlp, row)
    response = requests.post(
        generic_server.url,
        data=orjson.dumps({"instances": [row]}),
        headers=binary_headers("dev.onnxfn.mlp.request"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["ce-type"] == "dev.onnxfn.mlp.result"
    assert np.allclose(response.json()["predictions"][0], want, atol=1e-6)
    named = requests.post(
        generic_server.url,
        data=orjson.dumps({"inputs": {"x": row}}),
        headers=binary_headers("dev.onnxfn.mlp.request"),
        timeout=10,
    )
    assert np.allclose(named.json()["outputs"]["probabilities"], want, atol=1e-6)
    tensor = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": row}
    for path in ("/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"):
        oip = requests.post(generic_server.url + path, json={"inputs": [tensor]}, timeout=10)
        assert oip.status_code == 200, oip.text
        assert np.allclose(oip.json()["outputs"][0]["data"], want, atol=1e-6)
    metadata = requests.get(generic_server.url + "/v2/models/mlp", timeout=10).json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]


def test_the_generic_function_lists_every_problem(generic_server: FunctionProcess) -> None:
    response = requests.post(
        generic_server.url,
        data=orjson.dumps({"inputs": {"x": [1.0] * 63, "y": [1]}}),
        headers=binary_headers("dev.onnxfn.mlp.request"),
        timeout=10,
    )
    assert response.status_code == 400
    details = response.json()["details"]
    assert "unknown model input 'y'" in details
    assert any("input 'x'" in d and "model wants 64" in d for d in details), details
    unknown = requests.post(generic_server.url + "/v2/models/mlp/versions/9/infer", json={"inputs": []}, timeout=10)
    assert unknown.status_code == 404
