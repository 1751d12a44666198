"""Train the digits CNN on scikit-learn's digits data and export it to ONNX.

The exported graph takes the raw event values: input `image` float32 [N, 1, 8, 8] with values
0..16 (the /16 scaling is inside the graph), output `probabilities` float32 [N, 10] (softmax
inside the graph). Training is deterministic (fixed seeds, fixed stratified held-out split).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "1"
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
    for _ in range(EPOCHS):
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


def build(model_dir: Path) -> dict[str, Any]:
    """Train, export `<model_dir>/digits/1/model.onnx`, write `metadata.json` beside it; return it."""
    import torch

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
        "model_bytes": model_path.stat().st_size,
        "build_seconds": round(time.perf_counter() - started, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
