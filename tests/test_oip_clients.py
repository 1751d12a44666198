"""Real third-party clients against a real function server: tritonclient[http] on its default path
(the Open Inference Protocol's binary tensor extension), its JSON path, and the CloudEvents SDK's
structured mode with bytes data (`data_base64`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as triton
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent
from tritonclient.utils import InferenceServerException

from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def digits(model_dir: Path) -> Iterator[FunctionProcess]:
    with FunctionProcess("digits", env={"ONNXFN_MODEL_DIR": str(model_dir)}) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from functions.digits.build import held_out_split

    x, _ = held_out_split()
    return x[:3].astype(np.float32)


def expected(model_dir: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]  # type: ignore[no-any-return]


def client(server: FunctionProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def test_tritonclient_health_and_metadata(digits: FunctionProcess) -> None:
    c = client(digits)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits") and c.is_model_ready("digits", model_version="1")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    metadata = c.get_model_metadata("digits", model_version="1")
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert not c.is_model_ready("digits", model_version="7")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer(digits: FunctionProcess, images: np.ndarray, model_dir: Path, binary: bool) -> None:
    tensor = triton.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client(digits).infer("digits", [tensor], model_version="1", outputs=outputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities, expected(model_dir, images), atol=1e-6)


def test_tritonclient_errors_carry_the_message(digits: FunctionProcess, images: np.ndarray) -> None:
    tensor = triton.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException, match="unknown requested output 'logits'"):
        client(digits).infer("digits", [tensor], outputs=[triton.InferRequestedOutput("logits")])
    wrong = triton.InferInput("image", [3, 64], "FP32")
    wrong.set_data_from_numpy(images.reshape(3, 64))
    with pytest.raises(InferenceServerException, match="rank 2, model wants 4"):
        client(digits).infer("digits", [wrong])


def test_truncated_binary_data_is_a_400(digits: FunctionProcess) -> None:
    header = b'{"inputs":[{"name":"image","shape":[1,1,8,8],"datatype":"FP32","parameters":{"binary_data_size":256}}]}'
    response = requests.post(
        digits.url + "/v2/models/digits/infer",
        data=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert response.status_code == 400
    assert "256 binary bytes announced, 100 left" in response.json()["error"]


def test_sdk_structured_event_with_bytes_data(digits: FunctionProcess, images: np.ndarray) -> None:
    data = ('{"image": %s}' % [int(v) for v in images[0].reshape(-1)]).encode()
    event = CloudEvent(
        {"type": "dev.onnxfn.digits.request", "source": "/tests", "datacontenttype": "application/json"}, data
    )
    message = ce_http.to_structured_event(event)
    assert b"data_base64" in message.body
    response = requests.post(digits.url, data=message.body, headers=message.headers, timeout=10)
    assert response.status_code == 200, response.text
    headers = {k.lower(): v for k, v in response.headers.items()}
    reply = ce_http.from_structured_event(ce_http.HTTPMessage(headers, response.content))
    assert reply.get_type() == "dev.onnxfn.digits.result"
    assert len(reply.get_data()["probabilities"]) == 10


@pytest.mark.timeout(600)  # the first run makes KServe's venv (pip)
def test_kserve_client_default_path(digits: FunctionProcess, images: np.ndarray, model_dir: Path) -> None:
    """KServe's InferenceRESTClient (v2, binary tensors) from KServe's own venv (made on first use)."""
    import io
    import json
    import subprocess

    from shared.bench.peer_systems import ensure_venv

    bin_dir = ensure_venv("kserve")
    script = Path(__file__).parent / "fixtures" / "kserve_client_check.py"
    payload = io.BytesIO()
    np.save(payload, images)
    done = subprocess.run(
        [str(bin_dir / "python"), str(script), digits.url, "digits"],
        input=payload.getvalue(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    answer = json.loads(done.stdout)
    assert answer["live"] and answer["ready"] and answer["model_ready"] and answer["id"] == "k-1"
    assert np.allclose(answer["probabilities"], expected(model_dir, images), atol=1e-6)


@pytest.mark.timeout(600)  # the first run makes KServe's venv (pip), which holds the SDK 1.x
def test_sdk_1x_structured_event_with_bytes_data(digits: FunctionProcess, images: np.ndarray) -> None:
    import json
    import subprocess

    from shared.bench.peer_systems import ensure_venv

    bin_dir = ensure_venv("kserve")
    script = Path(__file__).parent / "fixtures" / "cloudevents1_check.py"
    image = json.dumps([int(v) for v in images[0].reshape(-1)])
    done = subprocess.run(
        [str(bin_dir / "python"), str(script), digits.url, image], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    answer = json.loads(done.stdout)
    assert answer["status"] == 200 and answer["type"] == "dev.onnxfn.digits.result"
    assert len(answer["data"]["probabilities"]) == 10
