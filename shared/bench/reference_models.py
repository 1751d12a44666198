"""The two reference models of `onnxfn bench --peers`, built from scikit-learn's digits data.

- `mlp.onnx`: an HTTP-bound model: input `x` float32 [n, 64] (a digits image, values 0..16) ->
  `probabilities` float32 [n, 10]; a 64-128-10 MLP trained with scikit-learn (~0.01 ms a row),
  written with onnx.helper from its weights.
- `cnn.onnx`: a compute-bound model: input `x` float32 [n, 3, 64, 64] -> `probabilities` [n, 10];
  an eight-conv net (~6 ms a row on one core here) with weights from a fixed seed: it stands for
  a user's image model, so its cost is what matters, not its accuracy.

Both are built once into `models/bench/` (a cache; `--force` rebuilds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
MLP_FILE = "mlp.onnx"
CNN_FILE = "cnn.onnx"
CNN_SIDE = 64


def example_row(model: str) -> list[Any]:
    """One request row for `model` ("mlp" or "cnn"): a held-out digits image, in the model's shape."""
    from sklearn.datasets import load_digits

    image = load_digits().images[-1].astype(np.float32)  # the last image is never in the MLP's training set
    if model == "mlp":
        return image.reshape(64).tolist()  # type: ignore[no-any-return]
    scale = CNN_SIDE // 8
    big = np.kron(image, np.ones((scale, scale), dtype=np.float32)) / 16.0
    return np.stack([big, big, big]).tolist()  # type: ignore[no-any-return]


def build_mlp(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x, y = digits.data.astype(np.float32)[:-1] / 16.0, digits.target[:-1]
    mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=SEED).fit(x, y)
    w1, w2 = (w.astype(np.float32) for w in mlp.coefs_)
    b1, b2 = (b.astype(np.float32) for b in mlp.intercepts_)
    initializers = [
        numpy_helper.from_array(np.array([1 / 16.0], dtype=np.float32), "scale"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("MatMul", ["xs", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_cnn(path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 128, 192, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    network = nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(channels * (CNN_SIDE // 16) ** 2, 10), nn.Softmax(dim=1)
    ).eval()
    dummy = torch.zeros(2, 3, CNN_SIDE, CNN_SIDE)
    torch.onnx.export(
        network,
        (dummy,),
        str(path),
        input_names=["x"],
        output_names=["probabilities"],
        dynamic_axes={"x": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def ensure_built(directory: Path, force: bool = False) -> dict[str, Path]:
    """Build the reference models into `directory` when missing; {"mlp": path, "cnn": path}."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"mlp": directory / MLP_FILE, "cnn": directory / CNN_FILE}
    for name, build in (("mlp", build_mlp), ("cnn", build_cnn)):
        if force or not paths[name].is_file():
            partial = paths[name].with_suffix(".partial.onnx")
            build(partial)
            partial.replace(paths[name])
    return paths
