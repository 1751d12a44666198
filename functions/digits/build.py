"""Train the digits CNN on scikit-learn's digits data and export it to ONNX.

The exported graph takes the raw event values: input `image` float32 [N, 1, 8, 8] with values
0..16 (the /16 scaling is inside the graph), output `probabilities` float32 [N, 10] (softmax
inside the graph). Training is deterministic (fixed seeds, fixed stratified held-out split).

Version 2 is version 1 quantized to INT8 with onnxruntime's static quantization (QDQ, per-channel
INT8 weights, UINT8 activations calibrated on training images): same inputs and outputs, and its
accuracy and speed against version 1 are measured on the held-out split and kept in its metadata.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.build_models import write_metadata
from shared.progress import steps

VERSION = "1"
INT8_VERSION = "2"
MIN_INT8_ACCURACY = 0.96
CALIBRATION_IMAGES = 512
SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test): images float32 [n, 1, 8, 8] in 0..16, labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_train, x_test, y_train, y_test


def held_out_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed held-out split: (X_test float32 [450, 1, 8, 8] in 0..16, y_test int64 [450])."""
    _, x_test, _, y_test = _split()
    return x_test, y_test


def _network() -> Any:
    """The CNN, scaling and softmax included (so ONNX gets raw 0..16 values in, probabilities out)."""
    import torch
    from torch import nn

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(0.25),
                nn.Linear(64 * 4 * 4, 128),
                nn.ReLU(),
                nn.Dropout(0.25),
                nn.Linear(128, 10),
            )

        def logits(self, image: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(image / 16.0))  # type: ignore[no-any-return]

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.logits(image), dim=1)

    return DigitsNet()


def _train(x_train: np.ndarray, y_train: np.ndarray) -> Any:
    """Train deterministically (fixed seeds, one thread); the model in eval mode."""
    import torch

    torch.manual_seed(SEED)
    # One thread: as fast for this small net, and steady when other processes share the cores.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(x_train, y_train)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(x_train: np.ndarray, y_train: np.ndarray) -> Any:
    import torch
    from torch import nn

    model = _network()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in steps(range(EPOCHS), "digits: training", unit="epoch"):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model.logits(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    return model


def _export(model: Any, path: Path) -> None:
    import torch

    dummy = torch.zeros(2, 1, 8, 8, dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return float((np.argmax(probs, axis=1) == y).mean())


def _session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency_us(session: Any, x: np.ndarray, seconds: float) -> float:
    """Mean microseconds per `session.run` on `x`, over about `seconds` after a short warm-up."""
    for _ in range(20):
        session.run(None, {INPUT_NAME: x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {INPUT_NAME: x})
        runs += 1
    return (time.perf_counter() - started) / runs * 1e6


def compare_versions(model_dir: Path, seconds: float = 0.5) -> dict[str, dict[str, float]]:
    """Accuracy on the held-out split and one-thread latency at batch 1 and 64, per built version."""
    x_test, y_test = held_out_split()
    report: dict[str, dict[str, float]] = {}
    for version in (VERSION, INT8_VERSION):
        path = Path(model_dir) / "digits" / version / "model.onnx"
        if not path.is_file():
            continue
        session = _session(path)
        (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: x_test})
        report[version] = {
            "accuracy": float((np.argmax(probs, axis=1) == y_test).mean()),
            "batch1_us": _latency_us(session, x_test[:1], seconds),
            "batch64_us": _latency_us(session, x_test[:64], seconds),
            "model_bytes": float(path.stat().st_size),
        }
    return report


def build_int8(model_dir: Path) -> dict[str, Any]:
    """Quantize version 1 into `<model_dir>/digits/2/model.onnx` (static INT8); write and return metadata."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    source = Path(model_dir) / "digits" / VERSION / "model.onnx"
    out = Path(model_dir) / "digits" / INT8_VERSION
    out.mkdir(parents=True, exist_ok=True)
    x_train, _, _, _ = _split()
    batches = [x_train[i : i + BATCH_SIZE] for i in range(0, CALIBRATION_IMAGES, BATCH_SIZE)]

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.feeds = iter({INPUT_NAME: batch} for batch in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared, tmp = out / "prepared.onnx.tmp", out / "model.onnx.tmp"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(tmp),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    x_test, y_test = held_out_split()
    accuracy = _onnx_accuracy(tmp, x_test, y_test)
    if accuracy < MIN_INT8_ACCURACY:
        tmp.unlink()
        raise RuntimeError(f"digits INT8 accuracy {accuracy:.4f} is below {MIN_INT8_ACCURACY}")
    tmp.replace(out / "model.onnx")
    comparison = compare_versions(model_dir)
    fp32, int8 = comparison[VERSION], comparison[INT8_VERSION]
    metadata: dict[str, Any] = {
        "name": "digits",
        "version": INT8_VERSION,
        "quantized_from": VERSION,
        "quantization": {
            "method": "static",
            "format": "QDQ",
            "per_channel": True,
            "weights": "int8",
            "activations": "uint8",
            "calibration_images": CALIBRATION_IMAGES,
        },
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": ["batch", 1, 8, 8], "range": [0, 16]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", 10]}},
        "metrics": {
            "accuracy": accuracy,
            "fp32_accuracy": fp32["accuracy"],
            "speedup_batch1": fp32["batch1_us"] / int8["batch1_us"],
            "speedup_batch64": fp32["batch64_us"] / int8["batch64_us"],
        },
        "latency_us_one_thread": {
            version: {k: v for k, v in comparison[version].items() if "us" in k} for version in comparison
        },
        "onnxruntime": onnxruntime.__version__,
    }
    return write_metadata(out / "model.onnx", started, metadata)


def build(model_dir: Path) -> dict[str, Any]:
    """Build version 1 (FP32) and version 2 (INT8 from it); return v1's metadata with v2's metrics added."""
    metadata = build_fp32(model_dir)
    int8 = build_int8(model_dir)
    summary = {**metadata, "metrics": dict(metadata["metrics"])}
    summary["metrics"].update(
        {f"v2_int8_{key}": value for key, value in int8["metrics"].items() if key != "fp32_accuracy"}
    )
    return summary


def build_fp32(model_dir: Path) -> dict[str, Any]:
    """Train, export `<model_dir>/digits/1/model.onnx`, write `metadata.json` beside it; return it."""

    started = time.perf_counter()
    out = Path(model_dir) / "digits" / VERSION
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = _split()
    model = _train(x_train, y_train)
    model_path = out / "model.onnx"
    tmp = out / "model.onnx.tmp"
    _export(model, tmp)
    accuracy = _onnx_accuracy(tmp, x_test, y_test)
    tmp.replace(model_path)
    metadata: dict[str, Any] = {
        "name": "digits",
        "version": VERSION,
        "inputs": {INPUT_NAME: {"dtype": "float32", "shape": ["batch", 1, 8, 8], "range": [0, 16]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", 10]}},
        "metrics": {"accuracy": accuracy},
        "held_out": {"size": len(y_test), "test_size": 0.25, "random_state": SEED, "stratify": True},
        "train": {"size": len(y_train), "epochs": EPOCHS, "batch_size": BATCH_SIZE, "seed": SEED, "threads": 1},
    }
    return write_metadata(model_path, started, metadata)
